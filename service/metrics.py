"""Every Prometheus series trimserve exports, each labelled by `variant`, and the adapter through
which a backend reports its queue (`VariantObserver`, a `service.backend.Observer`).

Buckets span a 135M model on two CPU cores (tens of ms per token) to a 7B model on a GPU
(a few ms per token), so quantiles resolve at both ends.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Seconds, roughly x2-x2.5 apart.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.5, 3, 6, 12, 30, 60)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1)
QUEUE_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Shadow scoring: mean token NLL of an answer (nats), and the share of its tokens a model would pick.
NLL_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.25, 1.5, 2, 2.5, 3, 4, 6, 8)
AGREEMENT_BUCKETS = (0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 1.0)


class Metrics:
    """The server's metric families, registered on one registry (a fresh one per app in tests)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        v = ["variant"]
        self.requests = Counter(
            "trimserve_requests", "Requests finished, by outcome", [*v, "outcome"], registry=r
        )  # outcome: ok | error | cancelled | rejected | timeout
        self.latency = Histogram(
            "trimserve_request_latency_seconds", "End-to-end request latency", v, buckets=LATENCY_BUCKETS, registry=r
        )
        self.ttft = Histogram(
            "trimserve_time_to_first_token_seconds", "Time to first token", v, buckets=TTFT_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            "trimserve_time_per_output_token_seconds",
            "Mean time per output token after the first, per request",
            v,
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "trimserve_queue_wait_seconds", "Time from arrival to admission", v, buckets=QUEUE_BUCKETS, registry=r
        )
        self.prompt_tokens = Counter("trimserve_prompt_tokens", "Prompt tokens processed", v, registry=r)
        self.prompt_tokens_cached = Counter(
            "trimserve_prompt_tokens_cached",
            "Prompt tokens an in-process engine took from its prefix cache instead of prefilling them",
            v,
            registry=r,
        )
        self.generated_tokens = Counter("trimserve_generated_tokens", "Tokens generated", v, registry=r)
        self.running = Gauge("trimserve_requests_running", "Requests in the running batch", v, registry=r)
        self.waiting = Gauge("trimserve_requests_waiting", "Requests queued for admission", v, registry=r)
        self.parameters = Gauge("trimserve_model_parameters", "Model parameters", [*v, "kind"], registry=r)
        self.weight_bytes = Gauge("trimserve_model_weight_bytes", "Bytes of model weights in memory", v, registry=r)
        self.load_seconds = Gauge("trimserve_model_load_seconds", "Time to load and verify the model", v, registry=r)
        self.load_rss_bytes = Gauge(
            "trimserve_model_load_rss_bytes", "Process RSS growth while loading this model", v, registry=r
        )
        self.rss_bytes = Gauge(
            "trimserve_process_resident_memory_bytes", "Resident memory of the serving process", v, registry=r
        )
        self.kv_cache_bytes = Gauge(
            "trimserve_kv_cache_bytes",
            "Bytes an in-process engine's KV cache holds (it grows with load)",
            v,
            registry=r,
        )
        self.cuda_allocated = Gauge(
            "trimserve_cuda_memory_allocated_bytes", "CUDA memory allocated", [*v, "device"], registry=r
        )
        self.cuda_reserved = Gauge(
            "trimserve_cuda_memory_reserved_bytes", "CUDA memory reserved by the allocator", [*v, "device"], registry=r
        )
        self.cuda_peak = Gauge(
            "trimserve_cuda_memory_peak_bytes", "Peak CUDA memory allocated", [*v, "device"], registry=r
        )
        self.backend_up = Gauge(
            "trimserve_backend_up", "1 while the variant's backend can take requests, else 0", v, registry=r
        )
        self.backend_restarts = Counter(
            "trimserve_backend_restarts", "Times a supervised backend process was restarted", v, registry=r
        )
        s = ["variant", "reference"]  # variant: the model rating; reference: the model whose answers it rates
        self.shadow_nll = Histogram(
            "trimserve_shadow_nll",
            "Mean token NLL of a reference's answer under the variant (variant == reference: its own)",
            s,
            buckets=NLL_BUCKETS,
            registry=r,
        )
        self.shadow_top1 = Histogram(
            "trimserve_shadow_top1_agreement",
            "Share of a reference answer's tokens that are the variant's greedy choice",
            s,
            buckets=AGREEMENT_BUCKETS,
            registry=r,
        )
        self.shadow_tokens = Counter("trimserve_shadow_tokens", "Answer tokens scored in the shadow", s, registry=r)
        self.shadow_items = Counter(
            "trimserve_shadow_items", "Shadow exchanges, by outcome", [*s, "outcome"], registry=r
        )  # outcome: scored | dropped_queue_full | dropped_busy | unsupported | failed

    def observer(self, variant: str) -> VariantObserver:
        """What one variant's backend reports its queue to."""
        return VariantObserver(self, variant)


class VariantObserver:
    """The Prometheus side of `service.backend.Observer` for one variant."""

    def __init__(self, metrics: Metrics, variant: str) -> None:
        self._queue_wait = metrics.queue_wait.labels(variant=variant)
        self._running = metrics.running.labels(variant=variant)
        self._waiting = metrics.waiting.labels(variant=variant)
        self._restarts = metrics.backend_restarts.labels(variant=variant)
        self._prompt_cached = metrics.prompt_tokens_cached.labels(variant=variant)

    def queue_wait(self, seconds: float) -> None:
        self._queue_wait.observe(seconds)

    def load(self, running: int, waiting: int) -> None:
        self._running.set(running)
        self._waiting.set(waiting)

    def prompt_cached(self, tokens: int) -> None:
        self._prompt_cached.inc(tokens)

    def restarted(self) -> None:
        self._restarts.inc()
