"""Request parsing and response shapes of the OpenAI API as vLLM's server speaks it.

``parse_completion`` / ``parse_chat`` turn a JSON body into a :class:`GenRequest` or raise :class:`ApiError` (400)
naming the bad field; unknown fields are ignored (clients send many), unsupported values of known ones are refused.
The ``*_response`` / ``*_chunk`` functions build the bodies.
"""
from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field

from ..config import ServeError
from ..sampling import SamplingParams
from .errors import ApiError

MISSING = object()


@dataclass
class GenRequest:
    kind: str                             # "completion" | "chat"
    model: str
    prompt: str | list[int] | None       # completions
    messages: list[dict] | None          # chat
    sampling: dict                        # SamplingParams fields (max_new_tokens may still be None)
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None           # completions: top-N; chat: top_logprobs when logprobs is true
    token_ids_out: bool = False           # return_tokens_as_token_ids: logprobs name tokens "token_id:N"
    created: int = field(default_factory=lambda: int(time.time()))
    id: str = ""

    def params(self, max_new_tokens: int) -> SamplingParams:
        try:
            return SamplingParams(**{**self.sampling, "max_new_tokens": max_new_tokens})
        except ServeError as e:
            raise ApiError(400, str(e)) from None


def _get(body: dict, name: str, types: tuple, default=MISSING, *, what: str = ""):
    v = body.get(name, MISSING)
    if v is MISSING or v is None:
        if default is MISSING:
            raise ApiError(400, f"'{name}' is required", param=name)
        return default
    if isinstance(v, bool) and bool not in types:
        raise ApiError(400, f"'{name}' must be {what or ' or '.join(t.__name__ for t in types)}, got {v!r}",
                       param=name)
    if not isinstance(v, types):
        raise ApiError(400, f"'{name}' must be {what or ' or '.join(t.__name__ for t in types)}, got "
                            f"{type(v).__name__}", param=name)
    return v


def _number(body, name, default, lo, hi, *, lo_open=False):
    v = _get(body, name, (int, float), default, what="a number")
    if not math.isfinite(v) or v < lo or v > hi or (lo_open and v == lo):
        raise ApiError(400, f"'{name}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {v!r}", param=name)
    return float(v)


def _int(body, name, default, lo, hi=None):
    v = _get(body, name, (int,), default, what="an integer")
    if v is not None and (v < lo or (hi is not None and v > hi)):
        raise ApiError(400, f"'{name}' must be an integer in [{lo}, {hi if hi is not None else 'inf'}), got {v}",
                       param=name)
    return v


def _unsupported(body, name, ok) -> None:
    if name in body and body[name] is not None and not ok(body[name]):
        raise ApiError(400, f"'{name}'={body[name]!r} is not supported by this server", param=name)


def _sampling(body: dict) -> dict:
    """The sampling fields both endpoints share."""
    _int(body, "n", 1, 1, 1) if body.get("n") not in (None, 1) else None
    for name in ("presence_penalty", "frequency_penalty"):
        _unsupported(body, name, lambda v: v == 0)
    _unsupported(body, "best_of", lambda v: v == 1)
    _unsupported(body, "logit_bias", lambda v: v == {})
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 16:
        stop = tuple(stop)
    else:
        raise ApiError(400, "'stop' must be a string or a list of at most 16 strings", param="stop")
    out = dict(temperature=_number(body, "temperature", 1.0, 0, 2), top_p=_number(body, "top_p", 1.0, 0, 1,
                                                                                      lo_open=True),
               seed=_int(body, "seed", None, 0, 2 ** 63), stop=stop,
               ignore_eos=_get(body, "ignore_eos", (bool,), False))
    return out


def _stream(req: GenRequest, body: dict) -> None:
    req.stream = _get(body, "stream", (bool,), False)
    opts = _get(body, "stream_options", (dict,), {})
    req.include_usage = bool(_get(opts, "include_usage", (bool,), False))


def parse_completion(body) -> GenRequest:
    """``POST /v1/completions``: prompt as text or token ids (a list of one of either is accepted too)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = _get(body, "model", (str,))
    prompt = body.get("prompt", MISSING)
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    ok_ids = isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                         for t in prompt)
    if not (isinstance(prompt, str) and prompt) and not ok_ids:
        raise ApiError(400, "'prompt' must be a non-empty string or a list of integer token ids (one prompt per "
                            "request)", param="prompt")
    if _get(body, "echo", (bool,), False):
        raise ApiError(400, "'echo' is not supported by this server", param="echo")
    _unsupported(body, "suffix", lambda v: v == "")
    sampling = _sampling(body)
    sampling["max_new_tokens"] = _int(body, "max_tokens", 16, 1)
    logprobs = _int(body, "logprobs", None, 0, 5)
    req = GenRequest("completion", model, prompt, None, sampling, logprobs=logprobs,
                     token_ids_out=_get(body, "return_tokens_as_token_ids", (bool,), False),
                     id=f"cmpl-{uuid.uuid4().hex}")
    _stream(req, body)
    return req


def _content(msg: dict, i: int) -> str:
    c = msg.get("content")
    if c is None:
        return ""
    if isinstance(c, str):
        return c
    if isinstance(c, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                   for p in c):
        return "".join(p["text"] for p in c)
    raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts", param="messages")


def parse_chat(body) -> GenRequest:
    """``POST /v1/chat/completions``. An ``assistant`` message with a ``name`` is rendered as that role speaking
    (how one role's turn appears in another role's transcript); other roles are rendered as given."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = _get(body, "model", (str,))
    messages = _get(body, "messages", (list,))
    if not messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not m["role"]:
            raise ApiError(400, f"messages[{i}] must be an object with a 'role' string", param="messages")
        role = m["role"]
        name = m.get("name")
        if role == "assistant" and isinstance(name, str) and name:
            role = name
        out.append({"role": role, "content": _content(m, i)})
    if body.get("tools"):
        raise ApiError(400, "'tools' are not supported by this server", param="tools")
    _unsupported(body, "response_format", lambda v: isinstance(v, dict) and v.get("type") == "text")
    sampling = _sampling(body)
    mt = _int(body, "max_completion_tokens", None, 1)
    sampling["max_new_tokens"] = mt if mt is not None else _int(body, "max_tokens", None, 1)
    logprobs = None
    if _get(body, "logprobs", (bool,), False):
        logprobs = _int(body, "top_logprobs", 0, 0, 20)
    elif body.get("top_logprobs") is not None:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    req = GenRequest("chat", model, None, out, sampling, logprobs=logprobs, id=f"chatcmpl-{uuid.uuid4().hex}",
                     token_ids_out=_get(body, "return_tokens_as_token_ids", (bool,), False))
    _stream(req, body)
    return req


# ------------------------------------------------------------------------------------------------- responses
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "abort": "abort", "error": "abort"}


def usage(stats) -> dict:
    """OpenAI usage, with the prompt tokens taken from the shared cache (another role's prefill included)."""
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.generated_tokens,
            "total_tokens": stats.prompt_tokens + stats.generated_tokens,
            "prompt_tokens_details": {"cached_tokens": stats.reused_tokens}}


def token_name(tok, i: int, as_id: bool = False) -> str:
    """How logprobs name token ``i``: its text, or ``"token_id:i"`` (return_tokens_as_token_ids)."""
    return f"token_id:{i}" if as_id else tok.decode([i])


def completion_logprobs(tok, lps, ids, offset0: int, as_ids: bool = False) -> dict | None:
    """Legacy completions logprobs: tokens, token_logprobs, top_logprobs, text_offset (offsets into the text)."""
    if lps is None:
        return None
    texts = [tok.decode([i]) for i in ids]
    offsets, off = [], offset0
    for t in texts:
        offsets.append(off)
        off += len(t)
    return {"tokens": [f"token_id:{i}" for i in ids] if as_ids else texts, "token_logprobs": [lp for lp, _ in lps],
            "top_logprobs": [{token_name(tok, i, as_ids): v for i, v in top} for _, top in lps],
            "text_offset": offsets}


def chat_logprobs(tok, lps, ids, as_ids: bool = False) -> dict | None:
    if lps is None:
        return None

    def entry(i, lp):
        s = token_name(tok, i, as_ids)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}
    return {"content": [{**entry(i, lp), "top_logprobs": [entry(j, v) for j, v in top]}
                        for i, (lp, top) in zip(ids, lps)]}


def completion_response(req: GenRequest, text: str, finish: str, stats, logprobs) -> dict:
    return {"id": req.id, "object": "text_completion", "created": req.created, "model": req.model,
            "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": FINISH.get(finish, finish)}],
            "usage": usage(stats)}


def chat_response(req: GenRequest, text: str, finish: str, stats, logprobs) -> dict:
    return {"id": req.id, "object": "chat.completion", "created": req.created, "model": req.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                         "finish_reason": FINISH.get(finish, finish)}],
            "usage": usage(stats)}


def chunk(req: GenRequest, *, text: str | None = None, role: bool = False, finish: str | None = None,
          logprobs=None) -> dict:
    """One streamed chunk: ``text_completion`` with ``text``, or ``chat.completion.chunk`` with a ``delta``."""
    fin = FINISH.get(finish, finish) if finish else None
    if req.kind == "completion":
        choice = {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": fin}
        obj = "text_completion"
    else:
        delta = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": fin}
        obj = "chat.completion.chunk"
    return {"id": req.id, "object": obj, "created": req.created, "model": req.model, "choices": [choice]}


def usage_chunk(req: GenRequest, stats) -> dict:
    obj = "text_completion" if req.kind == "completion" else "chat.completion.chunk"
    return {"id": req.id, "object": obj, "created": req.created, "model": req.model, "choices": [],
            "usage": usage(stats)}
