"""Prometheus metrics of the server (one registry per app): requests, tokens by role, latencies, cache bytes."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self, engine, loop):
        self.engine, self.loop = engine, loop
        r = self.registry = CollectorRegistry()
        self.running = Gauge("lragent_requests_running", "Requests running in the engine", registry=r)
        self.waiting = Gauge("lragent_requests_waiting", "Requests waiting for cache blocks", registry=r)
        self.requests = Counter("lragent_requests", "Finished requests", ["role", "finish_reason"], registry=r)
        self.prompt = Counter("lragent_prompt_tokens", "Prompt tokens", ["role"], registry=r)
        self.cached = Counter("lragent_cached_prompt_tokens", "Prompt tokens taken from the shared cache", ["role"],
                              registry=r)
        self.shared_hit = Counter("lragent_shared_hit_tokens",
                                  "Prompt tokens taken from the cache that another role computed", ["role"],
                                  registry=r)
        self.generated = Counter("lragent_generation_tokens", "Generated tokens", ["role"], registry=r)
        self.ttft = Histogram("lragent_time_to_first_token_seconds", "Time to first token", ["role"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("lragent_e2e_request_latency_seconds", "Request latency", ["role"],
                             buckets=LATENCY_BUCKETS, registry=r)
        self.cache = Gauge("lragent_cache_bytes", "Cache pool bytes by component", ["component"], registry=r)
        self.preemptions = Gauge("lragent_preemptions", "Sequences preempted so far", registry=r)
        self.workspace = Gauge("lragent_workspace_bytes", "Expanded K'/V' rows held by the attention backend "
                               "(low-rank modes: running requests and the reuse pool)", registry=r)

    def finished(self, completion) -> None:
        """Count one finished request (called from the engine loop thread)."""
        s, role = completion.stats, completion.role
        self.requests.labels(role, completion.finish_reason).inc()
        self.prompt.labels(role).inc(s.prompt_tokens)
        self.cached.labels(role).inc(s.reused_tokens)
        self.shared_hit.labels(role).inc(s.reused_from_other_roles)
        self.generated.labels(role).inc(s.generated_tokens)
        if s.generated_tokens:
            self.ttft.labels(role).observe(s.ttft_s)
        self.e2e.labels(role).observe(s.latency_s)

    def render(self) -> bytes:
        st = self.engine.stats()
        self.running.set(st["running"])
        self.waiting.set(st["waiting"])
        self.preemptions.set(st["preemptions"])
        self.workspace.set(st["workspace_bytes"])
        for comp in ("base", "lowrank", "free"):
            self.cache.labels(comp).set(st[f"{comp}_bytes"])
        return generate_latest(self.registry)
