"""Prometheus metrics at /metrics, named after vLLM's where one exists so dashboards carry over.

Request counters and latency histograms are fed by each finished request's usage record (the engine
calls `observe`). The cache's state (bytes per tier, usage fraction, evictions, running and waiting
requests) is read from the engine when Prometheus scrapes, so it is never stale.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest,
)  # fmt: skip
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.responses import Response

if TYPE_CHECKING:
    from kvchat.engine import Engine
    from kvchat.startup import BackgroundEngine
    from kvchat.records import Usage

# vLLM's buckets, so the same dashboard panels read well
TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                  20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
E2E_BUCKETS_S = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip


class Metrics:
    def __init__(self, holder: BackgroundEngine, model_name: str) -> None:
        disable_created_metrics()  # the *_created series only repeat the start time
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        labels = ["model_name"]
        r = self.registry
        self.queries = Counter("kvchat_prefix_cache_queries", "Prompt tokens looked up in the prefix cache "
                               "(vllm:prefix_cache_queries)", labels, registry=r)  # fmt: skip
        self.hits = Counter("kvchat_prefix_cache_hits", "Prompt tokens served from the cache instead of "
                            "prefilled (vllm:prefix_cache_hits)", labels, registry=r)  # fmt: skip
        self.disk_hits = Counter("kvchat_prefix_cache_disk_hits", "Of the cache hits, tokens read back from "
                                 "the disk tier", labels, registry=r)  # fmt: skip
        self.prompt_tokens = Counter("kvchat_prompt_tokens", "Prompt tokens of finished requests "
                                     "(vllm:prompt_tokens)", labels, registry=r)  # fmt: skip
        self.generation_tokens = Counter("kvchat_generation_tokens", "Reply tokens generated "
                                         "(vllm:generation_tokens)", labels, registry=r)  # fmt: skip
        self.requests = Counter("kvchat_request_success", "Finished requests by finish reason and door "
                                "(ui, api, library) (vllm:request_success)",
                                [*labels, "finished_reason", "door"], registry=r)  # fmt: skip
        self.ttft = Histogram("kvchat_time_to_first_token_seconds", "Arrival to first token, queue wait "
                              "included (vllm:time_to_first_token_seconds)", labels, buckets=TTFT_BUCKETS_S,
                              registry=r)  # fmt: skip
        self.e2e = Histogram("kvchat_e2e_request_latency_seconds", "Arrival to the reply's end "
                             "(vllm:e2e_request_latency_seconds)", labels, buckets=E2E_BUCKETS_S,
                             registry=r)  # fmt: skip
        self.queue_time = Histogram("kvchat_request_queue_time_seconds", "Time in the engine's queue "
                                    "(vllm:request_queue_time_seconds)", labels, buckets=TTFT_BUCKETS_S,
                                    registry=r)  # fmt: skip
        r.register(_CacheState(holder, model_name))

    def attach(self, engine: Engine) -> Engine:
        """Count every request this engine finishes; returns it (for use inside the loader)."""
        engine.add_listener(self.observe)
        return engine

    def observe(self, usage: Usage) -> None:
        m = self.model_name
        self.queries.labels(m).inc(usage.prompt_tokens)
        self.hits.labels(m).inc(usage.cached_tokens)
        self.disk_hits.labels(m).inc(usage.disk_tokens)
        self.prompt_tokens.labels(m).inc(usage.prompt_tokens)
        self.generation_tokens.labels(m).inc(usage.new_tokens)
        self.requests.labels(m, usage.finish_reason, usage.door).inc()
        if usage.ttft_ms:
            self.ttft.labels(m).observe(usage.ttft_ms / 1000)
        self.e2e.labels(m).observe(usage.total_ms / 1000)
        self.queue_time.labels(m).observe(usage.wait_ms / 1000)

    def response(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class _CacheState(Collector):
    """The engine's cache as it is now, read at scrape time."""

    def __init__(self, holder: BackgroundEngine, model_name: str) -> None:
        self.holder = holder
        self.model_name = model_name

    def collect(self) -> Iterator[Metric]:
        engine = self.holder.peek()
        m = [self.model_name]
        ready = GaugeMetricFamily("kvchat_model_ready", "1 once the model is loaded and serving", labels=["model_name"])
        ready.add_metric(m, 1.0 if engine is not None else 0.0)
        yield ready
        if engine is None:
            return
        s = engine.stats()
        path = GaugeMetricFamily("kvchat_attention_path", "1 for the attention path this model is served on, "
                                 "verified at load: cascade (shared runs read in place) or compatible (the "
                                 "model's own attention over copied KV)", labels=["model_name", "path"])
        path.add_metric([*m, engine.attention.path], 1.0)
        yield path
        yield _gauge("kvchat_kv_cache_usage_perc", "Fraction of the memory budget KV holds, 1 = full "
                     "(vllm:kv_cache_usage_perc)", m, s.used_bytes / s.budget_bytes if s.budget_bytes else 0.0)  # fmt: skip
        held = GaugeMetricFamily("kvchat_kv_cache_bytes", "KV bytes held, by tier", labels=["model_name", "tier"])
        held.add_metric([*m, "memory"], s.used_bytes)
        held.add_metric([*m, "disk"], s.disk_bytes)
        yield held
        budget = GaugeMetricFamily("kvchat_kv_cache_budget_bytes", "Byte budget, by tier",
                                   labels=["model_name", "tier"])  # fmt: skip
        budget.add_metric([*m, "memory"], s.budget_bytes)
        budget.add_metric([*m, "disk"], s.disk_budget_bytes)
        yield budget
        kinds = GaugeMetricFamily("kvchat_kv_cache_memory_bytes", "KV bytes in memory by what holds them: "
                                  "shared (system prompts, stateless turns), session (one conversation's "
                                  "turns), running (requests' private buffers); pinned is part of shared",
                                  labels=["model_name", "kind"])  # fmt: skip
        for kind, nbytes in (("shared", s.shared_bytes), ("session", s.private_bytes), ("running", s.running_bytes),
                             ("pinned", s.pinned_bytes)):  # fmt: skip
            kinds.add_metric([*m, kind], nbytes)
        yield kinds
        evictions = CounterMetricFamily("kvchat_cache_evictions", "Cached runs evicted, by tier (a memory "
                                        "eviction that kept a disk copy is a demotion, counted here too)",
                                        labels=["model_name", "tier"])  # fmt: skip
        evictions.add_metric([*m, "memory"], s.evictions)
        evictions.add_metric([*m, "disk"], s.disk_evictions)
        yield evictions
        demotions = CounterMetricFamily("kvchat_cache_demotions", "Memory evictions that kept the run on disk",
                                        labels=["model_name"])  # fmt: skip
        demotions.add_metric(m, s.demotions)
        yield demotions
        reads = CounterMetricFamily("kvchat_disk_reads", "Cached runs read back from disk", labels=["model_name"])
        reads.add_metric(m, s.disk_reads)
        yield reads
        yield _gauge("kvchat_num_requests_running", "Requests in the batch (vllm:num_requests_running)", m, s.running)
        yield _gauge("kvchat_num_requests_waiting", "Requests in the engine's queue (vllm:num_requests_waiting)",
                     m, s.waiting)  # fmt: skip


def _gauge(name: str, documentation: str, labels: list[str], value: float) -> GaugeMetricFamily:
    gauge = GaugeMetricFamily(name, documentation, labels=["model_name"])
    gauge.add_metric(labels, value)
    return gauge
