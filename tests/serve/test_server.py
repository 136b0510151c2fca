"""The server, live: a real `orionlm serve` process on a loopback port, driven by the official openai client."""

import concurrent.futures
import json
import re
import time
from collections.abc import Iterator

import httpx
import pytest
import torch

from orionlm.checkpoint import save_checkpoint
from orionlm.generation import generate_ids
from orionlm.loading import load_model
from orionlm.model import add_thought_tokens

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from live_server import KEY, NAME, metric, parse_metrics, serve_process  # noqa: E402


@pytest.fixture(scope="module")
def server(served_model_dir):
    with serve_process(served_model_dir) as address:
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
    with pytest.raises(openai.BadRequestError) as info:  # (every kind of bad value: BAD_COMPLETIONS below)
        client.completions.create(model=NAME, prompt="x", max_tokens=2, temperature=-1)
    assert info.value.body["message"] == "temperature must be >= 0 (0 means greedy), got -1.0"
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
    with serve_process(tmp_path / "thinking", "--no-think") as address:
        client = openai.OpenAI(base_url=address + "/v1", api_key=KEY, max_retries=0)
        for think in (True, False):
            body = {"think": True} if think else {}
            out = client.completions.create(model=NAME, prompt=ids, max_tokens=12, temperature=0, extra_body=body)
            assert out.choices[0].text == expected[think]
            assert "thought|>" not in out.choices[0].text


HEADERS = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}


def _raw_post(server: str, path: str, body: dict) -> httpx.Response:
    """A POST of the body as ASCII JSON: a lone surrogate travels as the escape "\\ud800", as a client sends it."""
    return httpx.post(server + path, content=json.dumps(body).encode(), headers=HEADERS)


def _is_openai_400(response: httpx.Response) -> bool:
    error = response.json()["error"]
    return response.status_code == 400 and error["type"] == "invalid_request_error" and bool(error["message"])


def test_bad_seeds_are_400s_and_hurt_no_one(client):
    """Seeds a generator cannot take are refused before the engine, while other requests (streaming and not)
    are in flight; each of those gets the text it gets alone."""
    common = dict(model=NAME, max_tokens=40, temperature=0.8, extra_body={"ignore_eos": True})
    others = [dict(prompt=f"value {i} = ", seed=i, stream=i % 2 == 1) for i in range(6)]

    def run(other):
        out = client.completions.create(**common, **other)
        return "".join(c.choices[0].text for c in out) if other["stream"] else out.choices[0].text

    alone = [run(o) for o in others]
    bad = [dict(seed=2**64), dict(seed=2**64 - 1, n=2), dict(seed=2**63), dict(seed=-(2**63) - 1)]
    with concurrent.futures.ThreadPoolExecutor(len(others)) as pool:
        busy = [pool.submit(run, o) for o in others]
        for seed in bad:
            for stream in (False, True):
                with pytest.raises(openai.BadRequestError) as info:
                    client.completions.create(**common, prompt="x", stream=stream, **seed)
                assert "seed" in info.value.body["message"]
        assert [f.result() for f in busy] == alone


HI = [{"role": "user", "content": "hi"}]
BAD_COMPLETIONS = [
    {"prompt": [1, 99999]}, {"prompt": [1, -3]}, {"prompt": "x", "max_tokens": 5000}, {"prompt": "x", "max_tokens": 0},
    {"prompt": "x", "logit_bias": {"99999": 1}}, {"prompt": "x", "logit_bias": {"one": 1}},
    {"prompt": "x", "logit_bias": {"5": 1000}}, {"prompt": "x", "stop": [""]}, {"prompt": [[]]}, {"prompt": []},
    {"prompt": ""}, {"prompt": "x", "temperature": -1}, {"prompt": "x", "top_p": 0}, {"prompt": "x", "top_p": 2},
    {"prompt": "x", "n": 0}, {"prompt": "x", "n": 100}, {"prompt": "x", "seed": 2**64},
    {"prompt": "x", "seed": 2**64 - 1, "n": 2}, {"prompt": "x", "seed": -(2**63) - 1},
    {"prompt": "x", "presence_penalty": 5}, {"prompt": "x", "top_k": -2}, {"prompt": "x", "min_p": 2},
    {"prompt": "x", "repetition_penalty": 0}, {"prompt": "x", "stop_token_ids": [-1]}, {"prompt": "x", "logprobs": 50},
    {"prompt": "a\ud800b"}, {"prompt": "x", "max_tokens": "3"}, {"prompt": "x", "n": True},
    {"prompt": "x", "stream_options": {"include_usage": "yes"}}, {"prompt": ["a", "b", "c"] * 10, "n": 4},
]  # fmt: skip
BAD_CHATS = [
    {"messages": []}, {"messages": [{"role": "user", "content": [{"type": ["text"], "text": "x"}]}]},
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]},
    {"messages": [{"role": "user", "content": "x " * 3000}]}, {"messages": HI, "top_logprobs": 50},
    {"messages": [{"role": "user", "content": "a\ud800"}]}, {"messages": HI, "max_completion_tokens": 0},
    {"messages": HI, "temperature": "hot"}, {"messages": [{"role": "user", "content": 3}]},
    {"messages": HI, "seed": 2**64},
]  # fmt: skip


def test_streams_refuse_bad_input_before_they_start(server):
    """40 kinds of bad request (context too long, bad token ids and logit_bias, out-of-range or mistyped values,
    seeds, lone surrogates, odd content parts, too many choices), each sent streaming and not: the same 400 with
    OpenAI's error body, before any stream starts."""
    cases = [("/v1/completions", {"max_tokens": 2} | case) for case in BAD_COMPLETIONS]
    cases += [("/v1/chat/completions", case) for case in BAD_CHATS]
    assert len(cases) == 40
    for path, case in cases:
        answers = [_raw_post(server, path, {"model": NAME, "stream": stream, **case}) for stream in (False, True)]
        assert all(map(_is_openai_400, answers)), (case, [a.text for a in answers])
        assert answers[0].json() == answers[1].json()


def test_lone_surrogates_and_odd_content_parts_are_400s(server, client):
    surrogate = "a\ud800b"
    assert _is_openai_400(_raw_post(server, "/v1/completions", {"model": NAME, "prompt": surrogate}))
    assert _is_openai_400(_raw_post(server, "/v1/completions", {"model": NAME, "prompt": "x", "stop": [surrogate]}))
    assert _is_openai_400(_raw_post(server, "/v1/completions", {"model": surrogate, "prompt": "x"}))
    chat = {"model": NAME, "messages": [{"role": "user", "content": surrogate}]}
    assert _is_openai_400(_raw_post(server, "/v1/chat/completions", chat))
    assert _is_openai_400(_raw_post(server, "/v1/chat/completions", chat | {"stream": True}))
    assert _is_openai_400(_raw_post(server, "/tokenize", {"prompt": surrogate}))
    assert _is_openai_400(_raw_post(server, "/tokenize", {"messages": chat["messages"]}))
    for kind in (["text"], {"a": 1}, None, 3):
        parts = [{"type": kind, "text": "x"}]
        body = {"model": NAME, "messages": [{"role": "user", "content": parts}]}
        assert _is_openai_400(_raw_post(server, "/v1/chat/completions", body))
    image = [{"type": "image_url", "image_url": {"url": "http://x"}}]
    response = _raw_post(
        server, "/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": image}]}
    )
    assert _is_openai_400(response) and "image_url" in response.json()["error"]["message"]
    text = [{"type": "text", "text": "import json"}]
    assert client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": text}], max_tokens=2)


def test_the_key_guards_everything_but_health(server):
    for path in ("/v1/models", "/openapi.json", "/tokenizer_info", "/metrics"):
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "Bearer t\xe9st".encode("latin-1")}):
            response = httpx.get(server + path, headers=headers)
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(server + path, headers=HEADERS).status_code == 200
    assert "/v1/completions" in httpx.get(server + "/openapi.json", headers=HEADERS).json()["paths"]
    assert httpx.get(server + "/health").status_code == 200


def test_request_limits(served_model_dir):
    """Bodies over --max-request-bytes are 413s, sent whole or in chunks; more than --max-choices is a 400. With
    --access-log at the default log level, the server prints its ready line and a line per request, nothing else."""
    log: list[str] = []
    options = ("--max-request-bytes", "100000", "--max-choices", "8", "--access-log")
    with serve_process(served_model_dir, *options, output=log) as address:
        url = address + "/v1/completions"
        big = json.dumps({"model": NAME, "prompt": "word " * 30_000, "max_tokens": 1}).encode()

        def chunks() -> Iterator[bytes]:  # no Content-Length: the limit counts the bytes as they come
            yield from (big[i : i + 8192] for i in range(0, len(big), 8192))

        for content in (big, chunks()):
            started = time.perf_counter()
            response = httpx.post(url, content=content, headers=HEADERS)
            assert response.status_code == 413 and time.perf_counter() - started < 5
            assert "over this server's limit of 100,000 bytes" in response.json()["error"]["message"]
        many = httpx.post(
            url, headers=HEADERS, json={"model": NAME, "prompt": ["a", "b", "c"], "n": 3, "max_tokens": 1}
        )
        assert many.status_code == 400
        assert "3 prompts x n=3 asks for 9 completions; this server takes at most 8" in many.json()["error"]["message"]
        fits = httpx.post(url, headers=HEADERS, json={"model": NAME, "prompt": ["a", "b"], "n": 4, "max_tokens": 1})
        assert fits.status_code == 200 and len(fits.json()["choices"]) == 8
    access = [re.fullmatch(r'INFO: +127\.0\.0\.1:\d+ - "(.+)" (\d+) [A-Za-z ]+\n', line) for line in log[1:]]
    assert "ready on" in log[0] and all(access), log
    assert [m.groups() for m in access] == [("POST /v1/completions HTTP/1.1", s) for s in ("413", "413", "400", "200")]


def test_a_big_request_does_not_starve_a_small_one(server, client):
    """Rows are shared fairly between requests: a small request sent while 4 prompts x n=8 (32 rows of 30 tokens,
    8 waves on this server's 4 rows) runs, starts at the next free row and returns first, though it asks for more
    tokens (first come first served would start it after all 32 and finish it last)."""
    common = dict(model=NAME, temperature=0.8, seed=1, extra_body={"ignore_eos": True})
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        big = pool.submit(client.completions.create, prompt=["a", "b", "c", "d"], n=8, max_tokens=30, **common)
        while not httpx.get(server + "/health").json()["running"]:
            time.sleep(0.01)
        small = client.completions.create(prompt="x = ", max_tokens=40, **common)
        assert not big.done()
        assert small.choices[0].finish_reason == "length" and len(big.result().choices) == 32


def _scrape(server: str) -> dict[tuple[str, frozenset], float]:
    response = httpx.get(server + "/metrics", headers=HEADERS)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse_metrics(response.text)


HISTOGRAMS = ["time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds"]


def test_metrics_count_requests_tokens_and_latencies(server, client):
    """After a completion, a completion of 2 prompts x n=2, a streamed chat and a 404, /metrics (Prometheus' text
    format) has grown by exactly those requests per endpoint and status, the prompt and generated tokens the
    responses' usage reports, and one time to first token and end-to-end latency per sequence (6) and an
    inter-token latency per later token (33 - 6); each sequence's end-to-end time is its first token's time plus
    the gaps after it."""
    before = _scrape(server)
    common = dict(model=NAME, temperature=0, extra_body={"ignore_eos": True})
    one = client.completions.create(prompt="def ", max_tokens=7, **common)
    two = client.completions.create(prompt=["import", "x = 1"], n=2, max_tokens=5, **common)
    chat = list(client.chat.completions.create(messages=HI, max_tokens=6, stream=True,
                                               stream_options={"include_usage": True}, **common))  # fmt: skip
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=1)
    after = _scrape(server)

    def grew(name: str, **labels: str) -> float:
        return metric(after, "orionlm:" + name, **labels) - metric(before, "orionlm:" + name, **labels)

    assert grew("http_requests_total", endpoint="/v1/completions", status="200") == 2
    assert grew("http_requests_total", endpoint="/v1/completions", status="404") == 1
    assert grew("http_requests_total", endpoint="/v1/chat/completions", status="200") == 1
    assert grew("http_requests_total", endpoint="/metrics", status="200") == 1  # the first scrape
    usages = [one.usage, two.usage, chat[-1].usage]
    model = {"model_name": NAME}
    assert grew("prompt_tokens_total", **model) == sum(u.prompt_tokens for u in usages)
    assert grew("generation_tokens_total", **model) == sum(u.completion_tokens for u in usages) == 7 + 4 * 5 + 6
    counts = {h: grew(h + "_count", **model) for h in HISTOGRAMS}
    assert counts == {HISTOGRAMS[0]: 6, HISTOGRAMS[1]: 33 - 6, HISTOGRAMS[2]: 6}
    sums = [grew(h + "_sum", **model) for h in HISTOGRAMS]
    assert sums[0] > 0 and sums[2] == pytest.approx(sums[0] + sums[1], rel=1e-9)
    for h in HISTOGRAMS:
        buckets = sorted((float(dict(labels)["le"]), value) for (name, labels), value in after.items()
                         if name == f"orionlm:{h}_bucket")  # fmt: skip
        assert [v for _, v in buckets] == sorted(v for _, v in buckets)  # cumulative
        assert buckets[-1] == (float("inf"), metric(after, f"orionlm:{h}_count", **model))
    assert [metric(after, f"orionlm:num_requests_{queue}", **model) for queue in ("running", "waiting")] == [0, 0]


def test_metrics_show_the_queues(server, client):
    """While 3 prompts x n=4 share this server's 4 rows, /metrics shows at most 4 sequences running, at some point
    4 running with others waiting, never more than the 12 in all."""
    model = {"model_name": NAME}
    seen = set()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        big = pool.submit(client.completions.create, model=NAME, prompt=["a", "b", "c"], n=4, max_tokens=40,
                          temperature=0.8, seed=1, extra_body={"ignore_eos": True})  # fmt: skip
        while not big.done():
            samples = _scrape(server)
            seen.add(
                tuple(metric(samples, f"orionlm:num_requests_{queue}", **model) for queue in ("running", "waiting"))
            )
        assert len(big.result().choices) == 12
    assert all(running <= 4 and running + waiting <= 12 for running, waiting in seen)
    assert any(running == 4 and waiting > 0 for running, waiting in seen), seen
