"""Starting `orionlm serve`: the port (taken, bad, or 0 for a free one), the ready line, the logs."""

import socket
import subprocess
import sys

import httpx
import pytest

pytest.importorskip("uvicorn")

from live_server import KEY, NAME, serve_process  # noqa: E402

from orionlm.cli.serve import default_served_name  # noqa: E402
from orionlm.errors import OrionError  # noqa: E402
from orionlm.serve.launch import bind, listen  # noqa: E402

IN_USE = "port {} is in use on 127.0.0.1: another process listens there; stop it or use --port"


def test_bind_and_listen_refuse_in_one_line():
    """A port another process listens on, a port out of range, an address not of this machine: one line each. Two
    sockets bound with SO_REUSEADDR share a port until one listens; the other's listen then says the port is taken."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(OrionError) as info:
            bind("127.0.0.1", port)
        assert str(info.value) == IN_USE.format(port)
    with pytest.raises(OrionError, match=r"^--port must be between 0 and 65535 \(0: any free port\), got 70000$"):
        bind("127.0.0.1", 70000)
    with pytest.raises(OrionError, match=r"^cannot listen on 203\.0\.113\.9 port 0: .+; check --host and --port$"):
        bind("203.0.113.9", 0)  # TEST-NET-3: an address no machine of ours has
    with bind("127.0.0.1", 0) as first, bind("127.0.0.1", first.getsockname()[1]) as second:
        listen(first, "127.0.0.1")
        with pytest.raises(OrionError) as info:
            listen(second, "127.0.0.1")
        assert str(info.value) == IN_USE.format(first.getsockname()[1])


def test_a_taken_port_is_one_line_and_exit_2(served_model_dir):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        command = [sys.executable, "-m", "orionlm", "serve", str(served_model_dir), "--port", str(port)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout, done.stderr) == (2, "", f"orionlm: error: {IN_USE.format(port)}\n")


def test_ready_only_once_serving(served_model_dir):
    """At --log-level info, uvicorn's startup is logged before the ready line (which was once printed during it,
    before the port listened); at the ready line a client connects at once (no retry), on the port the system
    picked (--port 0); requests leave no access log without --access-log, though uvicorn's own default logs them."""
    log: list[str] = []
    with serve_process(served_model_dir, "--log-level", "info", output=log) as address:
        assert httpx.get(address + "/health").json()["status"] == "ok"
        body = {"model": NAME, "prompt": "def", "max_tokens": 2}
        headers = {"authorization": f"Bearer {KEY}"}
        assert httpx.post(address + "/v1/completions", json=body, headers=headers).status_code == 200
    ready = next(i for i, line in enumerate(log) if "ready on" in line)
    assert "Application startup complete." in log[ready - 1], log
    assert any("Application shutdown complete." in line for line in log[ready + 1 :]), log
    assert not any("HTTP/1.1" in line for line in log), log


@pytest.mark.parametrize("model, name", [("runs/stories", "stories"), ("runs/stories/model/", "stories"),
                                         ("runs/stories/checkpoint-400", "checkpoint-400"),
                                         ("org/tiny-moe", "tiny-moe"), ("org/tiny-moe@v2", "tiny-moe"),
                                         ("model", "model")])  # fmt: skip
def test_the_default_served_name_is_the_run_or_directory(model, name):
    assert default_served_name(model) == name
