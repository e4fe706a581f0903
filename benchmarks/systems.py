"""The systems ``bench_trajectory.py`` replays traces against, behind one interface (``peer_hf.HFPeftSystem`` is
the HF transformers + PEFT peer):

    system.run_turn(prompt_ids, role, max_new_tokens) -> TurnResult     greedy, exactly max_new_tokens tokens
    system.cache_bytes() -> int | None                                  cache held now (None: not observable)
    system.reset(); system.close()

- :class:`EngineSystem`: lragent's engine in-process, one cache mode;
- :class:`HttpSystem`: any OpenAI-compatible server (``lragent serve``, ``vllm serve``) through streaming
  ``/v1/completions`` with token-id prompts; the generated ids come back through ``logprobs`` with
  ``return_tokens_as_token_ids`` (both servers support it), TTFT is the first streamed token, reuse is
  ``usage.prompt_tokens_details.cached_tokens``.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx

from vllm_peer import free_port


@dataclass
class TurnResult:
    """What one turn produced and cost."""
    output_ids: list[int]   # generated token ids (greedy), exactly max_new_tokens of them (no EOS stop)
    ttft_s: float           # seconds from the call until the first generated token id is known
    total_s: float          # seconds for the whole turn
    prefilled: int          # prompt tokens this turn had to run through the model
    reused: int             # prompt tokens whose KV came from a cache


class EngineSystem:
    """lragent's engine in-process in one cache mode (bundle, mode and ServeConfig overrides)."""

    def __init__(self, bundle, mode: str, **config):
        from lragent.serve import Engine

        self.engine = Engine(bundle, mode=mode, **config)
        self.engine.warmup()
        self.name, self.mode = f"lragent {mode}", mode

    def run_turn(self, prompt_ids, role, max_new_tokens) -> TurnResult:
        """One greedy request through ``Engine.generate``; TTFT from the request's own stats."""
        t0 = time.perf_counter()
        c = self.engine.generate(list(prompt_ids), role, max_new_tokens=max_new_tokens, ignore_eos=True)
        total = time.perf_counter() - t0
        return TurnResult(c.token_ids, c.stats.ttft_s, total, len(prompt_ids) - c.stats.reused_tokens,
                          c.stats.reused_tokens)

    def cache_bytes(self) -> int:
        """Bytes of the cache blocks in use (running requests and cached prefixes)."""
        return self.engine.stats()["total_bytes"]

    def reset(self) -> None:
        self.engine.clear_cache()

    def close(self) -> None:
        self.engine = None


class HttpSystem:
    """An OpenAI-compatible server at ``base_url`` (".../v1"); ``model_of(role)`` names the model per role."""

    def __init__(self, name: str, base_url: str, *, model_of=None, metrics_url: str | None = None,
                 reset_url: str | None = None, cache_metric: str | None = None, timeout_s: float = 3600):
        self.name, self.base_url = name, base_url.rstrip("/")
        self.model_of = model_of or (lambda role: role)
        self.metrics_url, self.reset_url, self.cache_metric = metrics_url, reset_url, cache_metric
        self.client = httpx.Client(timeout=timeout_s)

    def run_turn(self, prompt_ids, role, max_new_tokens) -> TurnResult:
        """One streamed completion; raises RuntimeError on an HTTP error or a short answer."""
        body = {"model": self.model_of(role), "prompt": list(prompt_ids), "max_tokens": max_new_tokens,
                "temperature": 0, "ignore_eos": True, "logprobs": 1, "return_tokens_as_token_ids": True,
                "stream": True, "stream_options": {"include_usage": True}}
        ids, ttft, cached = [], None, None
        t0 = time.perf_counter()
        with self.client.stream("POST", f"{self.base_url}/completions", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"{self.name}: HTTP {r.status_code}: {r.read().decode()[:300]}")
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                obj = json.loads(line[6:])
                for ch in obj.get("choices") or []:
                    toks = (ch.get("logprobs") or {}).get("tokens") or []
                    if toks and ttft is None:
                        ttft = time.perf_counter() - t0
                    ids += [int(t.split(":", 1)[1]) for t in toks]
                usage = obj.get("usage")
                if usage:
                    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        total = time.perf_counter() - t0
        if len(ids) != max_new_tokens:
            raise RuntimeError(f"{self.name}: got {len(ids)} tokens, asked for {max_new_tokens}")
        cached = cached or 0
        return TurnResult(ids, ttft, total, len(prompt_ids) - cached, cached)

    def cache_bytes(self) -> int | None:
        """The server's cache bytes: the sum of the Prometheus samples whose name-and-labels match the regex
        ``cache_metric`` (lragent serve: ``lragent_cache_bytes{component="base"|"lowrank"}``), else None."""
        if not (self.metrics_url and self.cache_metric):
            return None
        text = self.client.get(self.metrics_url).text
        vals = [float(m.group(1)) for m in re.finditer(rf"^{self.cache_metric} (\S+)$", text, re.M)]
        return int(sum(vals)) if vals else None

    def reset(self) -> None:
        """Drop the server's cached prefixes (POST reset_url) when it has such an endpoint."""
        if self.reset_url:
            r = self.client.post(self.reset_url)
            if r.status_code >= 400:
                raise RuntimeError(f"{self.name}: reset failed: HTTP {r.status_code}")

    def close(self) -> None:
        self.client.close()


def start_lragent_server(bundle, mode: str, threads: int, extra=(), timeout_s: float = 300):
    """Start ``lragent serve --bundle B --mode M`` on a free port; returns (process, "http://127.0.0.1:PORT") once
    /health answers. SystemExit when it exits or does not come up."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lragent.cli", "serve", "--bundle", str(bundle), "--mode", mode,
                             "--port", str(port), "--threads", str(threads), *map(str, extra)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"lragent serve --mode {mode} exited with {proc.returncode}")
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"lragent serve --mode {mode} did not come up")


def stop_server(proc: subprocess.Popen) -> None:
    """Stop a ``lragent serve`` process (SIGTERM drains and exits; killed after 60 s)."""
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def lragent_http_system(url: str, mode: str) -> HttpSystem:
    """An :class:`HttpSystem` for a running ``lragent serve`` (cache bytes from /metrics, reset endpoint)."""
    return HttpSystem(f"lragent serve {mode}", url + "/v1", metrics_url=url + "/metrics",
                      reset_url=url + "/reset_prefix_cache",
                      cache_metric=r'lragent_cache_bytes\{component="(?:base|lowrank)"\}')
