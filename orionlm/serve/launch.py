"""Running the app: the port is bound before the model loads (a taken port is a one-line error at once, not after
minutes of loading), uvicorn serves on that socket, and the ready line is printed only once it accepts
connections (uvicorn's startup, lifespan included, has finished).
"""

from __future__ import annotations

import errno
import logging
import socket
from typing import Any

import uvicorn

from ..errors import OrionError


def _cannot_listen(host: str, port: int, error: OSError) -> OrionError:
    if error.errno == errno.EADDRINUSE:
        return OrionError(f"port {port} is in use on {host}: another process listens there; stop it or use --port")
    return OrionError(f"cannot listen on {host} port {port}: {error.strerror or error}; check --host and --port")


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (port 0: a free one), not yet listening: clients are refused, not kept
    waiting, while the model loads. SO_REUSEADDR as every server sets it, so a restart does not wait out the old
    connections' TIME_WAIT."""
    if not 0 <= port <= 65535:
        raise OrionError(f"--port must be between 0 and 65535 (0: any free port), got {port}")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise _cannot_listen(host, port, e) from None
    return sock


def listen(sock: socket.socket, host: str) -> None:
    """Start listening; with SO_REUSEADDR two bound sockets may share a port until one listens, so a server that
    started on it since `bind` shows here."""
    try:
        sock.listen(2048)  # uvicorn's default backlog
    except OSError as e:
        raise _cannot_listen(host, sock.getsockname()[1], e) from None


def url(host: str, sock: socket.socket) -> str:
    """The server's base URL, with the port the socket has (which --port 0 leaves to the system)."""
    return f"http://{f'[{host}]' if ':' in host else host}:{sock.getsockname()[1]}/v1"


class AnnouncingServer(uvicorn.Server):
    """uvicorn's server, which prints `ready` once its startup has finished: the socket accepts connections."""

    def __init__(self, config: uvicorn.Config, ready: str) -> None:
        super().__init__(config)
        self.ready = ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            print(self.ready, flush=True)


def run(app: Any, sock: socket.socket, host: str, ready: str, log_level: str, access_log: bool) -> None:
    """Serve `app` on the bound socket until interrupted; print `ready` once it accepts connections. uvicorn logs
    at `log_level`; with `access_log`, a line per request (at info, so shown whatever the level)."""
    listen(sock, host)
    config = uvicorn.Config(app, log_level=log_level, access_log=access_log)
    if access_log:
        access = logging.getLogger("uvicorn.access")
        access.setLevel(min(access.level, logging.INFO))
    AnnouncingServer(config, ready).run(sockets=[sock])
