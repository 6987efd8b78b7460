"""The batcher on a fake clock: no sleeps, every step driven by the test."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np
import pytest

from engine.runtime.batcher import Batcher, Padding
from model_plugins.errors import DeadlineExceeded, InferenceError, InvalidRequest, Overloaded
from model_plugins.partial import Partial


class FakeTimer:
    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when, self.callback, self.cancelled = when, callback, False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.timers: list[FakeTimer] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[[], None]) -> FakeTimer:
        timer = FakeTimer(when, callback)
        self.timers.append(timer)
        return timer

    async def advance(self, seconds: float) -> None:
        self.now += seconds
        due = sorted((t for t in self.timers if t.when <= self.now), key=lambda t: t.when)
        self.timers = [t for t in self.timers if t.when > self.now]
        for timer in due:
            if not timer.cancelled:
                timer.callback()
        await settle()


async def settle() -> None:
    """Let every ready task run (no time passes)."""
    for _ in range(20):
        await asyncio.sleep(0)


class FakeModel:
    """Records each batch; holds it until the test calls finish(), unless auto."""

    def __init__(self, auto: bool = False) -> None:
        self.auto = auto
        self.calls: list[tuple[dict[str, np.ndarray], asyncio.Future[None]]] = []
        self.instances: list[int] = []  # the instance each call was given

    @property
    def sizes(self) -> list[int]:
        return [len(batch["x"]) for batch, _ in self.calls]

    async def __call__(self, batch, *, instance, deadline) -> dict[str, np.ndarray]:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.calls.append((batch, done))
        self.instances.append(instance)
        if not self.auto:
            await done
        if (batch["x"] < 0).any():
            raise InferenceError("negative item in the batch", node="n")
        return {"y": batch["x"] * 2}

    async def finish(self, index: int) -> None:
        self.calls[index][1].set_result(None)
        await settle()


def items(*values: float) -> dict[str, np.ndarray]:
    return {"x": np.array(values, np.float32).reshape(-1, 1)}


def make(model: FakeModel, clock: FakeClock, **options) -> Batcher:
    options.setdefault("max_batch_size", 4)
    options.setdefault("max_queue", 100)
    return Batcher(model, clock=clock, name="m", **options)


async def test_dispatches_at_once_when_idle():
    model, clock = FakeModel(), FakeClock()
    batcher = make(model, clock, max_delay_s=0)
    task = asyncio.create_task(batcher.submit(items(1)))
    await settle()
    assert model.sizes == [1]  # no time passed, no waiting for company
    await model.finish(0)
    np.testing.assert_array_equal((await task)["y"], [[2]])


async def test_accumulates_while_busy_and_takes_up_to_max_batch_size():
    model, clock = FakeModel(), FakeClock()
    batcher = make(model, clock, max_batch_size=4)
    tasks = [asyncio.create_task(batcher.submit(items(0)))]
    await settle()
    tasks += [asyncio.create_task(batcher.submit(items(i))) for i in range(1, 7)]
    await settle()
    assert model.sizes == [1]  # the first went alone, the others wait
    assert batcher.statistics().queued_items == 6
    await model.finish(0)
    assert model.sizes == [1, 4]
    await model.finish(1)
    assert model.sizes == [1, 4, 2]
    await model.finish(2)
    results = await asyncio.gather(*tasks)
    assert [float(r["y"][0, 0]) for r in results] == [0, 2, 4, 6, 8, 10, 12]
    stats = batcher.statistics()
    assert stats.batch_sizes == {1: 1, 2: 1, 4: 1}
    assert stats.mean_batch_size == 7 / 3


async def test_two_instances_run_two_batches_at_once():
    model, clock = FakeModel(), FakeClock()
    batcher = make(model, clock, instances=2)
    tasks = []
    for i in range(4):  # each in a turn of its own
        tasks.append(asyncio.create_task(batcher.submit(items(i))))
        await settle()
    assert model.sizes == [1, 1]
    assert sorted(model.instances) == [0, 1]  # one call per instance
    await model.finish(0)
    assert model.sizes == [1, 1, 2]
    assert model.instances[2] == model.instances[0]  # the instance that just became free
    await model.finish(1)
    await model.finish(2)
    await asyncio.gather(*tasks)


async def test_max_delay_holds_the_first_item_to_grow_the_batch():
    model, clock = FakeModel(auto=True), FakeClock()
    # (binary fractions of a second, so that the fake clock adds up exactly)
    batcher = make(model, clock, max_batch_size=4, max_delay_s=0.5)
    first = asyncio.create_task(batcher.submit(items(1)))
    await settle()
    await clock.advance(0.25)
    assert model.sizes == []
    second = asyncio.create_task(batcher.submit(items(2)))
    await settle()
    await clock.advance(0.125)
    assert model.sizes == []  # still within the bound
    await clock.advance(0.125)
    assert model.sizes == [2]  # max_delay after the first item: go with what is there
    await asyncio.gather(first, second)
    assert batcher.statistics().queue_wait_s_max == pytest.approx(0.5)


async def test_max_delay_does_not_hold_a_full_batch():
    model, clock = FakeModel(auto=True), FakeClock()
    batcher = make(model, clock, max_batch_size=2, max_delay_s=1.0)
    tasks = [asyncio.create_task(batcher.submit(items(i))) for i in range(2)]
    await settle()
    assert model.sizes == [2]
    await asyncio.gather(*tasks)


async def test_items_past_their_deadline_are_dropped_before_compute():
    model, clock = FakeModel(), FakeClock()
    batcher = make(model, clock)
    busy = asyncio.create_task(batcher.submit(items(1)))
    await settle()
    late = asyncio.create_task(batcher.submit(items(2), deadline=clock.now + 0.05))
    on_time = asyncio.create_task(batcher.submit(items(3), deadline=clock.now + 5))
    await settle()
    await clock.advance(0.1)
    await model.finish(0)
    with pytest.raises(DeadlineExceeded, match="before the model ran"):
        await late
    assert model.sizes == [1, 1]  # only the on-time item reached the model
    await model.finish(1)
    await asyncio.gather(busy, on_time)
    assert batcher.statistics().deadline_dropped == 1


async def test_a_full_queue_answers_overloaded_at_once():
    model, clock = FakeModel(), FakeClock()
    batcher = make(model, clock, max_queue=3)
    busy = asyncio.create_task(batcher.submit(items(1)))
    await settle()
    waiting = asyncio.create_task(batcher.submit(items(1, 2, 3)))
    await settle()
    with pytest.raises(Overloaded) as info:
        await batcher.submit(items(4))
    assert info.value.retry_after_ms >= 1
    assert "max_queue 3" in str(info.value)
    assert batcher.statistics().rejected == 1
    await model.finish(0)
    await model.finish(1)
    await asyncio.gather(busy, waiting)


async def test_a_request_larger_than_the_whole_queue_is_invalid_not_overloaded():
    model, clock = FakeModel(), FakeClock()
    batcher = make(model, clock, max_queue=3)
    # the queue is empty: a retry could never fit 4 items, so no retry hint
    with pytest.raises(InvalidRequest) as info:
        await batcher.submit(items(1, 2, 3, 4))
    assert not isinstance(info.value, Overloaded)
    assert "m: a request of 4 items can never be queued" in str(info.value)
    assert "max_queue 3" in str(info.value)
    assert info.value.field == "inputs"
    assert model.sizes == []
    assert batcher.statistics().rejected == 0  # not counted as an overload either
    fits = asyncio.create_task(batcher.submit(items(1, 2, 3)))  # the whole queue still fits
    await settle()
    await model.finish(0)
    np.testing.assert_array_equal((await fits)["y"], [[2], [4], [6]])


async def test_a_poison_request_fails_alone():
    model, clock = FakeModel(auto=True), FakeClock()
    # hold the only instance until all requests are queued
    gate = asyncio.get_running_loop().create_future()

    async def call(batch, **call):
        if not gate.done():
            await gate
        return await model(batch, **call)

    batcher = Batcher(call, clock=clock, max_batch_size=8, max_queue=100, name="m")
    tasks = [asyncio.create_task(batcher.submit(items(v))) for v in (1, 2, -3, 4, 5)]
    await settle()
    gate.set_result(None)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[2], InferenceError)
    assert [float(r["y"][0, 0]) for i, r in enumerate(results) if i != 2] == [2, 4, 8, 10]
    assert batcher.statistics().failed_requests == 1


async def test_a_multi_item_request_is_split_across_batches_and_merged_in_order():
    model, clock = FakeModel(), FakeClock()
    batcher = make(model, clock, max_batch_size=4)
    busy = asyncio.create_task(batcher.submit(items(0)))
    await settle()
    big = asyncio.create_task(batcher.submit(items(*range(1, 7))))  # 6 items
    await settle()
    await model.finish(0)
    assert model.sizes == [1, 4]
    await model.finish(1)
    assert model.sizes == [1, 4, 2]
    await model.finish(2)
    result = await big
    np.testing.assert_array_equal(result["y"][:, 0], [2, 4, 6, 8, 10, 12])
    await busy


async def test_requests_of_different_shapes_go_in_separate_batches():
    model, clock = FakeModel(), FakeClock()
    batcher = make(model, clock)
    busy = asyncio.create_task(batcher.submit(items(0)))
    await settle()
    wide = {"x": np.ones((1, 3), np.float32)}
    tasks = [
        asyncio.create_task(batcher.submit(items(1))),
        asyncio.create_task(batcher.submit(wide)),
        asyncio.create_task(batcher.submit(items(2))),
    ]
    await settle()
    await model.finish(0)
    assert [b["x"].shape for b, _ in model.calls[1:]] == [(2, 1)]
    await model.finish(1)
    assert model.calls[2][0]["x"].shape == (1, 3)
    await model.finish(2)
    await asyncio.gather(busy, *tasks)


async def test_padding_round_trip():
    calls: list[np.ndarray] = []

    async def embed(batch, **call):
        ids = batch["ids"]
        calls.append(ids)
        return {"tokens": ids.astype(np.float32)[..., None] * 10, "length": (ids > 0).sum(1)}

    clock = FakeClock()
    padding = Padding(inputs={"ids": 0}, outputs={"tokens": ("ids", 0)})
    batcher = Batcher(embed, clock=clock, max_batch_size=8, max_queue=100, padding=padding)
    gate = asyncio.create_task(batcher.submit({"ids": np.array([[9]])}))
    await settle()  # the gate goes alone
    short = asyncio.create_task(batcher.submit({"ids": np.array([[1, 2]])}))
    long = asyncio.create_task(batcher.submit({"ids": np.array([[3, 4, 5, 6]])}))
    await asyncio.gather(gate, short, long)
    assert calls[1].shape == (2, 4)  # both in one batch, padded to 4
    np.testing.assert_array_equal(calls[1][0], [1, 2, 0, 0])
    assert (await short)["tokens"].shape == (1, 2, 1)  # padding removed
    np.testing.assert_array_equal((await long)["tokens"][0, :, 0], [30, 40, 50, 60])
    np.testing.assert_array_equal((await short)["length"], [2])


async def test_a_caller_that_gives_up_is_skipped():
    model, clock = FakeModel(), FakeClock()
    batcher = make(model, clock)
    busy = asyncio.create_task(batcher.submit(items(0)))
    await settle()
    gone = asyncio.create_task(batcher.submit(items(1)))
    stays = asyncio.create_task(batcher.submit(items(2)))
    await settle()
    gone.cancel()
    await settle()
    await model.finish(0)
    assert model.sizes == [1, 1]
    np.testing.assert_array_equal(model.calls[1][0]["x"], [[2]])
    await model.finish(1)
    await asyncio.gather(busy, stays)


async def test_never_merging_mode_keeps_requests_whole():
    model, clock = FakeModel(), FakeClock()
    batcher = make(model, clock, max_batch_size=None)
    busy = asyncio.create_task(batcher.submit(items(0, 0, 0, 0, 0)))
    await settle()
    others = [asyncio.create_task(batcher.submit(items(1))) for _ in range(2)]
    await settle()
    await model.finish(0)
    await model.finish(1)
    await model.finish(2)
    assert model.sizes == [5, 1, 1]
    await asyncio.gather(busy, *others)


def test_parameters_are_checked():
    with pytest.raises(ValueError, match="max_batch_size must be an integer >= 1"):
        Batcher(FakeModel(), max_batch_size=0, max_queue=1)
    with pytest.raises(ValueError, match="max_delay_s must be >= 0"):
        Batcher(FakeModel(), max_batch_size=1, max_delay_s=-1, max_queue=1)


async def test_max_queue_delay_refuses_what_would_wait_too_long():
    model = FakeModel()
    batcher = Batcher(model, max_batch_size=2, max_queue=100, max_queue_delay_s=0.25, name="m")
    first = asyncio.create_task(batcher.submit(items(1)))
    await settle()
    await model.finish(0)
    await first  # one batch done: the batcher has a batch time now; pin it to 100 ms
    batcher._batch_seconds = 0.1
    # one batch running and four items (two batches) queued: a new item would wait for the
    # running batch and both queued ones, ~300 ms > 250 ms
    accepted = [asyncio.create_task(batcher.submit(items(0)))]
    await settle()
    accepted += [asyncio.create_task(batcher.submit(items(i))) for i in range(1, 5)]
    await settle()
    with pytest.raises(Overloaded, match="max_queue_delay_ms"):
        await batcher.submit(items(9))
    while not all(t.done() for t in accepted):
        await model.finish(len(model.calls) - 1)
    await asyncio.gather(*accepted)
    assert batcher.statistics().rejected == 1


async def test_the_call_sees_the_latest_deadline_of_its_batch():
    seen: list[tuple[int, float | None]] = []
    release = asyncio.Event()

    async def call(batch, *, instance, deadline):
        seen.append((len(batch["x"]), deadline))  # what the worker pool bounds retries by
        await release.wait()
        return {"y": batch["x"]}

    clock = FakeClock()
    batcher = Batcher(call, max_batch_size=4, max_queue=100, clock=clock, name="m")
    now = clock.now
    first = asyncio.create_task(batcher.submit(items(0)))  # holds the only instance
    await settle()
    pair = [
        asyncio.create_task(batcher.submit(items(1), deadline=now + 1)),
        asyncio.create_task(batcher.submit(items(2), deadline=now + 3)),
    ]
    await settle()
    release.set()
    await asyncio.gather(first, *pair)
    await batcher.submit(items(3), deadline=now + 1)
    await batcher.submit(items(4))
    # the pair's batch lives as long as its last request; alone, a request's own; none: None
    assert seen == [(1, None), (2, now + 3), (1, now + 1), (1, None)]


async def test_a_partial_result_fails_only_the_requests_that_own_the_failed_items():
    # One batch of three requests (one, three and one items); the model fails batch items
    # 2 and 3 alone.  Item 3 of the batch is item 2 of the three-item request.
    calls: list[np.ndarray] = []
    gate = asyncio.get_running_loop().create_future()

    async def call(batch, **call):
        if not gate.done():
            await gate
        x = batch["x"]
        calls.append(x)
        bad = {int(i): InvalidRequest(f"x is {x[i, 0]:g}") for i in np.flatnonzero(x[:, 0] < 0)}
        return Partial({"y": x * 2}, errors=bad)

    batcher = Batcher(call, clock=FakeClock(), max_batch_size=8, max_queue=100, name="m")
    first = asyncio.create_task(batcher.submit(items(0)))  # holds the only instance
    await settle()
    requests = [items(1), items(2, -3, -4), items(5)]
    tasks = [asyncio.create_task(batcher.submit(r)) for r in requests]
    await settle()
    gate.set_result(None)
    await first
    good, bad, also_good = await asyncio.gather(*tasks, return_exceptions=True)
    assert len(calls) == 2  # the gate's batch and one batch of all three: nothing ran again
    np.testing.assert_array_equal(calls[1][:, 0], [1, 2, -3, -4, 5])
    np.testing.assert_array_equal(good["y"], [[2]])
    np.testing.assert_array_equal(also_good["y"], [[10]])
    assert isinstance(bad, InvalidRequest)
    assert str(bad) == "item 1: x is -3"  # its first failed item, counted within the request
    stats = batcher.statistics()
    assert stats.failed_requests == 1
    assert stats.batch_sizes == {1: 1, 5: 1}


async def test_items_submitted_in_one_turn_meet_in_one_batch_with_no_delay():
    # the two branches of one request feeding the same model, with the model idle
    model, clock = FakeModel(), FakeClock()
    batcher = make(model, clock)
    left = asyncio.create_task(batcher.submit(items(1)))
    right = asyncio.create_task(batcher.submit(items(2)))
    await settle()
    assert model.sizes == [2]  # one batch, dispatched at the end of the turn: no time passed
    await model.finish(0)
    np.testing.assert_array_equal((await left)["y"], [[2]])
    np.testing.assert_array_equal((await right)["y"], [[4]])
    assert batcher.statistics().queue_wait_s_max == 0


class TimedModel:
    """Takes ``seconds(batch size)`` of fake-clock time per call."""

    def __init__(self, clock: FakeClock, seconds: Callable[[int], float]) -> None:
        self.clock, self.seconds = clock, seconds
        self.sizes: list[int] = []

    async def __call__(self, batch, *, instance, deadline) -> dict[str, np.ndarray]:
        n = len(batch["x"])
        self.sizes.append(n)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.clock.call_at(self.clock.now + self.seconds(n), lambda: done.set_result(None))
        await done
        return {"y": batch["x"] * 2}


def cpu_like(n: int) -> float:
    """A model whose best throughput is at 8: 80 items/s there, 69 at 16, 64 at 32, 53 at 4."""
    return 0.05 + 0.00625 * n if n <= 8 else 0.1 + (n - 8) / 60


async def run_until_done(clock: FakeClock, tasks: list[asyncio.Task]) -> None:
    """Advance the fake clock from one timer to the next until every task is done."""
    await settle()
    while not all(t.done() for t in tasks):
        due = min(t.when for t in clock.timers)
        await clock.advance(due - clock.now + 1e-9)


async def queue_at_once(batcher: Batcher, n: int, **submit) -> list[asyncio.Task]:
    tasks = [asyncio.create_task(batcher.submit(items(i), **submit)) for i in range(n)]
    await asyncio.sleep(0)  # all queued in this turn, none dispatched yet
    return tasks


async def test_learns_the_batch_size_of_the_best_throughput_and_dispatches_it():
    clock = FakeClock()
    model = TimedModel(clock, cpu_like)
    batcher = make(model, clock, max_batch_size=32)
    assert batcher.statistics().best_batch_size is None
    for _ in range(3):
        await run_until_done(clock, await queue_at_once(batcher, 32))
    # nothing measured: all 32 at once; then smaller sizes next to the best so far, measured
    assert model.sizes[:3] == [32, 16, 8]
    assert {4, 8, 16, 32} <= set(model.sizes)
    stats = batcher.statistics()
    assert stats.best_batch_size == 8
    assert stats.throughput[8] == pytest.approx(80)
    assert stats.throughput[32] == pytest.approx(64)
    before = len(model.sizes)
    await run_until_done(clock, await queue_at_once(batcher, 32))
    assert model.sizes[before:] == [8, 8, 8, 8]  # 0.4 s for the 32, not 0.5 s in one batch
    # a few items go together however fast smaller batches are: a split leaves some waiting
    before = len(model.sizes)
    await run_until_done(clock, await queue_at_once(batcher, 10))
    assert model.sizes[before:] == [10]


async def test_the_learned_size_gives_way_to_the_queue_delay_bound():
    clock = FakeClock()
    model = TimedModel(clock, cpu_like)
    batcher = make(model, clock, max_batch_size=32)
    for _ in range(3):
        await run_until_done(clock, await queue_at_once(batcher, 32))
    assert batcher.statistics().best_batch_size == 8
    busy = await queue_at_once(batcher, 1)
    await settle()
    waiting = await queue_at_once(batcher, 32)
    await settle()
    # in batches of 8 the last 16 would start 0.1 s and 0.2 s after the first: past the bound
    batcher.max_queue_delay_s = 0.15
    before = len(model.sizes)
    await run_until_done(clock, busy + waiting)
    assert model.sizes[before:] == [32]


async def test_preferred_batch_sizes_take_the_largest_the_queue_fills():
    model, clock = FakeModel(), FakeClock()
    batcher = make(model, clock, max_batch_size=8, preferred_batch_sizes=[4, 2])
    tasks = [asyncio.create_task(batcher.submit(items(0)))]
    await settle()
    tasks += [asyncio.create_task(batcher.submit(items(i))) for i in range(1, 11)]
    await settle()
    for call in range(4):
        await model.finish(call)
    await asyncio.gather(*tasks)
    # 10 waiting: 4, 4, then 2 (the largest preferred size they fill), then nothing left
    assert model.sizes == [1, 4, 4, 2]
    assert batcher.statistics().best_batch_size == 4
    # what fills no preferred size goes as it is
    alone = asyncio.create_task(batcher.submit(items(1)))
    await settle()
    await model.finish(4)
    await alone
    assert model.sizes[-1] == 1


def test_preferred_batch_sizes_are_checked():
    with pytest.raises(ValueError, match="preferred_batch_sizes must be integers from 1"):
        Batcher(FakeModel(), max_batch_size=8, max_queue=10, preferred_batch_sizes=[16])
    with pytest.raises(ValueError, match="preferred_batch_sizes"):
        Batcher(FakeModel(), max_batch_size=None, max_queue=10, preferred_batch_sizes=[1])
