"""The official `openai` client against a running Outpost daemon.

Environment: OUTPOST_URL (…/v1), OUTPOST_TOKEN (a token allowed to run the model),
OUTPOST_FORBIDDEN_TOKEN (a valid token that is not). Prints ALL OK, or fails with a traceback.
"""

import os

import openai
from openai import OpenAI

url = os.environ["OUTPOST_URL"]
client = OpenAI(base_url=url, api_key=os.environ["OUTPOST_TOKEN"], max_retries=0, timeout=300)

# Models
models = client.models.list()
ids = [m.id for m in models.data]
assert "smollm2:1" in ids, ids

# Chat, whole answer. The system message is one whose answer starts without a near-tie (the
# first token leads by more than one logit on every kernel path); with "You are terse." the
# first step was a near-tie ("The" vs "Al", 0.2 to 0.34 apart) that the quantized kernels and
# candle's settled differently, so the answer flipped between "Paris" and "Allez, bonjour".
r = client.chat.completions.create(
    model="smollm2",
    messages=[
        {"role": "system", "content": "Answer in one short sentence."},
        {"role": "user", "content": "What is the capital of France?"},
    ],
    max_tokens=24,
    temperature=0,
    seed=1,
)
assert r.object == "chat.completion", r
assert r.model == "smollm2:1", r.model
choice = r.choices[0]
assert choice.message.role == "assistant"
assert choice.finish_reason in ("stop", "length"), choice.finish_reason
assert "Paris" in choice.message.content, choice.message.content
assert r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 0
assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
whole = choice.message.content

# The same request streamed gives the same text (greedy), ending with usage.
stream = client.chat.completions.create(
    model="smollm2",
    messages=[
        {"role": "system", "content": "Answer in one short sentence."},
        {"role": "user", "content": "What is the capital of France?"},
    ],
    max_tokens=24,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
)
parts, finish, usage = [], None, None
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for c in chunk.choices:
        if c.delta.content:
            parts.append(c.delta.content)
        if c.finish_reason:
            finish = c.finish_reason
assert "".join(parts) == whole, ("".join(parts), whole)
assert finish in ("stop", "length"), finish
assert usage is not None and usage.completion_tokens == r.usage.completion_tokens, usage

# Logprobs
r = client.chat.completions.create(
    model="default",
    messages=[{"role": "user", "content": "Say yes."}],
    max_tokens=3,
    temperature=0,
    logprobs=True,
    top_logprobs=3,
)
content = r.choices[0].logprobs.content
assert len(content) == r.usage.completion_tokens, content
assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content), content

# Legacy completions, with a stop string
r = client.completions.create(model="smollm2", prompt="1, 2, 3, 4,", max_tokens=16, temperature=0, stop=["8"])
assert r.object == "text_completion"
assert "8" not in r.choices[0].text, r.choices[0].text
assert r.choices[0].finish_reason == "stop", r.choices[0].finish_reason

# Completions stream too, and say the same thing.
whole = r.choices[0].text
parts = []
for chunk in client.completions.create(
    model="smollm2", prompt="1, 2, 3, 4,", max_tokens=16, temperature=0, stop=["8"], stream=True
):
    assert chunk.object == "text_completion"
    parts.extend(c.text for c in chunk.choices)
assert "".join(parts) == whole, ("".join(parts), whole)

# Errors come back as the client's own exception types.
try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    raise AssertionError("an unknown model must fail")
except openai.NotFoundError as e:
    assert e.status_code == 404

try:
    client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "x"}], max_tokens=10**9)
    raise AssertionError("an absurd max_tokens must fail")
except openai.BadRequestError as e:
    assert "context window" in str(e), e

bad = OpenAI(base_url=url, api_key="not-a-token", max_retries=0)
try:
    bad.models.list()
    raise AssertionError("a bad token must fail")
except openai.AuthenticationError as e:
    assert e.status_code == 401

forbidden = OpenAI(base_url=url, api_key=os.environ["OUTPOST_FORBIDDEN_TOKEN"], max_retries=0)
try:
    forbidden.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "x"}])
    raise AssertionError("a role without inference:run must be refused")
except openai.PermissionDeniedError as e:
    assert e.status_code == 403

print("ALL OK")
