"""The OpenAI-compatible HTTP server (``lragent serve``): every role of the bundle is a model, all served from one
shared cache. ``create_app(engine)`` builds the FastAPI app; ``serve/api/cli.py`` runs it under uvicorn.

    protocol.py   request parsing and validation (OpenAI / vLLM field names), response and chunk shapes
    errors.py     OpenAI-style error bodies: {"error": {"message", "type", "param", "code"}}
    metrics.py    Prometheus metrics
    app.py        the endpoints
"""
