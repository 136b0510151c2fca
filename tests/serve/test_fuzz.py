"""Random request bodies against the app in this process: whatever a body holds, the answer is a success or
a 4xx with OpenAI's error body, never a 5xx. (That a bad request leaves the requests beside it untouched is
tests/serve/test_server.py's bad-seed test.)"""

import json

import pytest

hypothesis = pytest.importorskip("hypothesis")
pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from orionlm.generation.engine import Engine  # noqa: E402
from orionlm.loading import load_model  # noqa: E402
from orionlm.serve.api import create_app  # noqa: E402
from orionlm.serve.serving import AsyncEngine, Server  # noqa: E402

NAME = "tiny"
TEXT = st.text(st.characters(exclude_categories=()), max_size=20)  # lone surrogates too ("\ud800")
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False) | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
SAMPLING = ["max_tokens", "temperature", "top_p", "n", "stop", "seed", "logit_bias", "presence_penalty",
            "frequency_penalty", "logprobs", "top_logprobs", "top_k", "min_p", "repetition_penalty",
            "stop_token_ids", "ignore_eos", "stream", "echo", "user", "think"]  # fmt: skip
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool", "x"]) | JSON,
     "content": TEXT | st.lists(st.fixed_dictionaries({"type": JSON, "text": JSON}), max_size=2) | JSON}
)  # fmt: skip


def bodies(prompt_key: str, prompt: st.SearchStrategy) -> st.SearchStrategy:
    fields = st.dictionaries(st.sampled_from(SAMPLING), JSON | st.integers(0, 40) | st.floats(0, 2), max_size=5)
    base = st.fixed_dictionaries({"model": st.just(NAME) | JSON, prompt_key: prompt})
    return st.tuples(base, fields).map(lambda pair: {**pair[0], **pair[1]})


COMPLETIONS = bodies("prompt", TEXT | st.lists(st.integers(-5, 600), max_size=8) | JSON)
CHAT = bodies("messages", st.lists(MESSAGE, max_size=3) | JSON)


@pytest.fixture(scope="module")
def client(served_model_dir):
    model, tokenizer, _ = load_model(served_model_dir, device="cpu")
    server = Server(AsyncEngine(Engine(model, max_batch=4, prefill_chunk=16)), tokenizer, NAME, {})
    with TestClient(create_app(server)) as client:
        yield client


def post(client, url: str, body) -> None:
    """Send `body` as JSON (ASCII escapes, so lone surrogates travel as a client can send them) and check that
    the answer is a success or a 4xx with OpenAI's error body."""
    response = client.post(url, content=json.dumps(body), headers={"content-type": "application/json"})
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"] and "type" in error


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=COMPLETIONS)
def test_completions_bodies(client, body):
    post(client, "/v1/completions", body if "max_tokens" in body else {**body, "max_tokens": 2})


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=CHAT)
def test_chat_bodies(client, body):
    post(client, "/v1/chat/completions", body)
