"""`orionlm serve --device cuda` answering the official openai client: a live server process on a loopback port
(as tests/serve runs one on the CPU), its greedy completions equal to the same engine run in this process on the
same device and dtype (bf16: the server's batch and prefill chunk give the same products, so the same tokens)."""

import contextlib
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from orionlm import load_model
from orionlm.generation import Engine, GenerationConfig, Request

pytestmark = pytest.mark.cuda

KEY, NAME, MAX_BATCH, PREFILL_CHUNK = "test-key", "tiny", 4, 16


@contextlib.contextmanager
def serving(model_dir: Path, device: torch.device) -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "orionlm", "serve", str(model_dir), "--port", str(port), "--api-key", KEY,
               "--served-model-name", NAME, "--max-batch", str(MAX_BATCH), "--prefill-chunk", str(PREFILL_CHUNK),
               "--device", str(device)]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = process.stdout.readline()
    assert "ready" in line, line + process.stdout.read()
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        process.wait(timeout=20)


def local_greedy(model_dir: Path, device: torch.device, prompt_ids: list[int], max_tokens: int) -> str:
    """The server's engine settings, in this process: the tokens the server must send."""
    model, tokenizer, _ = load_model(model_dir, device=device)
    engine = Engine(model, MAX_BATCH, None, PREFILL_CHUNK)
    greedy = GenerationConfig(max_new_tokens=max_tokens, do_sample=False)
    request = Request(prompt_ids, greedy, frozenset([tokenizer.eos_id]))
    engine.submit(request)
    while engine.has_work:
        engine.step()
    return tokenizer.decode([t for t in request.output if t != tokenizer.eos_id])


def test_server_on_gpu_answers_the_openai_client(served_model_dir, device):
    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    _, tokenizer, _ = load_model(served_model_dir, device="cpu")
    prompt = "def dumps(obj"
    messages = [{"role": "user", "content": "import json"}]
    chat_ids = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True),
                                add_special_tokens=False)  # fmt: skip
    expected = local_greedy(served_model_dir, device, tokenizer.encode(prompt), 20)
    expected_chat = local_greedy(served_model_dir, device, chat_ids, 15)
    with serving(served_model_dir, device) as address:
        client = openai.OpenAI(base_url=address, api_key=KEY, max_retries=0)
        assert [m.id for m in client.models.list().data] == [NAME]
        out = client.completions.create(model=NAME, prompt=prompt, max_tokens=20, temperature=0)
        chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=15, temperature=0,
                                                     stream=True))  # fmt: skip
    assert out.choices[0].text == expected and 0 < out.usage.completion_tokens <= 20
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected_chat
