"""Run ``lragent serve``'s app on a free loopback port in a background thread (a real uvicorn server)."""
from __future__ import annotations

import socket
import threading
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """``with LiveServer(engine) as srv: srv.url`` -- the app served by uvicorn until the block ends."""

    def __init__(self, engine, **app_kw):
        import uvicorn

        from lragent.serve.api.app import create_app

        self.port = free_port()
        self.app = create_app(engine, **app_kw)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError("the server did not come up")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)
