"""The server, live: a real `orionlm serve` process on a loopback port, driven by the official openai client."""

import concurrent.futures
import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from orionlm.checkpoint import save_checkpoint
from orionlm.generation import generate_ids
from orionlm.loading import load_model
from orionlm.train.quietstar import add_thought_tokens

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

KEY = "test-key"
NAME = "tiny"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _serve(model_dir: Path, *options: str) -> Iterator[str]:
    """A live `orionlm serve` process on the model; yields its address."""
    port = _free_port()
    command = [sys.executable, "-m", "orionlm", "serve", str(model_dir), "--port", str(port), "--api-key", KEY,
               "--served-model-name", NAME, "--max-batch", "4", "--prefill-chunk", "16", *options]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = process.stdout.readline()
    assert "ready" in line, line + process.stdout.read()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=20)


@pytest.fixture(scope="module")
def server(served_model_dir):
    with _serve(served_model_dir) as address:
        yield address


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def local(served_model_dir):
    model, tokenizer, _ = load_model(served_model_dir)
    return model, tokenizer


def _expected(local, prompt_ids: list[int], max_tokens: int) -> str:
    model, tokenizer = local
    ids = generate_ids(
        model, [prompt_ids], max_new_tokens=max_tokens, do_sample=False, stop_token_ids=[tokenizer.eos_id]
    )
    return tokenizer.decode([t for t in ids[0] if t != tokenizer.eos_id])


def test_models_and_auth(server, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    response = httpx.get(server + "/v1/models")
    assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
    assert httpx.get(server + "/health").json()["status"] == "ok"  # health needs no key


def test_greedy_completion_equals_generate(client, local):
    _, tokenizer = local
    prompt = "def dumps(obj"
    out = client.completions.create(model=NAME, prompt=prompt, max_tokens=20, temperature=0)
    assert out.choices[0].text == _expected(local, tokenizer.encode(prompt), 20)
    assert out.usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert out.usage.completion_tokens == 20 and out.usage.total_tokens == out.usage.prompt_tokens + 20
    assert out.choices[0].finish_reason == "length"


def test_chat_and_streaming(client, local):
    _, tokenizer = local
    messages = [{"role": "user", "content": "import json"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    expected = _expected(local, tokenizer.encode(text, add_special_tokens=False), 15)
    full = client.chat.completions.create(model=NAME, messages=messages, max_tokens=15, temperature=0)
    assert full.choices[0].message.content == expected and full.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=15, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))  # fmt: skip
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    streamed = client.completions.create(model=NAME, prompt="class ", max_tokens=10, temperature=0, stream=True)
    plain = client.completions.create(model=NAME, prompt="class ", max_tokens=10, temperature=0)
    assert "".join(c.choices[0].text for c in streamed) == plain.choices[0].text


def test_n_seeds_and_stop_strings(client):
    def sample(seed):
        out = client.completions.create(model=NAME, prompt="def ", max_tokens=12, temperature=1.0, n=3, seed=seed)
        return [c.text for c in out.choices]

    first = sample(5)
    assert sample(5) == first and len(set(first)) > 1 and sample(6) != first
    text = client.completions.create(model=NAME, prompt="def ", max_tokens=30, temperature=0).choices[0].text
    stop = text[5:8]
    cut = client.completions.create(model=NAME, prompt="def ", max_tokens=30, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_echo_logprobs_on_token_ids(client, local):
    """lm-evaluation-harness scores choices this way: token-id prompt, echo, logprobs, max_tokens 1."""
    model, _ = local
    prompt = [5, 77, 123, 9, 300, 41]
    out = client.completions.create(model=NAME, prompt=prompt, max_tokens=1, temperature=0, echo=True, logprobs=2)
    lp = out.choices[0].logprobs
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([prompt])).logits[0], -1)
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(prompt) + 1
    for i in range(1, len(prompt)):
        assert lp.token_logprobs[i] == pytest.approx(expected[i - 1, prompt[i]].item(), abs=1e-4)
    assert lp.token_logprobs[-1] == pytest.approx(expected[-1].max().item(), abs=1e-4)  # the greedy token
    assert len(lp.top_logprobs[-1]) == 2


def test_errors_are_openai_errors(server, client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    for bad in (dict(temperature=-1), dict(max_tokens=5000), dict(top_p=0), dict(logit_bias={"99999": 1})):
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model=NAME, prompt="x", **{"max_tokens": 2, **bad})
        assert info.value.body["message"]
    headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    response = httpx.post(server + "/v1/completions", content=b"{not json", headers=headers)
    assert response.status_code == 400 and response.json()["error"]["message"] == "the request body is not valid JSON"
    response = httpx.post(server + "/v1/chat/completions", json={"model": NAME, "messages": []}, headers=headers)
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"
    assert client.completions.create(model=NAME, prompt="x", max_tokens=2).choices  # still serving


def test_batching_does_not_change_results(client, local):
    _, tokenizer = local
    prompt = "json.loads("
    expected = _expected(local, tokenizer.encode(prompt), 16)
    others = [f"value {i} = " * (i + 1) for i in range(8)]
    with concurrent.futures.ThreadPoolExecutor(9) as pool:
        busy = [pool.submit(client.completions.create, model=NAME, prompt=p, max_tokens=40, temperature=0.8, seed=i)
                for i, p in enumerate(others)]  # fmt: skip
        mine = pool.submit(client.completions.create, model=NAME, prompt=prompt, max_tokens=16, temperature=0)
        assert mine.result().choices[0].text == expected
        assert all(f.result().choices[0].finish_reason in ("stop", "length") for f in busy)


def test_load_and_disconnects_free_slots(server, client):
    """200 requests of mixed lengths at concurrency 16 all succeed; streams dropped midway free their rows."""

    def one(i):
        prompt = "x = " + "1, " * (i % 37)
        return client.completions.create(model=NAME, prompt=prompt, max_tokens=1 + i % 13, temperature=0.5, seed=i)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(200)))
    assert all(r.choices[0].finish_reason in ("stop", "length") for r in results)
    headers = {"authorization": f"Bearer {KEY}"}
    cancelled = httpx.get(server + "/health").json()["cancelled"]
    body = {"model": NAME, "prompt": "def", "max_tokens": 1900, "ignore_eos": True, "stream": True}
    for _ in range(3):
        with httpx.stream("POST", server + "/v1/completions", json=body, headers=headers) as response:
            next(response.iter_lines())  # one chunk, then hang up
    with pytest.raises(httpx.ReadTimeout):  # a client that gives up waiting for a whole answer
        httpx.post(server + "/v1/completions", json=body | {"stream": False}, headers=headers, timeout=0.5)
    deadline = time.time() + 10
    while httpx.get(server + "/health").json()["running"] and time.time() < deadline:
        time.sleep(0.1)
    health = httpx.get(server + "/health").json()
    assert health == {"status": "ok", "running": 0, "waiting": 0, "cancelled": cancelled + 4}  # none ran to its end


def test_tokenize_detokenize(server, local):
    _, tokenizer = local
    headers = {"authorization": f"Bearer {KEY}"}
    out = httpx.post(server + "/tokenize", json={"prompt": "import os"}, headers=headers).json()
    assert out["tokens"] == tokenizer.encode("import os") and out["count"] == len(out["tokens"])
    back = httpx.post(server + "/detokenize", json={"tokens": out["tokens"]}, headers=headers).json()
    assert back["prompt"] == "import os"
    info = httpx.get(server + "/tokenizer_info", headers=headers).json()
    assert info["vocab_size"] == tokenizer.vocab_size and info["eos_token"] == tokenizer.eos_token


def test_a_thinking_model_thinks_unless_told_not_to(served_model_dir, tmp_path):
    """A Quiet-STaR model served with --no-think: a request's "think": true gives the tokens of generation with
    thoughts, the default those of its base predictions; the meta tokens never reach the text."""
    model, tokenizer, _ = load_model(served_model_dir)
    model = add_thought_tokens(model, tokenizer, n_ahead=5)
    torch.nn.init.normal_(model.thinking.mixing_head[-1].weight, std=1.0)
    save_checkpoint(model, tmp_path / "thinking", tokenizer, generation_config={})
    ids = tokenizer.encode("import json")
    expected = {
        think: tokenizer.decode(generate_ids(model, [ids], max_new_tokens=12, do_sample=False, think=think)[0])
        for think in (True, False)
    }
    assert expected[True] != expected[False]
    with _serve(tmp_path / "thinking", "--no-think") as address:
        client = openai.OpenAI(base_url=address + "/v1", api_key=KEY, max_retries=0)
        for think in (True, False):
            body = {"think": True} if think else {}
            out = client.completions.create(model=NAME, prompt=ids, max_tokens=12, temperature=0, extra_body=body)
            assert out.choices[0].text == expected[think]
            assert "thought|>" not in out.choices[0].text
