"""``EngineLoop``: one background thread steps the engine continuously; many producers (threads, or asyncio handlers)
submit requests and read each request's stream of :class:`RequestOutput` deltas.

    loop = EngineLoop(engine).start()
    stream = loop.submit(ids, "actor", SamplingParams(max_new_tokens=32))     # bad input raises ServeError here
    for out in stream:                      # blocking iteration; or `async for out in stream` with asyncio_loop=
        print(out.new_text, end="")
    loop.stop(drain_s=10)                   # let requests in flight finish (bounded), then abort the rest
"""
from __future__ import annotations

import asyncio
import queue
import threading
import time
import traceback
from typing import Callable

from .config import ServeError
from .sampling import SamplingParams
from .sequence import RequestOutput


class EngineDead(RuntimeError):
    """The engine loop died (an internal error): requests fail, the server reports unhealthy."""


class RequestStream:
    """The outputs of one request, in order; ends after the output with ``finished=True``."""

    def __init__(self, request_id: int, role: str, asyncio_loop: asyncio.AbstractEventLoop | None = None):
        self.request_id, self.role, self._aloop = request_id, role, asyncio_loop
        self._q: queue.Queue | asyncio.Queue = asyncio.Queue() if asyncio_loop else queue.Queue()
        self.finished = False

    def put(self, item) -> None:
        """Hand an output (or an exception) to the consumer; called by the loop thread."""
        if self._aloop is not None:
            self._aloop.call_soon_threadsafe(self._q.put_nowait, item)
        else:
            self._q.put(item)

    def _check(self, item):
        if isinstance(item, BaseException):
            raise item
        if item.finished:
            self.finished = True
        return item

    def __iter__(self):
        while not self.finished:
            yield self._check(self._q.get())

    async def __aiter__(self):
        while not self.finished:
            yield self._check(await self._q.get())


class EngineLoop:
    def __init__(self, engine, *, max_queue: int | None = None, on_output: Callable | None = None):
        self.engine, self.max_queue, self.on_output = engine, max_queue, on_output
        self._streams: dict[int, RequestStream] = {}
        self._inbox: list = []                       # requests to hand to the engine before the next step
        self._aborts: list[int] = []                 # requests to abort before the next step
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stopping = self._accepting = False
        self.error: BaseException | None = None
        self.error_text = ""

    # -- lifecycle ----------------------------------------------------------------------------------------------
    def start(self) -> "EngineLoop":
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name="lragent-engine-loop", daemon=True)
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def stop(self, drain_s: float = 0.0) -> None:
        """Refuse new requests, let those in flight run for up to ``drain_s`` seconds, abort the rest, stop."""
        with self._lock:
            self._accepting = False
        deadline = time.monotonic() + drain_s
        while self.alive and time.monotonic() < deadline:
            with self._lock:
                if not self._streams:
                    break
            time.sleep(0.01)
        with self._lock:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self._lock:
            self._aborts = list(self._streams)
        self._take_inbox()                           # the thread has stopped: abort what is left here

    # -- requests -----------------------------------------------------------------------------------------------
    def pending(self) -> int:
        """Requests in flight (waiting or running)."""
        with self._lock:
            return len(self._streams)

    def submit(self, prompt, role: str, params: SamplingParams,
               asyncio_loop: asyncio.AbstractEventLoop | None = None) -> RequestStream:
        """Queue a request; its stream. Bad input raises ServeError now; a full queue raises QueueFull. Never waits
        for an engine step (the loop thread hands the request to the engine between steps)."""
        seq = self.engine.make_request(prompt, role, params)
        with self._lock:
            if self.error is not None:
                raise EngineDead(self.error_text)
            if not self._accepting:
                raise QueueFull("the server is shutting down")
            if self.max_queue is not None and len(self._streams) >= self.max_queue:
                raise QueueFull(f"{len(self._streams)} requests in flight (--max-queue {self.max_queue})")
            stream = self._streams[seq.id] = RequestStream(seq.id, role, asyncio_loop)
            self._inbox.append(seq)
            self._wake.notify_all()
        return stream

    def abort(self, request_id: int) -> None:
        """Abort a request (a client went away): between two steps its blocks are freed and its stream ends.
        Never waits for an engine step."""
        with self._lock:
            if request_id in self._streams:
                self._aborts.append(request_id)
                self._wake.notify_all()

    # -- the loop -----------------------------------------------------------------------------------------------
    def _take_inbox(self) -> None:
        with self._lock:
            new, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, []
        for seq in new:
            self.engine.enqueue(seq)
        for rid in aborts:
            done = self.engine.abort(rid)
            with self._lock:
                stream = self._streams.pop(rid, None)
            if stream is not None:
                stream.put(RequestOutput(rid, stream.role, [], "", True, done))

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    while not self._stopping and not self._streams:
                        self._wake.wait(timeout=0.5)
                    if self._stopping:
                        return
                self._take_inbox()
                outs = self.engine.step()
                if not outs:
                    time.sleep(0.001)                 # nothing schedulable this step: do not spin hot
                    continue
                with self._lock:
                    targets = [(o, self._streams.get(o.request_id)) for o in outs]
                    for o in outs:
                        if o.finished:
                            self._streams.pop(o.request_id, None)
                for o, stream in targets:
                    if self.on_output is not None:
                        self.on_output(o)
                    if stream is not None:
                        stream.put(o)
        except BaseException as e:                  # the engine itself failed: fail every request, report it
            self.error, self.error_text = e, f"engine loop died: {type(e).__name__}: {e}"
            traceback.print_exc()
            with self._lock:
                streams, self._streams = list(self._streams.values()), {}
            for s in streams:
                s.put(EngineDead(self.error_text))


class QueueFull(ServeError):
    """Too many requests in flight (or shutting down): retry later."""
