"""The server's Prometheus metrics (`GET /metrics`), in a registry of each server's own (tests run several).

Named as vLLM's where they mean the same (`vllm:` becomes `qwenhw:`), so dashboards carry over.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, scheduler) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("qwenhw:requests", "HTTP requests answered, by route and status", ["route", "status"],
                                registry=r)
        self.prompt_tokens = Counter("qwenhw:prompt_tokens", "Prompt tokens of the requests decoded", registry=r)
        self.generation_tokens = Counter("qwenhw:generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("qwenhw:time_to_first_token_seconds", "From a request's arrival to its first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("qwenhw:time_per_output_token_seconds",
                              "Time per output token after the first, per request", buckets=TOKEN_BUCKETS,
                              registry=r)
        self.latency = Histogram("qwenhw:e2e_request_latency_seconds", "From a request's arrival to its last token",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch = Histogram("qwenhw:batch_size", "Sequences decoding together, when a batch starts or rows "
                               "join it", buckets=BATCH_BUCKETS, registry=r)
        self.cancelled = Counter("qwenhw:requests_cancelled", "Requests whose client left before the answer",
                                 registry=r)
        active = Gauge("qwenhw:num_requests_active", "Requests waiting or decoding", registry=r)
        active.set_function(lambda: scheduler.active)
        running = Gauge("qwenhw:num_requests_running", "Sequences decoding now (the batch's occupancy)", registry=r)
        running.set_function(lambda: scheduler.running)
        waiting = Gauge("qwenhw:num_requests_waiting", "Sequences waiting for a row of the batch", registry=r)
        waiting.set_function(lambda: scheduler.waiting)
        scheduler.on_batch = self.batch.observe
        r.register(_KVCache(scheduler))

    def finished(self, arrived: float, first: float | None, end: float, prompt_tokens: int, tokens: int) -> None:
        """A request that got its whole answer (monotonic times)."""
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(tokens)
        self.latency.observe(end - arrived)
        if first is not None:
            self.ttft.observe(first - arrived)
            if tokens > 1:
                self.tpot.observe((end - first) / (tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _KVCache:
    """The engine's KV cache, read at each scrape (engines that say: Engine.kv_cache): plain reads, from the
    server's thread, of a count and a list length that the scheduler's thread writes."""

    def __init__(self, scheduler) -> None:
        self.scheduler = scheduler

    def collect(self):
        engine = self.scheduler.server.engine
        state = engine.kv_cache() if engine is not None and not engine.closed else None
        if state is None:
            return
        yield GaugeMetricFamily("qwenhw:kv_cache_usage_perc", "KV cache usage (1 = every page or row held)",
                                value=state["usage"])
        yield CounterMetricFamily("qwenhw:num_preemptions", "Sequences that gave their KV cache pages back for "
                                  "others and went in again", value=state["preemptions"])
        if "prefix_queries" in state:  # prefix caching (vLLM's names)
            yield CounterMetricFamily("qwenhw:prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                      value=state["prefix_queries"])
            yield CounterMetricFamily("qwenhw:prefix_cache_hits", "Prompt tokens the prefix cache held",
                                      value=state["prefix_hits"])
