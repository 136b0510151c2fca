"""A live `orionlm serve` process on a free loopback port, for the CPU and CUDA server tests."""

import contextlib
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

KEY, NAME = "test-key", "tiny"


@contextlib.contextmanager
def serve_process(model_dir: Path, *options: str) -> Iterator[str]:
    """`orionlm serve` on the model (key KEY, model name NAME, batches of 4, prefill chunks of 16, then
    `options`); yields its address once it says it is ready."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
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
