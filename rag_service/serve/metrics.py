"""Prometheus metrics of the service, served at GET /metrics (text exposition format).

    m = Metrics(); m.ttft.observe(0.12); print(m.render()[0].decode())

Names follow vLLM where one exists, so existing dashboards and Ray's TTFT autoscaling policy
read them unchanged: `vllm:time_to_first_token_seconds`, `vllm:prefix_cache_queries_total`
and `vllm:prefix_cache_hits_total` (both in prompt tokens). Ours: `dsa_rag_*` (tokens/s per
pack answer, pack prefix lookups by source memory|store|prefill, queue depth = questions in
flight at this ingress, model replica count, HTTP requests by route and status).

Each `Metrics` owns its registry, so several apps (tests) live in one process. In Ray mode
each ingress replica exposes its own numbers; scrape every ingress replica (or the Ray metrics
agent) for cluster totals.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
_TPS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token of a pack answer",
                              registry=r, buckets=_TTFT_BUCKETS)
        self.tokens_per_s = Histogram("dsa_rag_generation_tokens_per_second", "Decode speed of a pack answer",
                                      registry=r, buckets=_TPS_BUCKETS)
        self.generated = Counter("dsa_rag_generation_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("dsa_rag_prompt_tokens", "Prompt tokens (pack prefix + question)", registry=r)
        self.prefix_queries = Counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                      registry=r)
        self.prefix_hits = Counter("vllm:prefix_cache_hits", "Prompt tokens served from the prefix cache",
                                   registry=r)
        self.pack_lookups = Counter("dsa_rag_pack_prefix_lookups", "Pack prefix caches by where they came from",
                                    ["source"], registry=r)
        self.in_flight = Gauge("dsa_rag_queue_depth", "Questions in flight at this ingress", registry=r)
        self.replicas = Gauge("dsa_rag_model_replicas", "Model replicas serving", registry=r)
        self.requests = Counter("dsa_rag_http_requests", "HTTP requests", ["route", "status"], registry=r)
        for s in ("memory", "store", "prefill"):
            self.pack_lookups.labels(s)  # export zeros from the start

    def observe_prefix(self, prompt_tokens: int, cached_tokens: int, source: str) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.prefix_queries.inc(prompt_tokens)
        self.prefix_hits.inc(cached_tokens)
        self.pack_lookups.labels(source).inc()

    def observe_end(self, ev: dict) -> None:
        self.generated.inc(ev["usage"]["completion_tokens"])
        tps = ev.get("timings", {}).get("tokens_per_s") or 0.0
        if tps > 0:
            self.tokens_per_s.observe(tps)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
