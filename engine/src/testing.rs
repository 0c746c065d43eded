//! Test support: GGUF files built in code, valid or deliberately hostile.
//!
//! Used by this crate's unit tests and by the end-to-end tests in `outpost-tests`; nothing in
//! the product calls it. Tensor data is a deterministic byte pattern, so two builds with the
//! same settings give the same bytes (and the same SHA-256).

/// Builds a GGUF file in memory. Fields left public are the knobs hostile tests turn.
#[derive(Clone, Debug)]
pub struct GgufBuilder {
    pub version: u32,
    /// Drop this many bytes from the end of the finished file.
    pub truncate_data_by: usize,
    /// Write tensor `index` with this data offset instead of the computed one.
    pub offset_override: Option<(usize, u64)>,
    /// Added to every byte of tensor data, so builds can differ in content only.
    pub salt: u8,
    kvs: Vec<(String, Vec<u8>)>,
    tensors: Vec<(String, Vec<u64>, u32)>,
    /// Explicit data for some tensors (by index); the others get the byte pattern.
    data: std::collections::HashMap<usize, Vec<u8>>,
}

const ALIGN: u64 = 32;

impl GgufBuilder {
    /// An empty model of architecture `arch` (GGUF v3, no tensors).
    pub fn new(arch: &str) -> Self {
        let mut b = Self {
            version: 3,
            truncate_data_by: 0,
            offset_override: None,
            salt: 0,
            kvs: Vec::new(),
            tensors: Vec::new(),
            data: Default::default(),
        };
        b.kv_str("general.architecture", arch);
        b
    }

    /// A tiny llama-shaped model: q4_1 matrices, a q8_0 embedding, an f32 norm, a context
    /// length of 2048 and a three-token vocabulary.
    pub fn llama_like() -> Self {
        let mut b = Self::new("llama");
        b.kv_str("general.name", "tiny-llama");
        b.kv_u32("llama.context_length", 2048);
        b.kv_u32("llama.embedding_length", 64);
        b.kv_string_array("tokenizer.ggml.tokens", &["<s>", "</s>", "hello"]);
        b.tensor("token_embd.weight", &[64, 16], 8);
        b.tensor("blk.0.attn_q.weight", &[64, 64], 3);
        b.tensor("blk.0.ffn_down.weight", &[64, 128], 3);
        b.tensor("output_norm.weight", &[64], 0);
        b
    }

    fn set_kv(&mut self, key: &str, encoded: Vec<u8>) {
        match self.kvs.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = encoded,
            None => self.kvs.push((key.to_string(), encoded)),
        }
    }

    pub fn kv_u32(&mut self, key: &str, value: u32) -> &mut Self {
        let mut v = 4u32.to_le_bytes().to_vec();
        v.extend_from_slice(&value.to_le_bytes());
        self.set_kv(key, v);
        self
    }

    pub fn kv_str(&mut self, key: &str, value: &str) -> &mut Self {
        let mut v = 8u32.to_le_bytes().to_vec();
        put_str(&mut v, value);
        self.set_kv(key, v);
        self
    }

    pub fn kv_string_array(&mut self, key: &str, values: &[&str]) -> &mut Self {
        let mut v = 9u32.to_le_bytes().to_vec();
        v.extend_from_slice(&8u32.to_le_bytes());
        v.extend_from_slice(&(values.len() as u64).to_le_bytes());
        for s in values {
            put_str(&mut v, s);
        }
        self.set_kv(key, v);
        self
    }

    /// A string value whose declared length is `len` but whose bytes are missing.
    pub fn raw_kv_string_len(&mut self, key: &str, len: u64) -> &mut Self {
        let mut v = 8u32.to_le_bytes().to_vec();
        v.extend_from_slice(&len.to_le_bytes());
        self.set_kv(key, v);
        self
    }

    /// An array of `len` elements of type `elem` whose contents are missing.
    pub fn raw_kv_array(&mut self, key: &str, elem: u32, len: u64) -> &mut Self {
        let mut v = 9u32.to_le_bytes().to_vec();
        v.extend_from_slice(&elem.to_le_bytes());
        v.extend_from_slice(&len.to_le_bytes());
        self.set_kv(key, v);
        self
    }

    /// Arrays nested `depth` deep, each holding one array.
    pub fn raw_nested_arrays(&mut self, key: &str, depth: u32) -> &mut Self {
        let mut v = 9u32.to_le_bytes().to_vec();
        for _ in 1..depth {
            v.extend_from_slice(&9u32.to_le_bytes());
            v.extend_from_slice(&1u64.to_le_bytes());
        }
        v.extend_from_slice(&4u32.to_le_bytes());
        v.extend_from_slice(&0u64.to_le_bytes());
        self.set_kv(key, v);
        self
    }

    /// A tensor of ggml type `type_id` (0 = f32, 3 = q4_1, 8 = q8_0, 12 = q4_k, …).
    pub fn tensor(&mut self, name: &str, dims: &[u64], type_id: u32) -> &mut Self {
        self.tensors
            .push((name.to_string(), dims.to_vec(), type_id));
        self
    }

    /// Gives the tensor `name` other dimensions (its data becomes the byte pattern).
    pub fn reshape(&mut self, name: &str, dims: &[u64]) -> &mut Self {
        if let Some(i) = self.tensors.iter().position(|t| t.0 == name) {
            self.tensors[i].1 = dims.to_vec();
            self.data.remove(&i);
        }
        self
    }

    /// An f32 tensor with the given values (row-major, `dims[0]` fastest).
    pub fn tensor_f32(&mut self, name: &str, dims: &[u64], values: &[f32]) -> &mut Self {
        self.data.insert(
            self.tensors.len(),
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        );
        self.tensors.push((name.to_string(), dims.to_vec(), 0));
        self
    }

    pub fn kv_f32(&mut self, key: &str, value: f32) -> &mut Self {
        let mut v = 6u32.to_le_bytes().to_vec();
        v.extend_from_slice(&value.to_le_bytes());
        self.set_kv(key, v);
        self
    }

    pub fn kv_bool(&mut self, key: &str, value: bool) -> &mut Self {
        let mut v = 7u32.to_le_bytes().to_vec();
        v.push(u8::from(value));
        self.set_kv(key, v);
        self
    }

    pub fn kv_f32_array(&mut self, key: &str, values: &[f32]) -> &mut Self {
        self.kv_array(
            key,
            6,
            values.len(),
            values.iter().flat_map(|x| x.to_le_bytes()),
        )
    }

    pub fn kv_i32_array(&mut self, key: &str, values: &[i32]) -> &mut Self {
        self.kv_array(
            key,
            5,
            values.len(),
            values.iter().flat_map(|x| x.to_le_bytes()),
        )
    }

    /// An array of `len` elements of GGUF type `elem`, encoded as `bytes`.
    fn kv_array(
        &mut self,
        key: &str,
        elem: u32,
        len: usize,
        bytes: impl Iterator<Item = u8>,
    ) -> &mut Self {
        let mut v = 9u32.to_le_bytes().to_vec();
        v.extend_from_slice(&elem.to_le_bytes());
        v.extend_from_slice(&(len as u64).to_le_bytes());
        v.extend(bytes);
        self.set_kv(key, v);
        self
    }

    /// A tiny but runnable llama model: 2 layers, hidden 64, 4 heads (2 KV heads), a
    /// byte-level BPE vocabulary of the 256 bytes, two merges and the ChatML control tokens
    /// `<|im_start|>` (256) and `<|im_end|>` (257, also EOS). Weights are deterministic.
    pub fn tiny_llama() -> Self {
        Self::tiny("llama")
    }

    /// A tiny runnable model of architecture `arch`: `llama`; `qwen2` (the same shape plus
    /// q/k/v biases and the qwen2 pre-tokenizer); `qwen3` (plus q/k norms instead); `gemma3`
    /// (q/k norms, post-attention and post-feed-forward norms, a sliding window of 8); `phi3`
    /// (fused q|k|v and gate|up matrices, an untied output head).
    pub fn tiny(arch: &str) -> Self {
        let (hidden, heads, kv_heads, ffn, layers) = (64u64, 4u64, 2u64, 128u64, 2u64);
        let head_dim = hidden / heads;
        let mut b = Self::new(arch);
        b.kv_str("general.name", &format!("tiny-{arch}"));
        let key = |k: &str| format!("{arch}.{k}");
        b.kv_u32(&key("context_length"), 64);
        b.kv_u32(&key("embedding_length"), hidden as u32);
        b.kv_u32(&key("block_count"), layers as u32);
        b.kv_u32(&key("feed_forward_length"), ffn as u32);
        b.kv_u32(&key("attention.head_count"), heads as u32);
        b.kv_u32(&key("attention.head_count_kv"), kv_heads as u32);
        b.kv_u32(&key("rope.dimension_count"), head_dim as u32);
        b.kv_f32(&key("attention.layer_norm_rms_epsilon"), 1e-5);
        b.kv_f32(&key("rope.freq_base"), 10_000.0);
        b.kv_u32(&key("attention.key_length"), head_dim as u32);
        b.kv_u32(&key("attention.value_length"), head_dim as u32);
        if arch == "gemma3" {
            b.kv_u32(&key("attention.sliding_window"), 8);
        }
        let mut tokens: Vec<String> = (0..=255u8).map(byte_level_char).map(String::from).collect();
        let merges = ["h e", "l l"];
        tokens.extend(["<|im_start|>", "<|im_end|>", "he", "ll"].map(String::from));
        let types: Vec<i32> = (0..tokens.len())
            .map(|i| if i == 256 || i == 257 { 3 } else { 1 })
            .collect();
        let refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
        b.kv_str("tokenizer.ggml.model", "gpt2");
        b.kv_str(
            "tokenizer.ggml.pre",
            if arch == "qwen2" { "qwen2" } else { "default" },
        );
        b.kv_string_array("tokenizer.ggml.tokens", &refs);
        b.kv_string_array("tokenizer.ggml.merges", &merges);
        b.kv_i32_array("tokenizer.ggml.token_type", &types);
        b.kv_u32("tokenizer.ggml.eos_token_id", 257);
        b.kv_u32("tokenizer.ggml.bos_token_id", 256);
        b.kv_bool("tokenizer.ggml.add_bos_token", false);
        b.kv_str(
            "tokenizer.chat_template",
            "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}\
             {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        );
        let vocab = tokens.len() as u64;
        let mut seed = 1u32;
        let mut weights = |n: u64, scale: f32| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    ((seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * scale
                })
                .collect()
        };
        b.tensor_f32(
            "token_embd.weight",
            &[hidden, vocab],
            &weights(hidden * vocab, 1.0),
        );
        b.tensor_f32("output_norm.weight", &[hidden], &vec![1.0; hidden as usize]);
        if arch == "phi3" {
            // phi3 has no tied head.
            let w = weights(hidden * vocab, 1.0);
            b.tensor_f32("output.weight", &[hidden, vocab], &w);
        }
        let kv = kv_heads * head_dim;
        for l in 0..layers {
            let name = |n: &str| format!("blk.{l}.{n}.weight");
            b.tensor_f32(&name("attn_norm"), &[hidden], &vec![1.0; hidden as usize]);
            b.tensor_f32(&name("ffn_norm"), &[hidden], &vec![1.0; hidden as usize]);
            if arch == "phi3" {
                // Fused projections: q|k|v in one matrix, gate|up in another.
                let qkv = hidden + 2 * kv;
                let w = weights(hidden * qkv, 0.3);
                b.tensor_f32(&name("attn_qkv"), &[hidden, qkv], &w);
                let w = weights(hidden * 2 * ffn, 0.3);
                b.tensor_f32(&name("ffn_up"), &[hidden, 2 * ffn], &w);
            } else {
                let w = weights(hidden * hidden, 0.3);
                b.tensor_f32(&name("attn_q"), &[hidden, hidden], &w);
                b.tensor_f32(&name("attn_k"), &[hidden, kv], &weights(hidden * kv, 0.3));
                b.tensor_f32(&name("attn_v"), &[hidden, kv], &weights(hidden * kv, 0.3));
                b.tensor_f32(
                    &name("ffn_gate"),
                    &[hidden, ffn],
                    &weights(hidden * ffn, 0.3),
                );
                b.tensor_f32(&name("ffn_up"), &[hidden, ffn], &weights(hidden * ffn, 0.3));
            }
            let w = weights(hidden * hidden, 0.3);
            b.tensor_f32(&name("attn_output"), &[hidden, hidden], &w);
            b.tensor_f32(
                &name("ffn_down"),
                &[ffn, hidden],
                &weights(hidden * ffn, 0.3),
            );
            if arch == "qwen2" {
                let bias = |n: &str| format!("blk.{l}.{n}.bias");
                b.tensor_f32(&bias("attn_q"), &[hidden], &weights(hidden, 0.1));
                b.tensor_f32(&bias("attn_k"), &[kv], &weights(kv, 0.1));
                b.tensor_f32(&bias("attn_v"), &[kv], &weights(kv, 0.1));
            }
            if arch == "gemma3" {
                let ones = vec![1.0; hidden as usize];
                b.tensor_f32(&name("post_attention_norm"), &[hidden], &ones);
                b.tensor_f32(&name("post_ffw_norm"), &[hidden], &ones);
            }
            if arch == "qwen3" || arch == "gemma3" {
                b.tensor_f32(
                    &name("attn_q_norm"),
                    &[head_dim],
                    &vec![1.0; head_dim as usize],
                );
                b.tensor_f32(
                    &name("attn_k_norm"),
                    &[head_dim],
                    &vec![1.0; head_dim as usize],
                );
            }
        }
        b
    }

    /// Gives every norm (`*norm.weight`) deterministic weights between 0.5 and 1.5 instead
    /// of ones, so that a norm applied to the wrong values, or not at all, shows.
    pub fn vary_norms(&mut self) -> &mut Self {
        let mut seed = 7u32;
        for i in 0..self.tensors.len() {
            if self.tensors[i].0.ends_with("norm.weight") {
                let n: u64 = self.tensors[i].1.iter().product();
                let bytes = (0..n)
                    .flat_map(|_| {
                        seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                        (0.5 + (seed >> 8) as f32 / (1u32 << 24) as f32).to_le_bytes()
                    })
                    .collect();
                self.data.insert(i, bytes);
            }
        }
        self
    }

    /// Fills the final norm's weights with NaN: the model loads, and every logit it makes
    /// is NaN (what a corrupt or badly quantized release looks like to a health check).
    pub fn poison_with_nan(&mut self) -> &mut Self {
        if let Some(i) = self
            .tensors
            .iter()
            .position(|(n, _, _)| n == "output_norm.weight")
        {
            let n: u64 = self.tensors[i].1.iter().product();
            let nan = f32::NAN.to_le_bytes();
            self.data.insert(i, (0..n).flat_map(|_| nan).collect());
        }
        self
    }

    /// The file's bytes.
    pub fn build(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.kvs.len() as u64).to_le_bytes());
        for (k, v) in &self.kvs {
            put_str(&mut out, k);
            out.extend_from_slice(v);
        }
        let mut offset = 0u64;
        let mut data_len = 0u64;
        for (i, (name, dims, ty)) in self.tensors.iter().enumerate() {
            put_str(&mut out, name);
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&ty.to_le_bytes());
            let at = match self.offset_override {
                Some((j, o)) if j == i => o,
                _ => offset,
            };
            out.extend_from_slice(&at.to_le_bytes());
            let bytes = tensor_bytes(dims, *ty);
            data_len = offset + bytes;
            offset = (offset + bytes).div_ceil(ALIGN) * ALIGN;
        }
        let data_start = (out.len() as u64).div_ceil(ALIGN) * ALIGN;
        out.resize(data_start as usize, 0);
        let salt = self.salt;
        let start = out.len();
        out.extend((0..data_len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(salt)));
        let mut offset = 0u64;
        for (i, (_, dims, ty)) in self.tensors.iter().enumerate() {
            if let Some(bytes) = self.data.get(&i) {
                let at = start + offset as usize;
                out[at..at + bytes.len()].copy_from_slice(bytes);
            }
            offset = (offset + tensor_bytes(dims, *ty)).div_ceil(ALIGN) * ALIGN;
        }
        out.truncate(out.len().saturating_sub(self.truncate_data_by));
        out
    }
}

/// GPT-2's byte-level alphabet: printable bytes stand for themselves, the others are moved
/// to U+0100 and up.
pub fn byte_level_char(b: u8) -> char {
    crate::tokenizer::byte_chars()[b as usize]
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Bytes of a tensor's data; 0 for shapes the parser refuses anyway.
fn tensor_bytes(dims: &[u64], ty: u32) -> u64 {
    let Some(t) = crate::gguf::GgmlType::from_id(ty) else {
        return 0;
    };
    dims.iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d))
        .filter(|n| *n <= 1 << 32)
        .map_or(0, |n| n / t.block_size() * t.block_bytes())
}
