"""`orionlm serve --device cuda` answering the official openai client: a live server process on a loopback port
(as tests/serve runs one on the CPU), its greedy completions equal to the same engine run in this process on the
same device and dtype (bf16: the server's batch and prefill chunk give the same products, so the same tokens)."""

from pathlib import Path

import pytest
import torch
from live_server import KEY, NAME, serve_process

from orionlm import load_model
from orionlm.generation import Engine, GenerationConfig, Request

pytestmark = pytest.mark.cuda

MAX_BATCH, PREFILL_CHUNK = 4, 16  # as live_server.serve_process starts it


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
    with serve_process(served_model_dir, "--device", str(device)) as address:
        client = openai.OpenAI(base_url=address + "/v1", api_key=KEY, max_retries=0)
        assert [m.id for m in client.models.list().data] == [NAME]
        out = client.completions.create(model=NAME, prompt=prompt, max_tokens=20, temperature=0)
        chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=15, temperature=0,
                                                     stream=True))  # fmt: skip
    assert out.choices[0].text == expected and 0 < out.usage.completion_tokens <= 20
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected_chat
