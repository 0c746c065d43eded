#!/usr/bin/env python3
"""Writes tests/golden/tokenize-*.json: llama.cpp's tokenization of a corpus, for both demo
models, with special tokens parsed and not. The e2e tests `smollm2_tokenizes_like_llama_cpp` and
`gemma3_tokenizes_like_llama_cpp` hold our tokenizers to it, id for id.

    python3 tests/golden/make-tokenize.py "$(bench/llama-cpp.sh avx2)"

The first argument is the python of a virtual environment with llama-cpp-python==0.3.36 (what
bench/llama-cpp.sh builds); the models come from scripts/fetch-models.py's cache. The corpus is
fixed here (hand-picked cases, then seeded random strings), so a re-run writes the same files.
"""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS = Path(os.environ.get("OUTPOST_MODELS_DIR", Path.home() / ".cache/outpost/models"))
TARGETS = [
    ("SmolLM2-135M-Instruct.Q4_1.gguf", "tokenize-smollm2.json"),
    ("gemma-3-270m-q4_k_m.gguf", "tokenize-gemma3.json"),
]

HAND = [
    "Hello world",
    " Hello world",
    "  two leading spaces",
    "trailing spaces   ",
    "tabs\tand\t\ttwo tabs",
    "new\nline\n\nand\n\n\nthree",
    "windows\r\nline\r\nends",
    " \n \t \r\n ",
    "I'm sure they'll say it's OK, DON'T you think? We've, you'd, she's",
    "1234567890 3.14159 1,000,000 -42 0x1F 1e-9 2026-12-07",
    "٣٤٥ ¹²³ ½ ⅓ Ⅻ",
    "fn main() {\n    let x: Vec<u8> = vec![1, 2, 3];\n    println!(\"{x:?}\");\n}\n",
    "def f(a, b=2, *args, **kw):\n\treturn {'a': a, \"b\": b}\n",
    '{"key": [1, 2.5, null, true], "nested": {"x": "y"}}',
    "<html><body><table><tr><td>cell</td></tr></table></body></html>",
    "café naïve Ærø façade Straße jalapeño",
    "你好，世界！今天天气很好。",
    "日本語のテキストとカタカナ、ひらがな。",
    "한국어 텍스트입니다.",
    "Привет, мир! Как дела?",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "שלום עולם",
    "Ελληνικά γράμματα",
    "🚀🔬📱 👨‍👩‍👧‍👦 🇫🇷 👍🏽 ❤️",
    "e\u0301 a\u0308 combining marks",
    "zero\u200bwidth\u200djoiner\ufeffbom",
    "\u00a0non-breaking\u2003em space\u3000ideographic",
    "control \x01\x02\x7f chars",
    "\ufffd replacement",
    "a" * 200,
    "=" * 120,
    " " * 64,
    "\n" * 20,
    "ab" * 100,
    "<|im_start|>user\nWhat is edge computing?<|im_end|>\n<|im_start|>assistant\n",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "<bos>text<eos> <pad> <unk> <mask>",
    "<|im_start|<|im_end|>> <|im_sta <start_of_tur",
    "<|endoftext|>after",
    "<unused0> <unused42> [multimodal] <start_of_image>",
    "x<|im_start|>y<start_of_turn>z",
    "https://example.com/path?q=1&r=two#frag user@example.org",
    "C:\\Windows\\System32 /usr/local/bin ~/.cache",
    "The quick brown fox jumps over the lazy dog. " * 5,
    "CamelCaseIdentifier snake_case_name kebab-case-name SCREAMING_CASE",
    "$100.00 €50 £20 ¥1000 ₹500",
    "((()))[[[]]]{{{}}}<<<>>>",
    "...!!!???,,,;;;:::",
    "'single' \"double\" `back` «guillemets» „quotes“",
    "",
]

POOLS = [
    "abcdefghijklmnopqrstuvwxyz",
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "0123456789",
    " \t\n\r",
    "   ",
    ".,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`",
    "éèêëàâäôöûüçñßøåæ",
    "你好世界日本語한국어",
    "абвгдеёжзийклмнопрстуфхцчшщъыьэюя",
    "αβγδεζηθικλμνξοπρστυφχψω",
    "🚀🔬📱👍🏽❤️\u200d",
    "\u0301\u0308\u200b\ufeff\u00a0\u3000",
    "٠١٢٣٤٥٦٧٨٩",
]
SPECIAL_BITS = ["<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>", "<bos>", "'s", "'ll"]


def corpus():
    rng = random.Random(20261207)
    out = list(HAND)
    for _ in range(300):
        n = rng.randint(1, 60)
        weights = [rng.random() for _ in POOLS]
        s = []
        for _ in range(n):
            if rng.random() < 0.03:
                s.append(rng.choice(SPECIAL_BITS))
            else:
                pool = rng.choices(POOLS, weights)[0]
                s.append(rng.choice(pool))
        out.append("".join(s))
    return out


CHILD = r"""
import json, sys
from llama_cpp import Llama
path, texts = sys.argv[1], json.load(sys.stdin)
llm = Llama(model_path=path, vocab_only=True, verbose=False)
items = []
for t in texts:
    for special in (True, False):
        ids = llm.tokenize(t.encode("utf-8"), add_bos=False, special=special)
        items.append({"text": t, "special": special, "ids": ids})
json.dump(items, sys.stdout)
"""


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    python = sys.argv[1]
    texts = corpus()
    for model, name in TARGETS:
        path = MODELS / model
        if not path.exists():
            sys.exit(f"{path} is missing: run scripts/fetch-models.py")
        run = subprocess.run(
            [python, "-c", CHILD, str(path)],
            input=json.dumps(texts), capture_output=True, text=True, check=True,
        )
        version = subprocess.run(
            [python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
        doc = {
            "model_file": model,
            "llama_cpp_python": version,
            "tokenize": "Llama(vocab_only=True).tokenize(text.encode('utf-8'), add_bos=False, special=special)",
            "made_by": "tests/golden/make-tokenize.py",
            "items": json.loads(run.stdout),
        }
        (HERE / name).write_text(json.dumps(doc, ensure_ascii=False, indent=0) + "\n")
        print(f"{name}: {len(doc['items'])} items")


if __name__ == "__main__":
    main()
