"""`orionlm serve`: the verb that loads a model and runs the HTTP server of orionlm.serve on it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from ..errors import require, split_revision, with_revision
from .common import DType, load_with_tokenizer

LogLevel = Literal["critical", "error", "warning", "info", "debug", "trace"]  # uvicorn's levels

API_KEY_ENV = "ORIONLM_API_KEY"


def default_served_name(model: str) -> str:
    """The model id a server answers to: the directory's name, or the run's name for a run's final model (runs/x
    and runs/x/model are both served as "x"); a Hub id keeps its last part, without a revision."""
    from ..loading import MODEL_DIR  # here: importing the verb's module must not import torch (--help, completion)

    path = Path(split_revision(model)[0].rstrip("/"))
    return path.parent.name if path.name == MODEL_DIR and path.parent.name else path.name


def serve_model(
    model: str,
    /,
    *,
    revision: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 16,
    max_cached_tokens: int | None = None,
    prefill_chunk: int = 512,
    max_request_bytes: int = 2**23,
    max_choices: int = 64,
    api_key: str | None = None,
    served_model_name: str | None = None,
    no_think: bool = False,
    device: str | None = None,
    dtype: DType | None = None,
    log_level: LogLevel = "warning",
    access_log: bool = False,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API with continuous batching.

    Endpoints: /v1/models, /v1/completions, /v1/chat/completions (streaming with SSE), /health, /tokenize,
    /detokenize, /tokenizer_info, /metrics (Prometheus). Prints "ready on URL" once it accepts connections. Needs
    `pip install 'orionlm[serve]'`.

    Example:
      orionlm serve runs/quickstart/model --port 8000
      curl localhost:8000/v1/completions -H 'content-type: application/json' -d '{"model": "model", "prompt": "def"}'

    Args:
        model: a model directory (orionlm, Hugging Face or Auron), a .gguf file or a Hub id
        revision: a branch, tag or commit of the Hub id MODEL (the same as MODEL@REV)
        host: the address to listen on (127.0.0.1: this machine only)
        port: the TCP port (0: any free port, shown in the ready line)
        max_batch: how many requests decode together; more wait in a queue
        max_cached_tokens: the cached-token budget (prompt + max_tokens of the running requests); default
            max_batch x the model's context
        prefill_chunk: prompt tokens prefilled per engine step, so long prompts do not stall running requests
        max_request_bytes: larger request bodies get a 413 before they are read whole
        max_choices: the most completions (prompts x n) one request may ask for; more is a 400
        api_key: require 'Authorization: Bearer KEY' on every route but /health, which load balancers probe
            without a key (as vLLM's); /openapi.json and /metrics included (default: the ORIONLM_API_KEY
            environment variable)
        served_model_name: the model id clients send (default: the directory's name; the run's
            name for runs/x/model)
        no_think: a thinking (Quiet-STaR) model answers without thoughts unless a request sends "think": true
        device: cpu, cuda or cuda:N (default: cuda when available)
        dtype: the weights' dtype in memory: auto (as stored), float32, bfloat16 or float16 (default: float32
            on CPU, bfloat16 on CUDA)
        log_level: uvicorn's log level (warning: only problems; info adds its startup and shutdown)
        access_log: log a line per request (client, method, path, status), whatever the log level
    """
    require("uvicorn", "serve", "orionlm serve")
    from ..generation.engine import Engine
    from ..serve.api import create_app
    from ..serve.launch import bind, run, url
    from ..serve.serving import AsyncEngine, Server

    with bind(host, port) as sock:
        lm, tokenizer = load_with_tokenizer(with_revision(model, revision), "the server", device, dtype)
        name = served_model_name or default_served_name(str(model))
        engine = AsyncEngine(
            Engine(lm, max_batch=max_batch, max_cached_tokens=max_cached_tokens, prefill_chunk=prefill_chunk)
        )
        defaults = dict(getattr(lm, "generation_defaults", None) or {})
        if no_think:
            defaults["think"] = False
        server = Server(engine, tokenizer, name, defaults, max_choices=max_choices)
        app = create_app(server, api_key or os.environ.get(API_KEY_ENV), max_request_bytes=max_request_bytes)
        ready = f"orionlm serve: ready on {url(host, sock)} (model {name!r}, max batch {max_batch})"
        run(app, sock, host, ready, log_level, access_log)
