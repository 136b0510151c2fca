"""The engine thread of the server (serving.AsyncEngine), in this process: what reaches each request's queue."""

import asyncio

import pytest

pytest.importorskip("fastapi")

from orionlm.generation.engine import Engine, Request  # noqa: E402
from orionlm.generation.sampling import GenerationConfig  # noqa: E402
from orionlm.generation.text import generate_ids  # noqa: E402
from orionlm.loading import load_model  # noqa: E402
from orionlm.serve.serving import AsyncEngine  # noqa: E402


async def _tokens(engine: AsyncEngine, requests: list[Request], break_after: int | None = None) -> list | Exception:
    """Each request's tokens as they arrive, or the exception its queue receives. With `break_after`, the requests'
    sampling breaks once one has that many tokens (top_k -1, past validation: torch.topk refuses it)."""
    events = engine.submit(requests)
    tokens = {r.id: [] for r in requests}
    left = len(requests)
    while left:
        event = await events.get()
        if isinstance(event, Exception):
            return event
        tokens[event.request.id].append(event.token)
        if len(tokens[event.request.id]) == break_after:
            event.request.config.top_k = -1
        left -= event.finish_reason is not None
    return [tokens[r.id] for r in requests]


def test_an_error_in_one_requests_token_pick_fails_it_alone(served_model_dir):
    """A request whose sampling breaks mid-generation gets the error; a group of 3 sampling beside it in the same
    decode passes gets every token it gets alone."""
    model, _, _ = load_model(served_model_dir, device="cpu")
    config = GenerationConfig(max_new_tokens=60, temperature=0.9, seed=3)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    alone = [generate_ids(model, [p], config=config)[0] for p in prompts]
    engine = AsyncEngine(Engine(model, max_batch=4))
    engine.start()

    async def both() -> list:
        bad = Request([5, 6, 7], config.replace())
        return await asyncio.gather(_tokens(engine, [Request(p, config) for p in prompts]), _tokens(engine, [bad], 3))

    try:
        good, bad = asyncio.run(both())
    finally:
        engine.stop()
    assert good == alone
    assert isinstance(bad, RuntimeError) and "out of range" in str(bad)
    assert not engine.engine.has_work and engine.engine.cache.rows == 0
