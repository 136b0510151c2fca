"""`orionlm serve`: an OpenAI-compatible HTTP server over the continuous-batching engine.

Needs the `serve` extra (FastAPI and uvicorn): `pip install orionlm[serve]`.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import OrionError

API_KEY_ENV = "ORIONLM_API_KEY"


def serve(
    model: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 16,
    max_cached_tokens: int | None = None,
    prefill_chunk: int = 512,
    api_key: str | None = None,
    served_model_name: str | None = None,
    device: str | None = None,
) -> None:
    """Load the model and serve it until interrupted."""
    try:
        import uvicorn

        from .app import AsyncEngine, Server, create_app
    except ImportError as e:
        raise OrionError(
            f"serving needs FastAPI and uvicorn ({e.name} is missing): pip install 'orionlm[serve]'"
        ) from None
    from ..generation.batching import Engine
    from ..loading import load_model

    lm, tokenizer, _ = load_model(model, device=device)
    if tokenizer is None:
        raise OrionError(f"{model} has no tokenizer.json; the server needs one")
    name = served_model_name or Path(str(model)).name
    engine = AsyncEngine(Engine(lm, max_batch, max_cached_tokens, prefill_chunk))
    server = Server(engine, tokenizer, name, getattr(lm, "generation_defaults", None))
    ready = f"orionlm serve: ready on http://{host}:{port}/v1 (model {name!r}, max batch {max_batch})"
    app = create_app(server, api_key or os.environ.get(API_KEY_ENV), ready)
    uvicorn.run(app, host=host, port=port, log_level="warning")
