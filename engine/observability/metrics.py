"""Prometheus metrics of one server: every family is named ``dagserve_*``.

Events (a request, a node run, a batch) are counted where they happen through
:class:`Metrics`; gauges that describe the present (queue lengths, workers, GPUs) are read
when Prometheus scrapes, by :class:`_LiveCollector`.  No label takes a value from request
data: pipelines, nodes, models and workers come from the configuration, statuses and error
types from fixed lists, and a request for an unknown pipeline is counted under ``""``.
"""

from __future__ import annotations

import bisect
import itertools
import math
import operator
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from engine.runtime.registry import resolver
from engine.runtime.workers.pool import resident_mb
from model_plugins.errors import (
    DagserveError,
    DeadlineExceeded,
    InferenceError,
    InvalidRequest,
    Overloaded,
    PipelineNotFound,
)

if TYPE_CHECKING:
    from engine.runtime.engine import Engine

#: 100 us .. 10 s in steps of 1, 1.5, 2, 3, 5, 7.5 per decade (neighbours at most 5/3 apart)
LATENCY_BUCKETS = (
    *(round(d * m, 7) for d in (1e-4, 1e-3, 1e-2, 1e-1, 1.0) for m in (1, 1.5, 2, 3, 5, 7.5)),
    10.0,
)
#: batch sizes are powers of two in practice
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

#: the request statuses, one per IDL exception, and what maps to each
STATUSES: tuple[tuple[str, type[BaseException]], ...] = (
    ("invalid_request", InvalidRequest),
    ("pipeline_not_found", PipelineNotFound),
    ("overloaded", Overloaded),
    ("deadline_exceeded", DeadlineExceeded),
    ("inference_error", InferenceError),
)


def status_of(error: BaseException | None) -> str:
    """The ``status`` label of a request that ended with ``error`` (None: ``ok``)."""
    if error is None:
        return "ok"
    for status, kind in STATUSES:
        if isinstance(error, kind):
            return status
    return "inference_error"  # anything else reaches the client as InferenceError


def error_type(error: BaseException) -> str:
    """A bounded ``error`` label: the dagserve class name, else ``internal``."""
    return type(error).__name__ if isinstance(error, DagserveError) else "internal"


class Metrics:
    """The metric families of one server, in their own registry.

    The families that every request updates are this module's own (:class:`Counter`,
    :class:`Gauge`, :class:`Histogram`): plain numbers that the event loop's thread updates
    without a lock, and a scrape reads.  ``prometheus_client``'s take a lock per number and
    look the labels up per update, which cost more than the rest of a tiny request's metrics.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "dagserve_requests", "Requests by pipeline, version and status.",
            ["pipeline", "version", "status"],
        )  # fmt: skip
        self.request_seconds = Histogram(
            "dagserve_request_duration_seconds", "Request latency, from decoded to answered.",
            ["pipeline", "version"], LATENCY_BUCKETS,
        )  # fmt: skip
        self.inflight = Gauge(
            "dagserve_inflight_requests", "Requests being executed.", ["pipeline"]
        )
        self.node_seconds = Histogram(
            "dagserve_node_duration_seconds",
            "Node latency within a request: queue and compute for model nodes.",
            ["pipeline", "node"], LATENCY_BUCKETS,
        )  # fmt: skip
        self.node_errors = Counter(
            "dagserve_node_errors", "Node failures by error type.", ["pipeline", "node", "error"]
        )
        self.queue_seconds = Histogram(
            "dagserve_model_queue_duration_seconds",
            "Time an item waited in its model's batcher before its batch started.",
            ["model"], LATENCY_BUCKETS,
        )  # fmt: skip
        self.batch_size = Histogram(
            "dagserve_model_batch_size", "Items per call of the model.", ["model"], BATCH_BUCKETS
        )
        self.compute_seconds = Histogram(
            "dagserve_model_compute_duration_seconds",
            "Time one batch took in the model (worker crossing included).",
            ["model"], LATENCY_BUCKETS,
        )  # fmt: skip
        # A shadow version gets a copy of each request (engine.runtime.lifecycle): how often,
        # how far its outputs differ from the served ones, how long it took, how many dropped.
        shadow = ["pipeline", "version"]
        self.shadow_requests = Counter(
            "dagserve_shadow_requests", "Requests mirrored to a shadow version.", shadow
        )
        self.shadow_mismatches = Counter(
            "dagserve_shadow_mismatches",
            "Mirrored requests whose outputs differ from the served ones (names, dtype, shape, "
            "or values beyond rtol 1e-5 + atol 1e-8), or that failed on the shadow.",
            shadow,
        )
        self.shadow_max_abs_difference = Gauge(
            "dagserve_shadow_max_abs_difference",
            "Largest absolute difference seen between a shadow's output and the served one.",
            shadow,
            combine=max,
        )
        self.shadow_seconds = Histogram(
            "dagserve_shadow_duration_seconds", "Latency of mirrored requests on the shadow.",
            shadow, LATENCY_BUCKETS,
        )  # fmt: skip
        self.shadow_dropped = Counter(
            "dagserve_shadow_dropped",
            "Copies not mirrored because too many were in flight on the shadow.",
            shadow,
        )
        self.registry.register(
            _Families(
                self.requests, self.request_seconds, self.inflight, self.node_seconds,
                self.node_errors, self.queue_seconds, self.batch_size, self.compute_seconds,
                self.shadow_requests, self.shadow_mismatches, self.shadow_max_abs_difference,
                self.shadow_seconds, self.shadow_dropped,
            )
        )  # fmt: skip
        # A node's shadow variant gets a copy of the node's inputs (engine.runtime.variants);
        # the same numbers as a shadow version's, per node.  Which variant answered shows in
        # dagserve_node_duration_seconds, whose node label is then "node@variant".
        variant = ["pipeline", "node", "variant"]
        self.variant_shadow_requests = Counter(
            "dagserve_variant_shadow_requests",
            "Copies of a node's inputs mirrored to its shadow variant.", variant,
        )  # fmt: skip
        self.variant_shadow_mismatches = Counter(
            "dagserve_variant_shadow_mismatches",
            "Mirrored copies whose outputs differ from the node's (names, dtype, shape, or "
            "values beyond rtol 1e-5 + atol 1e-8), or that failed on the shadow variant.",
            variant,
        )
        self.variant_shadow_max_abs_difference = Gauge(
            "dagserve_variant_shadow_max_abs_difference",
            "Largest absolute difference seen between a shadow variant's output and the node's.",
            variant,
            combine=max,
        )
        self.variant_shadow_seconds = Histogram(
            "dagserve_variant_shadow_duration_seconds",
            "Latency of mirrored copies on the shadow variant.", variant, LATENCY_BUCKETS,
        )  # fmt: skip
        self.variant_shadow_dropped = Counter(
            "dagserve_variant_shadow_dropped",
            "Copies not mirrored because too many were in flight on the shadow variant.",
            variant,
        )
        self.registry.register(
            _Families(
                self.variant_shadow_requests, self.variant_shadow_mismatches,
                self.variant_shadow_max_abs_difference, self.variant_shadow_seconds,
                self.variant_shadow_dropped,
            )
        )  # fmt: skip

    def batch_observer(self, model: str) -> Callable[[int, list[float], float], None]:
        """The batcher's hook for one model: batch size, each item's wait, compute time."""
        batch_size, queue, compute = self.batch_size, self.queue_seconds, self.compute_seconds
        for family in (batch_size, queue, compute):
            family.series(model)  # exported from the start, at 0

        def observe(size: int, waits: list[float], seconds: float) -> None:
            batch_size.observe(size, model)
            for wait in waits:
                queue.observe(wait, model)
            compute.observe(seconds, model)

        return observe

    def snapshot(self) -> dict[str, Any]:
        """This front's numbers, for the first front to add to its own (``engine.fronts``)."""
        return {family.name: family.snapshot() for family in self._families()}

    def absorb(self, front: int, snapshot: dict[str, Any]) -> None:
        """Add the numbers of another front process of this server, replacing its last ones."""
        for family in self._families():
            numbers = snapshot.get(family.name)
            if numbers is not None:
                family.absorb(front, numbers)

    def retire(self, front: int) -> None:
        """The front ended (or restarted): its counts stay in the totals, its gauges go."""
        for family in self._families():
            family.retire(front)

    def _families(self) -> list[Counter | Gauge | Histogram]:
        return [v for v in vars(self).values() if isinstance(v, Counter | Gauge | Histogram)]

    def watch(self, engine: Engine, connections: Callable[[], int] | None = None) -> None:
        """Read the engine's live state (queues, workers, GPUs) at every scrape."""
        self.registry.register(_LiveCollector(engine, connections))


# --- the families every request updates ---------------------------------------------------
# Updated on the event loop's thread only; a scrape (on another thread) copies what it reads.


class _Fronts:
    """The numbers that other front processes of the server reported (``engine.fronts``).

    A secondary front sends :meth:`snapshot` of its families every second; the primary
    ``absorb``s it and exports each series as the sum over fronts.  A front that ends is
    ``retire``d: a counter keeps its counts (a total never goes back), a gauge drops them.
    """

    _keep_retired = True

    def __init__(self) -> None:
        #: front -> label values -> its numbers
        self._remote: dict[int, dict[tuple[str, ...], Any]] = {}
        self._retired: dict[tuple[str, ...], Any] = {}

    def snapshot(self) -> dict[tuple[str, ...], Any]:
        raise NotImplementedError

    def absorb(self, front: int, numbers: dict[tuple[str, ...], Any]) -> None:
        self._remote[front] = numbers

    def retire(self, front: int) -> None:
        numbers = self._remote.pop(front, None)
        if numbers and self._keep_retired:
            for labels, value in numbers.items():
                old = self._retired.get(labels)
                self._retired[labels] = value if old is None else self._add(old, value)

    def _merged(self, own: dict[tuple[str, ...], Any]) -> dict[tuple[str, ...], Any]:
        if not self._remote and not self._retired:
            return own
        merged = dict(own)
        for numbers in (self._retired, *self._remote.values()):
            for labels, value in numbers.items():
                old = merged.get(labels)
                merged[labels] = value if old is None else self._add(old, value)
        return merged

    def _add(self, a: Any, b: Any) -> Any:
        return a + b


class Counter(_Fronts):
    """A labelled counter: ``inc(*label_values)``; exported as ``<name>_total``/``_created``."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str]) -> None:
        super().__init__()
        self.name, self.documentation, self.labelnames = name, documentation, list(labelnames)
        #: label values -> [count, created]
        self._series: dict[tuple[str, ...], list[float]] = {}

    def inc(self, *labels: str) -> None:
        series = self._series.get(labels)
        if series is None:
            series = self._series[labels] = [0.0, time.time()]
        series[0] += 1

    def snapshot(self) -> dict[tuple[str, ...], Any]:
        return {labels: series[0] for labels, series in list(self._series.items())}

    def collect(self) -> Metric:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        own = {labels: series[0] for labels, series in list(self._series.items())}
        for labels, count in self._merged(own).items():
            series = self._series.get(labels) or self._series.setdefault(labels, [0.0, time.time()])
            family.add_metric(labels, count, created=series[1])
        return family


class Gauge(_Fronts):
    """A labelled gauge that goes up and down: ``inc(*label_values)``, ``dec(...)``."""

    _keep_retired = False

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        *,
        combine: Callable[[float, float], float] = operator.add,
    ) -> None:
        super().__init__()
        self.name, self.documentation, self.labelnames = name, documentation, list(labelnames)
        self._values: dict[tuple[str, ...], float] = {}
        #: how the values of several front processes make the server's (``max`` for a maximum)
        self._combine = combine

    def inc(self, *labels: str) -> None:
        self._values[labels] = self._values.get(labels, 0.0) + 1

    def dec(self, *labels: str) -> None:
        self._values[labels] = self._values.get(labels, 0.0) - 1

    def set(self, value: float, *labels: str) -> None:
        self._values[labels] = value

    def get(self, *labels: str) -> float:
        return self._values.get(labels, 0.0)

    def snapshot(self) -> dict[tuple[str, ...], Any]:
        return dict(self._values)

    def _add(self, a: Any, b: Any) -> Any:
        return self._combine(a, b)

    def collect(self) -> Metric:
        family = GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, value in self._merged(dict(self._values)).items():
            family.add_metric(labels, value)
        return family


class Histogram(_Fronts):
    """A labelled histogram: ``observe(value, *label_values)``; exported as Prometheus'
    cumulative ``le`` buckets (``+Inf`` added), ``_count``, ``_sum`` and ``_created``."""

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float]
    ) -> None:
        super().__init__()
        self.name, self.documentation, self.labelnames = name, documentation, list(labelnames)
        bounds = [float(b) for b in buckets]
        if bounds[-1] != math.inf:
            bounds.append(math.inf)
        self._bounds = bounds
        self._les = [floatToGoString(b) for b in bounds]  # type: ignore[no-untyped-call]
        #: label values -> [count per bucket, sum, created]
        self._series: dict[tuple[str, ...], list[Any]] = {}

    def series(self, *labels: str) -> list[Any]:
        """The numbers of these label values (exported from now on, at 0 until observed)."""
        series = self._series.get(labels)
        if series is None:
            series = self._series[labels] = [[0] * len(self._bounds), 0.0, time.time()]
        return series

    def observe(self, value: float, *labels: str) -> None:
        series = self._series.get(labels) or self.series(*labels)
        # the first bucket whose bound is >= value, as prometheus_client counts it
        series[0][bisect.bisect_left(self._bounds, value)] += 1
        series[1] += value

    def snapshot(self) -> dict[tuple[str, ...], Any]:
        return {labels: (list(s[0]), s[1]) for labels, s in list(self._series.items())}

    def _add(self, a: Any, b: Any) -> Any:
        return [x + y for x, y in zip(a[0], b[0], strict=True)], a[1] + b[1]

    def collect(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        own = {labels: (s[0], s[1]) for labels, s in list(self._series.items())}
        for labels, (counts, total) in self._merged(own).items():
            created = self.series(*labels)[2]
            cumulative = itertools.accumulate(list(counts))
            family.add_metric(labels, list(zip(self._les, cumulative, strict=True)), total)
            where = dict(zip(self.labelnames, labels, strict=True))
            family.samples.append(Sample(f"{self.name}_created", where, created))
        return family


class _Families(Collector):
    def __init__(self, *families: Counter | Gauge | Histogram) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        for family in self.families:
            yield family.collect()


class _LiveCollector(Collector):
    def __init__(self, engine: Engine, connections: Callable[[], int] | None) -> None:
        self.engine = engine
        self.connections = connections

    def collect(self) -> Iterator[Metric]:
        open_connections = GaugeMetricFamily(
            "dagserve_open_connections", "Thrift connections open now."
        )
        open_connections.add_metric([], self.connections() if self.connections else 0)
        yield open_connections

        queue = GaugeMetricFamily(
            "dagserve_model_queue_length", "Items waiting in the model's batcher.", labels=["model"]
        )
        quarantined = GaugeMetricFamily(
            "dagserve_model_quarantined",
            "1 while the model is quarantined for crashing its worker (its requests fail at once).",
            labels=["model"],
        )
        refused = self.engine.workers.quarantined()
        for model in self.engine.models.values():
            queue.add_metric([model.model_id], model.statistics().queued_items)
            quarantined.add_metric([model.model_id], 1.0 if model.model_id in refused else 0.0)
        yield queue
        yield quarantined

        # the version each models:/ (or URI) model of a served version resolved to (issue 13);
        # a label of its own, so that model ids and the other families stay as they were
        registry = GaugeMetricFamily(
            "dagserve_model_registry_info",
            "1 for the registry version (or object etag) that a remote model: of a served "
            "pipeline version resolved to.",
            labels=["pipeline", "version", "model_uri", "registry_version"],
        )
        for versions in list(self.engine._served.values()):
            for served in list(versions.values()):
                name, version = served.pipeline.name, served.pipeline.version
                for uri, found in resolver().resolutions(served.pipeline).items():
                    registry.add_metric([name, version, uri, found.version or ""], 1.0)
        yield registry

        up = GaugeMetricFamily("dagserve_worker_up", "1 if the worker answers.", labels=["worker"])
        restarts = CounterMetricFamily(
            "dagserve_worker_restarts", "Times the worker was replaced.", labels=["worker"]
        )
        rss = GaugeMetricFamily(
            "dagserve_worker_resident_memory_bytes", "Resident memory of the worker process.",
            labels=["worker"],
        )  # fmt: skip
        crashes = CounterMetricFamily(
            "dagserve_worker_crashes",
            "Unplanned deaths of the worker, by the model whose call caused them "
            '("" when no crash dump named one).',
            labels=["worker", "model"],
        )
        info = GaugeMetricFamily(
            "dagserve_worker_info",
            "1 per worker; ray_node and ray_ip name the Ray node of a worker that is a Ray "
            "actor (empty for a local process).",
            labels=["worker", "ray_node", "ray_ip"],
        )
        for name, stats in self.engine.workers.statistics().items():
            ray_node = str(stats.get("ray_node", ""))
            info.add_metric([name, ray_node, str(stats.get("ray_ip", ""))], 1.0)
            up.add_metric([name], 1.0 if stats["ready"] else 0.0)
            restarts.add_metric([name], float(stats["restarts"]))  # type: ignore[arg-type]
            # every hosted model from 0, so that a first crash shows as an increase
            counts = dict.fromkeys(stats["models"], 0) | stats["crashes"]  # type: ignore[call-overload]
            for model, count in counts.items():
                crashes.add_metric([name, model], float(count))
            # a Ray actor's pid is its node's, not this machine's: not read here
            memory = None if ray_node else resident_mb(stats["pid"])  # type: ignore[arg-type]
            if memory is not None:
                rss.add_metric([name], memory * 1024 * 1024)
        yield info
        yield up
        yield restarts
        yield crashes
        yield rss
        yield from _gpu_families(self.engine)


def _gpu_families(engine: Engine) -> Iterator[Metric]:
    inventory = engine.inventory
    if not inventory.has_gpu:
        return  # no NVML or no card: the GPU families are absent, nothing fails
    labels = ["gpu", "name"]
    families = {
        "utilization": GaugeMetricFamily(
            "dagserve_gpu_utilization_ratio", "GPU busy fraction (NVML).", labels=labels
        ),
        "used": GaugeMetricFamily(
            "dagserve_gpu_memory_used_bytes", "GPU memory in use.", labels=labels
        ),
        "total": GaugeMetricFamily(
            "dagserve_gpu_memory_total_bytes", "GPU memory in all.", labels=labels
        ),
        "temperature": GaugeMetricFamily(
            "dagserve_gpu_temperature_celsius", "GPU temperature.", labels=labels
        ),
        "power": GaugeMetricFamily("dagserve_gpu_power_watts", "GPU power draw.", labels=labels),
    }
    mib = 1024 * 1024
    for gpu in inventory.sample():
        key = [gpu.device, gpu.name]
        families["used"].add_metric(key, gpu.memory_used_mb * mib)
        families["total"].add_metric(key, gpu.memory_total_mb * mib)
        if gpu.utilization_percent is not None:
            families["utilization"].add_metric(key, gpu.utilization_percent / 100.0)
        if gpu.temperature_c is not None:
            families["temperature"].add_metric(key, gpu.temperature_c)
        if gpu.power_watts is not None:
            families["power"].add_metric(key, gpu.power_watts)
    yield from families.values()
    placement = engine.placement
    if placement is None:
        return
    memory = GaugeMetricFamily(
        "dagserve_gpu_committed_memory_bytes", "GPU memory that placement committed to models.",
        labels=["gpu"],
    )  # fmt: skip
    share = GaugeMetricFamily(
        "dagserve_gpu_committed_share", "GPU compute share that placement committed to models.",
        labels=["gpu"],
    )  # fmt: skip
    for device, budget in placement.budgets.items():
        if device.startswith("cuda:"):
            memory.add_metric([device], budget.memory_committed_mb * mib)
            share.add_metric([device], budget.share_committed)
    yield memory
    yield share


__all__ = ["BATCH_BUCKETS", "LATENCY_BUCKETS", "Metrics", "error_type", "status_of"]
