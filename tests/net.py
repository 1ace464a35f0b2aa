"""Loopback helpers the service tests share: a free port, and an ASGI app served by uvicorn in a
thread (lifespan included) for as long as a `with` block lasts.

    from tests.net import free_port, live_server
    with live_server(create_app(backend)) as url: ...
"""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live_server(app, *, start_timeout_s: float = 60, name: str = "test-server"):
    """Serve `app` on 127.0.0.1:<free port> until the block ends; yields the URL. RuntimeError when
    it has not started (lifespan done) within `start_timeout_s`."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name=name, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the {name} on port {port} did not start (see the log above)")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
