"""The endpoints of ``lragent serve``: vLLM's OpenAI server shapes, every role a model, one shared cache.

Handlers only parse, enqueue into the :class:`EngineLoop` and read their request's stream; one loop thread steps
the engine for everyone (continuous batching across roles). A client that disconnects aborts its request.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from lragent.bundle import BundleError

from ..config import ServeError
from ..loop import EngineDead, EngineLoop, QueueFull
from ..tokens import NoChatTemplate, render_chat
from . import protocol as P
from .errors import ApiError, error_response
from .metrics import Metrics

log = logging.getLogger("lragent.serve")
OPEN_PATHS = ("/health", "/metrics", "/docs", "/openapi.json")


def base_model_name(engine) -> str:
    """The model id of the base model without adapters (its directory name, unless a role has that name)."""
    name = (engine.bundle.base or {}).get("name") or Path(engine.base_dir).name
    return name if name not in engine.adapters.index else f"{name}-base"


def create_app(engine, *, api_key: str | None = None, max_queue: int | None = None, drain_s: float = 30.0,
               served_base: bool = True) -> FastAPI:
    """The FastAPI app serving ``engine``: starts its loop on startup, drains it (up to ``drain_s``) on shutdown."""
    base_name = base_model_name(engine)
    if served_base:
        engine.add_base_role(base_name)
    state = {"loop": None, "metrics": None}

    def on_output(o):
        if o.finished and o.completion is not None:
            state["metrics"].finished(o.completion)
            s = o.completion.stats
            log.info("request %s role=%s prompt=%d cached=%d (from other roles %d) generated=%d ttft=%.1fms "
                     "e2e=%.1fms finish=%s", o.request_id, o.role, s.prompt_tokens, s.reused_tokens,
                     s.reused_from_other_roles, s.generated_tokens, s.ttft_s * 1e3, s.latency_s * 1e3,
                     o.completion.finish_reason)

    @asynccontextmanager
    async def lifespan(app):
        loop = state["loop"] = EngineLoop(engine, max_queue=max_queue, on_output=on_output).start()
        state["metrics"] = Metrics(engine, loop)
        yield
        await asyncio.get_running_loop().run_in_executor(None, loop.stop, drain_s)

    app = FastAPI(title="lragent", lifespan=lifespan)
    app.state.engine, app.state.base_name = engine, base_name

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if api_key and not request.url.path.startswith(OPEN_PATHS):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return error_response(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return exc.response()

    @app.exception_handler(Exception)
    async def internal(request, exc: Exception):
        log.exception("internal error")
        return error_response(500, f"internal error: {type(exc).__name__}")

    async def body_of(request: Request):
        try:
            return json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({str(e).splitlines()[0]})") from None

    def role_of(model) -> str:
        if not isinstance(model, str) or model not in engine.adapters.index:
            raise ApiError(404, f"The model `{model}` does not exist (models: {', '.join(model_ids())})",
                           param="model", code="model_not_found")
        return model

    def model_ids() -> list[str]:
        return list(engine.roles) + ([base_name] if served_base else [])

    def loop() -> EngineLoop:
        lp = state["loop"]
        if lp is None or not lp.alive:
            raise ApiError(503, "the engine is not running" + (f": {lp.error_text}" if lp and lp.error_text else ""))
        return lp

    # -- info ------------------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        lp = state["loop"]
        if lp is None or not lp.alive:
            return error_response(503, "the engine loop is not running")
        return JSONResponse({"status": "ok"})

    async def off_loop(fn, *args):
        """Run ``fn`` (which may wait for the engine lock, held during a step) off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    @app.get("/metrics")
    async def metrics():
        return Response(await off_loop(state["metrics"].render),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        created = int(time.time())
        card = {"object": "model", "created": created, "owned_by": "lragent",
                "max_model_len": engine.cfg.max_position_embeddings, "permission": []}
        data = [{"id": r, **card, "root": str(engine.bundle.root), "parent": base_name} for r in engine.roles]
        if served_base:
            data.append({"id": base_name, **card, "root": str(engine.base_dir), "parent": None})
        return {"object": "list", "data": data}

    # -- generation -----------------------------------------------------------------------------------------
    def prompt_ids(req: P.GenRequest, role: str) -> list[int]:
        try:
            if req.kind == "chat":
                speaker = "assistant" if role == base_name else role
                return render_chat(engine.tokenizer, req.messages, speaker)
            return engine.encode(req.prompt) if isinstance(req.prompt, str) else list(req.prompt)
        except NoChatTemplate as e:
            raise ApiError(400, f"{e}: use /v1/completions with a text prompt") from None
        except ServeError as e:
            raise ApiError(400, str(e)) from None

    def submit(req: P.GenRequest, role: str, ids: list[int]):
        limit = engine.cfg.max_position_embeddings
        max_new = req.sampling["max_new_tokens"]
        if max_new is None:   # chat without max_tokens: the rest of the context (and of the cache pool)
            max_new = max(1, min(limit, engine.num_blocks * engine.block_size) - len(ids))
        if len(ids) + max_new > limit:
            raise ApiError(400, f"This model's maximum context length is {limit} tokens; the request has "
                                f"{len(ids)} prompt tokens and asks for {max_new} more", param="max_tokens",
                           code="context_length_exceeded")
        params = req.params(max_new)
        if req.logprobs is not None:
            params.logprobs = req.logprobs
        try:
            return loop().submit(ids, role, params, asyncio_loop=asyncio.get_running_loop())
        except QueueFull as e:
            raise ApiError(429, f"server busy: {e}; retry later", headers={"Retry-After": "1"}) from None
        except EngineDead as e:
            raise ApiError(503, str(e)) from None
        except ServeError as e:
            raise ApiError(400, str(e)) from None

    async def run(request: Request, req: P.GenRequest):
        role = role_of(req.model)
        ids = prompt_ids(req, role)
        stream = submit(req, role, ids)
        if req.stream:
            return StreamingResponse(sse(req, stream), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await collect(request, req, stream)

    async def collect(request: Request, req: P.GenRequest, stream):
        ids, lps, last = [], [], None

        async def consume():
            nonlocal last
            async for o in stream:
                ids.extend(o.new_token_ids)
                lps.extend(o.new_logprobs)
                last = o
        task = asyncio.ensure_future(consume())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.25)
                if done:
                    task.result()
                    break
                if await request.is_disconnected():
                    state["loop"].abort(stream.request_id)
                    task.cancel()
                    return Response(status_code=499)
        except EngineDead as e:
            raise ApiError(503, str(e)) from None
        c = last.completion
        tok = engine.tokenizer
        if req.kind == "completion":
            lp = P.completion_logprobs(tok, lps, ids, 0, req.token_ids_out) if req.logprobs is not None else None
            return P.completion_response(req, c.text, c.finish_reason, c.stats, lp)
        lp = P.chat_logprobs(tok, lps, ids, req.token_ids_out) if req.logprobs is not None else None
        return P.chat_response(req, c.text, c.finish_reason, c.stats, lp)

    async def sse(req: P.GenRequest, stream):
        tok, finished, offset = engine.tokenizer, False, 0

        def event(obj) -> str:
            return f"data: {json.dumps(obj)}\n\n"
        try:
            if req.kind == "chat":
                yield event(P.chunk(req, text="", role=True))
            async for o in stream:
                lp = None
                if req.logprobs is not None and o.new_token_ids:
                    lp = (P.completion_logprobs(tok, o.new_logprobs, o.new_token_ids, offset, req.token_ids_out)
                          if req.kind == "completion" else
                          P.chat_logprobs(tok, o.new_logprobs, o.new_token_ids, req.token_ids_out))
                if o.new_text or lp:
                    yield event(P.chunk(req, text=o.new_text, logprobs=lp))
                    offset += len(o.new_text)
                if o.finished:
                    finished = True
                    c = o.completion
                    yield event(P.chunk(req, text="" if req.kind == "completion" else None,
                                        finish=c.finish_reason))
                    if req.include_usage:
                        yield event(P.usage_chunk(req, c.stats))
            yield "data: [DONE]\n\n"
        except EngineDead as e:
            yield event({"error": {"message": str(e), "type": "service_unavailable", "param": None, "code": 503}})
        finally:
            if not finished and state["loop"] is not None:
                state["loop"].abort(stream.request_id)          # the client went away: free its blocks

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await run(request, P.parse_completion(await body_of(request)))

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await run(request, P.parse_chat(await body_of(request)))

    # -- tokenizer and cache --------------------------------------------------------------------------------
    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await body_of(request)
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        role = role_of(body.get("model"))
        if "messages" in body:
            req = P.parse_chat({**body, "stream": False})
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                raise ApiError(400, "'prompt' must be a string (or give 'messages')", param="prompt")
            req = P.GenRequest("completion", role, prompt, None, {})
        ids = prompt_ids(req, role)
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.cfg.max_position_embeddings}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await body_of(request)
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        role_of(body.get("model"))
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and
                                                0 <= t < engine.cfg.vocab_size for t in ids):
            raise ApiError(400, f"'tokens' must be a list of token ids in [0, {engine.cfg.vocab_size})",
                           param="tokens")
        return {"prompt": engine.tokenizer.decode(ids)}

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache():
        await off_loop(engine.clear_cache)
        return PlainTextResponse("OK")

    # -- roles at run time ----------------------------------------------------------------------------------
    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        body = await body_of(request)
        if not isinstance(body, dict) or not isinstance(body.get("lora_name"), str) or \
                not isinstance(body.get("lora_path"), str):
            raise ApiError(400, "give 'lora_name' and 'lora_path' (a bundle directory) as strings")
        name, path = body["lora_name"], body["lora_path"]
        try:
            await off_loop(engine.load_role, name, path, body.get("role"))
        except (ServeError, BundleError) as e:
            raise ApiError(400, f"cannot load {name!r}: {e}", param="lora_path") from None
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        body = await body_of(request)
        name = body.get("lora_name") if isinstance(body, dict) else None
        if not isinstance(name, str):
            raise ApiError(400, "give 'lora_name' as a string", param="lora_name")
        if name == base_name:
            raise ApiError(400, "the base model cannot be unloaded", param="lora_name")
        try:
            await off_loop(engine.unload_role, name)
        except ServeError as e:
            raise ApiError(404, str(e), param="lora_name", code="model_not_found") from None
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    return app
