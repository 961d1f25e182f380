"""Drives a running `attune serve` with the official openai client; exits non-zero on failure.

Usage: python3 openai_client.py BASE_URL   (run by tests/openai_client.rs)
"""

import sys

import openai

base = sys.argv[1]
client = openai.OpenAI(base_url=base + "/v1", api_key="unused")
model = client.models.list().data[0].id

# Chat, greedy, with logprobs.
chat = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Say hello."}],
    max_tokens=8,
    temperature=0,
    logprobs=True,
    top_logprobs=2,
)
choice = chat.choices[0]
assert chat.object == "chat.completion", chat
assert choice.message.role == "assistant"
assert choice.message.content, chat
assert choice.finish_reason in ("stop", "length")
assert len(choice.logprobs.content) >= 1
assert len(choice.logprobs.content[0].top_logprobs) == 2
assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens

# Streaming chat with usage gives the same text.
stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Say hello."}],
    max_tokens=8,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
)
pieces, usage = [], None
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for c in chunk.choices:
        if c.delta.content:
            pieces.append(c.delta.content)
assert "".join(pieces) == choice.message.content, (pieces, choice.message.content)
assert usage is not None and usage.completion_tokens == chat.usage.completion_tokens

# Completions, with n and a seed.
comp = client.completions.create(model=model, prompt="The sky is", max_tokens=5, n=2, seed=7, temperature=0.8)
assert [c.index for c in comp.choices] == [0, 1]
again = client.completions.create(model=model, prompt="The sky is", max_tokens=5, n=2, seed=7, temperature=0.8)
assert [c.text for c in comp.choices] == [c.text for c in again.choices], "same seed, same samples"

# Interventions through extra_body, echoed back with defaults filled in.
steered = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Say hello."}],
    max_tokens=8,
    temperature=0,
    extra_body={"interventions": [{"type": "zerotuning", "gamma": 1.0}]},
)
assert steered.choices[0].message.content == choice.message.content, "gamma=1 is a no-op"
echoed = steered.model_extra["interventions"]
assert echoed[0]["type"] == "zerotuning" and echoed[0]["gamma"] == 1.0, echoed

# Errors surface as the client's typed exceptions.
try:
    client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "x"}],
        extra_body={"interventions": [{"type": "zerotuning", "gamma": 0}]},
    )
    raise AssertionError("expected a 400")
except openai.BadRequestError as e:
    assert e.status_code == 400
    assert e.body["param"] == "interventions[0].gamma", e.body
try:
    client.chat.completions.create(model="missing", messages=[{"role": "user", "content": "x"}])
    raise AssertionError("expected a 404")
except openai.NotFoundError as e:
    assert e.body["code"] == "model_not_found", e.body

# The OpenAPI document is a valid OpenAPI 3.1 description of every route.
import json
import urllib.request

from openapi_spec_validator import validate

spec = json.load(urllib.request.urlopen(base + "/openapi.json"))
validate(spec)
for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/interventions", "/health", "/metrics"):
    assert path in spec["paths"], path
variants = spec["components"]["schemas"]["Intervention"]["oneOf"]
assert any(v["properties"]["type"]["const"] == "zerotuning" for v in variants)

print("openai client: all checks passed")
