"""Dynamic batching of one model: items from many requests meet in one ``predict`` call.

The batcher is work-conserving.  While an instance of the model is idle, waiting items go at
the end of the event-loop turn that queued them (``max_delay_s`` = 0, the default, never holds
an item back longer), so that items submitted in one turn (two branches of one request that
feed the same model, requests read together) meet in one batch; while every instance is busy,
items accumulate, and the next batch takes up to ``max_batch_size`` of them.  With
``max_delay_s`` > 0 the first waiting item may be held that long for the batch to grow.

The biggest batch is not always the fastest: on CPUs a model often has its best throughput
below ``max_batch_size``.  The batcher learns each model's items/s by batch size (powers of
two, and ``max_batch_size``) from the calls it times, and when more items wait than the best
size, it forms batches of the size that computes them soonest (under load, the best size),
unless a request would then miss its deadline or ``max_queue_delay_s`` that the biggest batch
would meet.  It measures the sizes next to the best one now and then, so that it follows a
model whose speed changes.
``preferred_batch_sizes`` replaces the learning: batches take the largest preferred size that
the waiting items fill, else all of them (as Triton's ``preferred_batch_size``).

It is bounded (``max_queue`` items; past it ``submit`` raises ``Overloaded`` at once), deadline
aware (an item whose deadline has passed is answered ``DeadlineExceeded`` before it costs
compute; a request whose caller gave up is dropped), and isolates failures.  A model that
fails some items alone returns a :class:`~model_plugins.partial.Partial`: each error goes to
the request that owns the item, the others get their rows, and nothing runs again.  When a
batch raises instead, it is split by request and each half is run again, so that only the
requests that fail on their own are answered with the error.

It is the one place that bounds a model's concurrency: at most ``instances`` batches run at
once, and each call is told which instance (0 .. ``instances`` - 1) is free to take it.

Items are concatenated along the first dimension and the results split back.  Items whose
other dimensions differ are batched only with items of the same shape (shape buckets), unless
the plugin declares how to pad them (:class:`Padding`).  A request that carries more items
than fit in one batch is split across batches and merged back in order.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from engine.runtime.naming import item_error
from model_plugins.errors import (
    DagserveError,
    DeadlineExceeded,
    InferenceError,
    InvalidRequest,
    Overloaded,
)
from model_plugins.partial import Partial
from model_plugins.plugin import Batch

logger = logging.getLogger(__name__)

#: the weight of a new measurement in a batch size's items/s (an exponential average)
_RATE_WEIGHT = 0.3
#: batches after which a size next to the best one is measured again
_REMEASURE_AFTER = 64
#: the fewest waiting items that may be split to measure a size: a split costs the items
#: left over a batch's wait, and few items (the branches of one request) should go together
_EXPLORE_MIN_ITEMS = 8


class BatchCall(Protocol):
    """Runs the model on one batch, the batcher's callee.

    Args:
        inputs: input name -> array (or list, for a ragged model); first dimension = items.
        instance: which loaded copy of the model is free for this call.
        deadline: on the loop's clock, the latest deadline of the batch's requests, or None
            when one of them has none: past it, nobody waits for the batch.

    Returns:
        A row per item, checked against the batch contract; or a :class:`Partial` whose
        ``errors`` fail some items alone.
    """

    def __call__(
        self, inputs: Batch, *, instance: int, deadline: float | None
    ) -> Awaitable[Batch | Partial]: ...


class Clock(Protocol):
    """Where the batcher reads time and sets timers: the event loop, or a fake in tests."""

    def time(self) -> float: ...

    def call_at(self, when: float, callback: Callable[[], None]) -> asyncio.TimerHandle: ...


@dataclass(frozen=True)
class Padding:
    """How a plugin lets items of different shapes share a batch.

    Attributes:
        inputs: input name -> pad value; those inputs are padded at the end of every
            non-item dimension to the largest item of the batch.
        outputs: output name -> (input name, dimension): the output's ``dimension`` (counted
            without the item dimension) follows that input's padded dimension, and is cut back
            to each item's own length.
    """

    inputs: Mapping[str, float | int | str | bytes] = field(default_factory=dict)
    outputs: Mapping[str, tuple[str, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class BatcherStatistics:
    """A snapshot of one batcher, for metrics and ``health``."""

    queued_items: int
    """Items waiting for a batch now."""
    busy_instances: int
    """Batches being computed now."""
    batches: int
    """Batches sent to the model since start."""
    items: int
    """Items in those batches."""
    batch_sizes: dict[int, int]
    """Batch size -> how many batches had it."""
    queue_wait_s_total: float
    """Sum over dispatched items of the time they waited in the queue."""
    queue_wait_s_max: float
    """The longest any item waited."""
    deadline_dropped: int
    """Items answered DeadlineExceeded before compute."""
    rejected: int
    """Requests answered Overloaded because the queue was full."""
    failed_requests: int
    """Requests answered with the model's error (after isolation, or for an item of theirs)."""
    best_batch_size: int | None
    """The size batches take when more items wait: the largest preferred size, or the learned
    best one; None while nothing is learned (batches take up to ``max_batch_size``)."""
    throughput: dict[int, float]
    """Batch size (a power of two, or ``max_batch_size``) -> learned items/s of batches of
    that size (and up to the next one)."""

    @property
    def mean_batch_size(self) -> float:
        return self.items / self.batches if self.batches else 0.0


@dataclass(eq=False)
class _Request:
    inputs: Batch
    n: int
    deadline: float | None
    enqueued: float
    future: asyncio.Future[Batch]
    shape_key: tuple[Any, ...]
    taken: int = 0  # items already handed to batches
    answered: int = 0
    parts: dict[int, Batch] = field(default_factory=dict)

    @property
    def waiting(self) -> int:
        return self.n - self.taken


@dataclass(frozen=True)
class _Slice:
    request: _Request
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


class Batcher:
    """Batches the items of concurrent requests for one model.

    Args:
        call: runs the model on one batch (see :class:`BatchCall`); it checks the batch
            contract of what it returns.
        max_batch_size: the most items per call.  None: never merge requests (each call
            gets exactly one request's items, however many).
        max_delay_s: how long the first waiting item may be held to grow a batch.
        max_queue: the most items that may wait; more is ``Overloaded``.
        instances: how many calls may run at once, one per loaded copy of the model.
        padding: how items of different shapes may share a batch (else: shape buckets).
        ragged: hand the model lists of per-item arrays instead of stacked arrays.
        clock: ``time()`` and ``call_at()``; default: the running loop.
        name: for messages and logs.
        on_batch: called after each batch with its size, each item's wait in the queue, and
            how long the call took (the metrics hook).
        max_queue_delay_s: refuse (``Overloaded``) a request whose expected wait, from the
            queue ahead of it and the recent batch times, is longer: under overload the
            accepted requests keep their latency instead of all waiting longer.
        preferred_batch_sizes: batches take the largest of these sizes that the waiting
            items fill, else all of them; no learning of the best size.
    """

    def __init__(
        self,
        call: BatchCall,
        *,
        max_batch_size: int | None,
        max_delay_s: float = 0.0,
        max_queue: int,
        instances: int = 1,
        padding: Padding | None = None,
        ragged: bool = False,
        clock: Clock | None = None,
        name: str = "model",
        on_batch: Callable[[int, list[float], float], None] | None = None,
        max_queue_delay_s: float | None = None,
        preferred_batch_sizes: Sequence[int] = (),
    ) -> None:
        if max_batch_size is not None and (
            not isinstance(max_batch_size, int) or max_batch_size < 1
        ):
            msg = f"max_batch_size must be an integer >= 1 or None (got {max_batch_size!r})"
            raise ValueError(msg)
        if max_delay_s < 0:
            msg = f"max_delay_s must be >= 0 (got {max_delay_s!r})"
            raise ValueError(msg)
        if max_queue < 1 or instances < 1:
            msg = f"max_queue and instances must be >= 1 (got {max_queue}, {instances})"
            raise ValueError(msg)
        if preferred_batch_sizes and not all(
            isinstance(size, int) and 1 <= size <= (max_batch_size or 0)
            for size in preferred_batch_sizes
        ):
            msg = (
                f"preferred_batch_sizes must be integers from 1 to max_batch_size "
                f"{max_batch_size} (got {list(preferred_batch_sizes)!r})"
            )
            raise ValueError(msg)
        self._call = call
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self.instances = instances
        self.padding = padding or Padding()
        self.ragged = ragged
        self.name = name
        self._clock = clock
        self.on_batch = on_batch
        self.max_queue_delay_s = max_queue_delay_s
        self.preferred_batch_sizes = tuple(sorted(set(preferred_batch_sizes)))
        self._queue: collections.deque[_Request] = collections.deque()
        self._queued_items = 0
        #: the instances no batch runs on now
        self._free = list(range(instances - 1, -1, -1))
        self._tasks: set[asyncio.Task[None]] = set()
        self._delay_timer: asyncio.TimerHandle | None = None
        self._dispatch_pending = False  # a dispatch at the end of this loop turn
        self._closed = False
        #: the batch sizes whose throughput is learned
        self._buckets = _buckets(max_batch_size) if max_batch_size else ()
        self._rate: dict[int, float] = {}  # bucket -> items/s, exponentially weighted
        self._measured_at: dict[int, int] = {}  # bucket -> self._batches when last measured
        # statistics
        self._batches = 0
        self._items = 0
        self._sizes: collections.Counter[int] = collections.Counter()
        self._wait_total = 0.0
        self._wait_max = 0.0
        self._dropped = 0
        self._rejected = 0
        self._failed = 0
        self._batch_seconds = 0.0  # exponential average of a batch's compute time

    # -- the public side -----------------------------------------------------------------

    def _now(self) -> float:
        return self._clock.time() if self._clock else asyncio.get_running_loop().time()

    async def submit(self, inputs: Batch, *, deadline: float | None = None) -> Batch:
        """Queue one request's items and return the model's outputs for them, in order.

        Raises:
            InvalidRequest: the request alone has more items than ``max_queue``.
            Overloaded: the queue holds ``max_queue`` items already.
            DeadlineExceeded: the deadline passed before the items reached the model.
            DagserveError: what the model raised for this request.
        """
        if self._closed:
            msg = f"{self.name} is shutting down"
            raise Overloaded(msg, retry_after_ms=1000)
        n = _count_items(inputs)
        if n > self.max_queue:
            # Not an overload: no retry can succeed, so no retry hint.
            msg = (
                f"{self.name}: a request of {n} items can never be queued: it is more than "
                f"max_queue {self.max_queue}; send at most {self.max_queue} items per request"
            )
            raise InvalidRequest(msg, field="inputs")
        if self._queued_items + n > self.max_queue:
            self._rejected += 1
            msg = (
                f"{self.name}: {self._queued_items} items are waiting (max_queue "
                f"{self.max_queue}); retry later"
            )
            raise Overloaded(msg, retry_after_ms=self._retry_after_ms())
        if n == 0:
            # Nothing to batch or to hold an instance for: the worker queues it on instance 0.
            result = await self._call(inputs, instance=0, deadline=deadline)
            return result.outputs if isinstance(result, Partial) else result
        if self.max_queue_delay_s is not None and self._batch_seconds:
            expected = self._expected_wait_s(n)
            if expected > self.max_queue_delay_s:
                self._rejected += 1
                msg = (
                    f"{self.name}: the expected wait ({expected * 1000:.0f} ms) is past "
                    f"max_queue_delay_ms ({self.max_queue_delay_s * 1000:g} ms); retry later"
                )
                raise Overloaded(msg, retry_after_ms=self._retry_after_ms())
        future: asyncio.Future[Batch] = asyncio.get_running_loop().create_future()
        request = _Request(inputs, n, deadline, self._now(), future, self._shape_key(inputs))
        self._queue.append(request)
        self._queued_items += n
        self._dispatch_soon()
        try:
            return await future
        except asyncio.CancelledError:
            # The caller gave up (deadline, hung-up client): its waiting items are skipped.
            self._forget(request)
            raise

    def statistics(self) -> BatcherStatistics:
        return BatcherStatistics(
            queued_items=self._queued_items,
            busy_instances=self._busy,
            batches=self._batches,
            items=self._items,
            batch_sizes=dict(sorted(self._sizes.items())),
            queue_wait_s_total=self._wait_total,
            queue_wait_s_max=self._wait_max,
            deadline_dropped=self._dropped,
            rejected=self._rejected,
            failed_requests=self._failed,
            best_batch_size=(
                self.preferred_batch_sizes[-1] if self.preferred_batch_sizes else self._best()
            ),
            throughput={size: self._rate[size] for size in sorted(self._rate)},
        )

    async def aclose(self) -> None:
        """Refuse new requests, fail the waiting ones, and wait for running batches."""
        self._closed = True
        while self._queue:
            request = self._queue.popleft()
            if not request.future.done():
                msg = f"{self.name} shut down before the request reached it"
                request.future.set_exception(Overloaded(msg, retry_after_ms=1000))
        self._queued_items = 0
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- forming batches -----------------------------------------------------------------

    @property
    def _busy(self) -> int:
        return self.instances - len(self._free)

    def _dispatch_soon(self) -> None:
        """Start batches at the end of this loop turn: the items submitted in the same turn
        (the branches of one request, requests read together) join them, and wait no longer."""
        if self._dispatch_pending or not self._free:
            return  # a busy model dispatches when a batch ends
        self._dispatch_pending = True
        asyncio.get_running_loop().call_soon(self._on_dispatch_soon)

    def _on_dispatch_soon(self) -> None:
        self._dispatch_pending = False
        if not self._closed:
            self._dispatch()

    def _dispatch(self) -> None:
        """Start as many batches as there are idle instances (called on every change)."""
        while self._free and self._queue:
            self._drop_dead_heads()
            if not self._queue:
                return
            if self._should_wait():
                return
            batch = self._take_batch()
            if not batch:
                continue
            task = asyncio.get_running_loop().create_task(self._run(batch, self._free.pop()))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _should_wait(self) -> bool:
        """Hold the batch back while it may still grow within ``max_delay_s``."""
        if self.max_delay_s <= 0 or self.max_batch_size is None:
            return False
        if self._queued_items >= self._full_size():
            return False
        wake_at = self._queue[0].enqueued + self.max_delay_s
        if self._now() >= wake_at:
            return False
        if self._delay_timer is None:
            self._delay_timer = self._call_at(wake_at, self._on_delay_timer)
        return True

    def _on_delay_timer(self) -> None:
        self._delay_timer = None
        self._dispatch()

    def _call_at(self, when: float, callback: Callable[[], None]) -> asyncio.TimerHandle:
        if self._clock is not None:
            return self._clock.call_at(when, callback)
        return asyncio.get_running_loop().call_at(when, callback)

    def _drop_dead_heads(self) -> None:
        now = self._now()
        kept: collections.deque[_Request] = collections.deque()
        for request in self._queue:
            if request.future.done():  # cancelled by its caller
                self._queued_items -= request.waiting
                continue
            if request.deadline is not None and now >= request.deadline:
                self._queued_items -= request.waiting
                self._dropped += request.waiting
                msg = (
                    f"{self.name}: the deadline passed after {now - request.enqueued:.3f} s "
                    "in the queue, before the model ran"
                )
                request.future.set_exception(DeadlineExceeded(msg))
                continue
            kept.append(request)
        self._queue = kept

    def _take_batch(self) -> list[_Slice]:
        now = self._now()
        limit = self.max_batch_size
        if limit is None:  # one whole request per call
            request = self._queue.popleft()
            self._queued_items -= request.waiting
            self._note_wait(now - request.enqueued, request.waiting)
            slice_ = _Slice(request, request.taken, request.n)
            request.taken = request.n
            return [slice_]
        key = self._queue[0].shape_key
        available = sum(r.waiting for r in self._queue if r.shape_key == key)
        batch: list[_Slice] = []
        room = self._batch_size(available, key)
        for request in list(self._queue):
            if room == 0:
                break
            if request.shape_key != key:
                continue  # another shape bucket: it waits for a batch of its own shape
            take = min(room, request.waiting)
            batch.append(_Slice(request, request.taken, request.taken + take))
            request.taken += take
            room -= take
            self._queued_items -= take
            self._note_wait(now - request.enqueued, take)
            if request.waiting == 0:
                self._queue.remove(request)
        return batch

    def _batch_size(self, available: int, key: tuple[Any, ...]) -> int:
        """How many of the ``available`` waiting items of shape ``key`` the next batch takes."""
        limit = self.max_batch_size or available
        if self.preferred_batch_sizes:
            filled = [size for size in self.preferred_batch_sizes if size <= available]
            return filled[-1] if filled else min(available, limit)
        return min(available, limit, self._learned_size(available, key))

    def _learned_size(self, available: int, key: tuple[Any, ...]) -> int:
        """From the best size up, the batch size that would compute the ``available`` items
        soonest (so, under load, the size of the best throughput), within the latency bounds;
        now and then one next to the best size instead, to measure it again."""
        limit = self.max_batch_size or available
        best = self._best()
        if best is None or available < best:
            return limit  # all that waits
        if any(b not in self._rate for b in self._buckets if best < b <= available):
            return limit  # a bigger batch than any measured: measure it
        if available >= _EXPLORE_MIN_ITEMS:
            i = self._buckets.index(best)
            for size in (*self._buckets[max(i - 1, 0) : i], *self._buckets[i + 1 : i + 2]):
                measured = self._measured_at.get(size)
                stale = measured is None or self._batches - measured > _REMEASURE_AFTER
                if stale and size <= available and (size > best or available >= 2 * size):
                    return size
        biggest = min(available, limit)
        sizes = {b for b in self._rate if b < biggest} | {biggest}
        # the queue's compute time in batches of each size (one round per free instance);
        # a remainder counts as a whole batch, so a split has to pay for itself
        free = max(len(self._free), 1)
        ranked = sorted(
            sizes,
            key=lambda b: (math.ceil(math.ceil(available / b) / free) * self._seconds(b), -b),
        )
        if not self._bounded(key):
            return ranked[0]
        late = self._late(biggest, key)
        return next(b for b in ranked if self._late(b, key) <= late)

    def _best(self) -> int | None:
        """The learned size of the best throughput, None while nothing is measured."""
        return max(self._rate, key=self._rate.__getitem__) if self._rate else None

    def _full_size(self) -> int:
        """The size at which ``max_delay_s`` stops waiting for more items."""
        limit = self.max_batch_size or 1
        if self.preferred_batch_sizes:
            return self.preferred_batch_sizes[-1]
        best = self._best()
        if best is None or best == limit:
            return limit
        # a best size below a measured bigger one: growing past it gains nothing
        bigger = self._buckets[self._buckets.index(best) + 1]
        return best if bigger in self._rate else limit

    def _bounded(self, key: tuple[Any, ...]) -> bool:
        if self.max_queue_delay_s is not None:
            return True
        return any(r.deadline is not None for r in self._queue if r.shape_key == key)

    def _late(self, size: int, key: tuple[Any, ...]) -> int:
        """How many waiting requests of shape ``key`` would miss their deadline (or start
        after ``max_queue_delay_s``) if the queue went in batches of ``size``."""
        seconds = self._seconds(size)
        now = self._now()
        late = 0
        position = 0
        for request in self._queue:
            if request.shape_key != key:
                continue
            position += request.waiting
            rounds = (math.ceil(position / size) - 1) // max(len(self._free), 1)
            start = now + rounds * seconds
            past_deadline = request.deadline is not None and start + seconds > request.deadline
            delay = self.max_queue_delay_s
            late += past_deadline or (delay is not None and start - request.enqueued > delay)
        return late

    def _seconds(self, size: int) -> float:
        """A batch's expected compute time, from the measured size nearest to ``size``."""
        nearest = min(self._rate, key=lambda b: abs(math.log2(b / size)))
        return size / self._rate[nearest]

    def _learn(self, size: int, seconds: float) -> None:
        if not self._buckets or seconds <= 0:
            return
        bucket = max(b for b in self._buckets if b <= size)
        rate = size / seconds
        old = self._rate.get(bucket)
        self._rate[bucket] = rate if old is None else old + _RATE_WEIGHT * (rate - old)
        self._measured_at[bucket] = self._batches

    def _note_wait(self, waited: float, items: int) -> None:
        self._wait_total += waited * items
        self._wait_max = max(self._wait_max, waited)

    def _forget(self, request: _Request) -> None:
        if request in self._queue:
            self._queue.remove(request)
            self._queued_items -= request.waiting

    def _expected_wait_s(self, n: int) -> float:
        """Batches ahead of ``n`` more items (running ones included) times a batch's time."""
        per_batch = self._full_size()
        waiting = math.ceil((self._queued_items + n) / per_batch)
        rounds = (self._busy + waiting) / self.instances
        return max(0.0, rounds - 1) * self._batch_seconds

    def _retry_after_ms(self) -> int:
        per_batch = self._batch_seconds or 0.01
        batches_ahead = math.ceil(self._queued_items / self._full_size())
        return max(1, math.ceil(1000 * per_batch * batches_ahead / self.instances))

    def _shape_key(self, inputs: Batch) -> tuple[Any, ...]:
        if self.ragged or self.max_batch_size is None:
            return ()
        return tuple(
            (name, None if name in self.padding.inputs else _item_shape(value))
            for name, value in sorted(inputs.items())
        )

    # -- running batches -----------------------------------------------------------------

    async def _run(self, batch: list[_Slice], instance: int) -> None:
        started = self._now()
        try:
            await self._run_isolating(batch, instance)
            if self.on_batch is not None:
                waits = [started - s.request.enqueued for s in batch for _ in range(s.size)]
                self.on_batch(len(waits), waits, self._now() - started)
        finally:
            self._free.append(instance)
            if not self._closed:
                self._dispatch()

    async def _run_isolating(self, batch: list[_Slice], instance: int) -> None:
        live = [s for s in batch if not s.request.future.done()]
        if not live:
            return
        size = sum(s.size for s in live)
        self._batches += 1
        self._items += size
        self._sizes[size] += 1
        started = self._now()
        deadlines = [s.request.deadline for s in live if s.request.deadline is not None]
        deadline = max(deadlines) if len(deadlines) == len(live) else None
        try:
            inputs, lengths = self._merge(live)
            result = await self._call(inputs, instance=instance, deadline=deadline)
        except (InferenceError, InvalidRequest, ValueError, TypeError) as exc:
            requests = list(dict.fromkeys(s.request for s in live))
            if len(requests) > 1 and _isolatable(exc):
                # Split by request and run each half again: only the requests that fail on
                # their own get the error.
                half = _split_index(live)
                await self._run_isolating(live[:half], instance)
                await self._run_isolating(live[half:], instance)
                return
            for request in requests:
                self._fail(request, exc)
            return
        except DagserveError as exc:
            for request in dict.fromkeys(s.request for s in live):
                self._fail(request, exc)
            return
        elapsed = self._now() - started
        self._batch_seconds = (
            elapsed if not self._batch_seconds else 0.8 * self._batch_seconds + 0.2 * elapsed
        )
        self._learn(size, elapsed)
        outputs, errors = (
            (result.outputs, result.errors) if isinstance(result, Partial) else (result, {})
        )
        try:
            self._split(live, outputs, errors, lengths)
        except DagserveError as exc:
            for request in dict.fromkeys(s.request for s in live):
                self._fail(request, exc)

    def _fail(self, request: _Request, exc: BaseException) -> None:
        if not request.future.done():
            self._failed += 1
            request.future.set_exception(exc)
            self._forget(request)

    def _merge(self, batch: list[_Slice]) -> tuple[Batch, dict[str, list[tuple[int, ...]]]]:
        names = batch[0].request.inputs.keys()
        merged: Batch = {}
        lengths: dict[str, list[tuple[int, ...]]] = {}
        for name in names:
            parts = [s.request.inputs[name][s.start : s.stop] for s in batch]
            if self.ragged:
                merged[name] = [item for part in parts for item in part]  # type: ignore[assignment]
            elif name in self.padding.inputs:
                merged[name], lengths[name] = _pad(parts, self.padding.inputs[name])
            elif len(parts) == 1:
                merged[name] = parts[0]
            else:
                merged[name] = np.concatenate(parts, axis=0)
        return merged, lengths

    def _split(
        self,
        batch: list[_Slice],
        outputs: Batch,
        errors: Mapping[int, DagserveError],
        lengths: dict[str, list[tuple[int, ...]]],
    ) -> None:
        """Hand each slice its rows (the call checked that there is one per item), or, when
        one of its items failed alone, fail the slice's request with that item's error."""
        offset = 0
        for s in batch:
            failed = min((i for i in errors if offset <= i < offset + s.size), default=None)
            if failed is not None:
                # the item's index within its own request, not within the batch
                self._fail(s.request, item_error(errors[failed], s.start + failed - offset))
                offset += s.size
                continue
            part: Batch = {}
            for name, value in outputs.items():
                piece = value[offset : offset + s.size]
                if name in self.padding.outputs:
                    source, dim = self.padding.outputs[name]
                    piece = _unpad(piece, lengths.get(source, []), offset, dim)
                part[name] = piece
            offset += s.size
            self._deliver(s, part)

    def _deliver(self, s: _Slice, part: Batch) -> None:
        request = s.request
        if request.future.done():
            return
        request.parts[s.start] = part
        request.answered += s.size
        if request.answered < request.n:
            return
        if len(request.parts) == 1:
            request.future.set_result(part)
            return
        ordered = [request.parts[k] for k in sorted(request.parts)]
        result: Batch = {}
        for name in ordered[0]:
            pieces = [p[name] for p in ordered]
            if isinstance(pieces[0], np.ndarray):
                result[name] = _concat_padded(pieces)
            else:
                result[name] = list(itertools.chain.from_iterable(pieces))
        request.future.set_result(result)


def _buckets(limit: int) -> tuple[int, ...]:
    """The batch sizes whose throughput is learned: powers of two below ``limit``, and it.

    >>> _buckets(32), _buckets(12), _buckets(1)
    ((1, 2, 4, 8, 16, 32), (1, 2, 4, 8, 12), (1,))
    """
    return (*(1 << i for i in range(limit.bit_length()) if 1 << i < limit), limit)


def _count_items(inputs: Batch) -> int:
    counts = {len(v) for v in inputs.values()}
    if len(counts) > 1:
        msg = f"inputs disagree on the number of items: {sorted(counts)}"
        raise InvalidRequest(msg, field="inputs")
    return counts.pop() if counts else 0


def _item_shape(value: Any) -> tuple[int, ...]:
    shape = getattr(value, "shape", None)
    return tuple(shape[1:]) if shape is not None else ()


def _isolatable(exc: BaseException) -> bool:
    # A dead worker says nothing about which request was bad: do not re-run the others on it;
    # nor on a quarantined model, which refuses every request alike.
    return type(exc).__name__ not in ("WorkerDied", "ModelQuarantined")


def _split_index(batch: list[_Slice]) -> int:
    requests = list(dict.fromkeys(s.request for s in batch))
    first_half = set(requests[: len(requests) // 2])
    return sum(1 for s in batch if s.request in first_half)


def _pad(parts: list[np.ndarray], value: Any) -> tuple[np.ndarray, list[tuple[int, ...]]]:
    items = [item for part in parts for item in part]
    shapes = [np.shape(item) for item in items]
    target = tuple(max(dims) for dims in zip(*shapes, strict=True)) if shapes else ()
    dtype = parts[0].dtype
    out = np.full((len(items), *target), value, dtype=dtype)
    for i, item in enumerate(items):
        index: tuple[Any, ...] = (i, *(slice(0, d) for d in np.shape(item)))
        out[index] = item
    return out, shapes


def _unpad(piece: np.ndarray, shapes: list[tuple[int, ...]], offset: int, dim: int) -> np.ndarray:
    """Cut each item's ``dim`` back to its own length; items of one slice may differ."""
    if not shapes:
        return piece
    own = [shapes[offset + i][dim] for i in range(len(piece))]
    width = max(own) if own else 0
    piece = piece[(slice(None), *([slice(None)] * dim), slice(0, width))]
    if len(set(own)) <= 1:
        return piece
    # Items of one request still differ: keep the request's own maximum, zero the rest.
    out = piece.copy()
    for i, length in enumerate(own):
        index: tuple[Any, ...] = (i, *([slice(None)] * dim), slice(length, None))
        out[index] = 0
    return out


def _concat_padded(pieces: list[np.ndarray]) -> np.ndarray:
    shapes = [p.shape[1:] for p in pieces]
    if len(set(shapes)) == 1:
        return np.concatenate(pieces, axis=0)
    target = tuple(max(d) for d in zip(*shapes, strict=True))
    out = np.zeros((sum(len(p) for p in pieces), *target), dtype=pieces[0].dtype)
    offset = 0
    for p in pieces:
        out[(slice(offset, offset + len(p)), *(slice(0, d) for d in p.shape[1:]))] = p
        offset += len(p)
    return out


__all__ = ["BatchCall", "Batcher", "BatcherStatistics", "Clock", "Padding"]
