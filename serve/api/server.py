"""``lragent serve``: build the engine, then run the OpenAI-compatible app under uvicorn (SIGTERM drains)."""
from __future__ import annotations

import logging
import signal
import sys


def run_server(engine, *, host: str, port: int, api_key: str | None, max_queue: int | None, drain_s: float,
               log_level: str = "info") -> int:
    """Serve until SIGINT/SIGTERM; requests in flight get up to ``drain_s`` seconds to finish. Exit code 0."""
    import uvicorn

    from .app import create_app

    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(engine, api_key=api_key, max_queue=max_queue, drain_s=drain_s)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=drain_s,
                            access_log=False)
    server = uvicorn.Server(config)
    # uvicorn drains on SIGTERM, then re-raises the signal under the handler it found: make that one a no-op so a
    # drained shutdown exits 0 (what service managers expect)
    signal.signal(signal.SIGTERM, lambda *_: None)
    print(f"lragent serve: {len(engine.roles)} roles ({', '.join(engine.roles)}) + base model "
          f"{app.state.base_name!r}, mode {engine.mode}, on http://{host}:{port}/v1", file=sys.stderr, flush=True)
    server.run()
    return 0
