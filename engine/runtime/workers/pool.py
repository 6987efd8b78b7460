"""Start, watch and restart the worker processes; route loads and predicts to them.

One worker per :class:`WorkerKey` (framework, device).  A supervisor task per worker pings it
every ``ping_interval_s``; a worker that died, or that did not answer a ping within
``ping_timeout_s``, is killed and replaced after a backoff that doubles up to
``max_backoff_s``, and every model it hosted is loaded again.  Requests that arrive while a
worker is being replaced wait for it, bounded by their deadline and ``restart_wait_s``.

A crash fails only the call that caused it.  The other calls in flight on the dead worker
(see ``model_plugins._host.postmortem`` for how they are told apart) wait for the replacement and
are sent again, within their deadline.  A model that crashes its worker
``quarantine_after_crashes`` times within ``quarantine_window_s`` is quarantined: its calls
are refused at once with :class:`ModelQuarantined`, and it is not loaded into the replacement
worker, so that its neighbours come back fast.  Quarantine bounds how often a crash can be
laid at another model's door (its thread named by the crash dump, or its call past its
timeout), so such crashes do not use up a call's retries; after deaths that name no culprit
(a SIGKILL, the OOM killer) a call is sent again at most ``max_retries`` times.

What a worker is comes from the pool's :class:`WorkerBackend`: a spawned process on this
machine (:class:`ProcessBackend`, the default) or an actor on a Ray cluster
(``engine.runtime.workers.ray_worker``).  Supervision, retries, quarantine, deadlines and
timeouts are the pool's and the same for both.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from engine.runtime.workers.process import Death, WorkerDied, WorkerProcess
from model_plugins._host import threads
from model_plugins._host.messages import Loaded, LoadModel, Ping, Predict, Unload
from model_plugins.errors import DagserveError, DeadlineExceeded, InferenceError
from model_plugins.plugin import Batch, LoadContext

if TYPE_CHECKING:
    from engine.runtime.ray_placement import ActorRequest

logger = logging.getLogger(__name__)


@dataclass(frozen=True, order=True)
class WorkerKey:
    """Which worker hosts a model: one per framework and device (and, on a Ray cluster, per
    actor: ``actor`` is what that actor asks Ray for, ``engine.runtime.ray_placement``)."""

    framework: str  # "torch", "tensorflow", "paddle" or "numpy"
    device: str  # "cpu" or "cuda:N" (on Ray, "cuda:0": each actor sees its own GPU)
    actor: ActorRequest | None = None

    @property
    def name(self) -> str:
        if self.actor is not None:
            return f"{self.framework}@{self.device}#ray{self.actor.index}"
        return f"{self.framework}@{self.device}"

    @property
    def visible_device(self) -> str:
        """The device as the worker process sees it: ``cuda:0`` for any card, since a worker
        is started with ``CUDA_VISIBLE_DEVICES`` set to its one card (see :meth:`environment`).

        ``device`` stays the physical index (NVML's numbering) for placement, logs, health
        and metrics; plugins are told this one, which is the only one their framework knows.
        """
        return "cuda:0" if self.device.startswith("cuda:") else self.device

    def environment(self) -> dict[str, str]:
        """Variables the worker starts with: each worker sees only its own GPU."""
        # PCI bus order: the numbering NVML (and so placement) uses
        if self.device.startswith("cuda:"):
            index = self.device.removeprefix("cuda:")
            return {"CUDA_VISIBLE_DEVICES": index, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
        return {"CUDA_VISIBLE_DEVICES": ""}


class Worker(Protocol):
    """One worker as the pool uses it (:class:`WorkerProcess`, or a Ray actor's handle)."""

    name: str
    exited: asyncio.Event
    killed: bool

    @property
    def pid(self) -> int | None: ...

    @property
    def location(self) -> dict[str, str]:
        """Where it runs beyond this machine (``ray_node``, ``ray_ip``); empty for a local
        process."""
        ...

    async def start(self) -> None: ...

    async def call(
        self, message: Any, *, node: str | None = None, plugin: str | None = None
    ) -> Any: ...

    async def stop(self, timeout_s: float = 5.0) -> None: ...

    def kill(self, *, spare_in_flight: bool = False) -> None: ...


class WorkerBackend(Protocol):
    """What makes the pool's workers."""

    #: stop a worker once its last model is unloaded (a Ray actor holds its resources on the
    #: cluster while it lives); a local process stays, ready for the next model of its key
    release_idle: bool

    def new_worker(
        self,
        key: WorkerKey,
        *,
        threads_setting: int | None,
        log_level: int,
        on_exit: Callable[[Death], None],
    ) -> Worker:
        """A worker for ``key``, not started yet."""
        ...

    async def aclose(self) -> None:
        """After every worker stopped: release what the backend holds."""
        ...


class ProcessBackend:
    """Workers as spawned processes on this machine, each seeing only its own GPU."""

    release_idle = False

    def new_worker(
        self,
        key: WorkerKey,
        *,
        threads_setting: int | None,
        log_level: int,
        on_exit: Callable[[Death], None],
    ) -> Worker:
        env = {**key.environment(), **threads.worker_environment(key.framework, threads_setting)}
        return WorkerProcess(key.name, env=env, log_level=log_level, on_exit=on_exit)

    async def aclose(self) -> None:
        return None


@dataclass
class _Slot:
    """A worker key's current process and what it must host."""

    key: WorkerKey
    process: Worker | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    models: dict[str, LoadModel] = field(default_factory=dict)
    #: the models loaded in the current process (a quarantined one is not)
    loaded: set[str] = field(default_factory=set)
    restarts: int = 0
    #: model ("" when no crash dump named one) -> deaths of this worker laid at its door
    crashes: collections.Counter[str] = field(default_factory=collections.Counter)
    #: calls sent again after another call crashed the worker they were in flight on
    retried: int = 0
    supervisor: asyncio.Task[None] | None = None


class ModelQuarantined(InferenceError):
    """The model crashed its worker too often: its calls are refused without running."""


class WorkerPool:
    """The worker processes of one server.

    Args:
        max_retries: how many times a call that was in flight on a worker that died without
            naming a culprit is sent again to the replacement (deaths laid at another model's
            door do not count while quarantine is on: it bounds them).
        quarantine_after_crashes: crashes of one model within ``quarantine_window_s`` that
            quarantine it; None: never.
        worker_threads: intra-op threads of each model instance in a worker; None: auto, the
            worker's cores shared among the instances it holds (``model_plugins._host.threads``).
    """

    def __init__(
        self,
        *,
        ping_interval_s: float = 1.0,
        ping_timeout_s: float = 5.0,
        initial_backoff_s: float = 0.1,
        max_backoff_s: float = 10.0,
        restart_wait_s: float = 30.0,
        memory_limit_mb: float | None = None,
        log_level: int = logging.INFO,
        max_retries: int = 2,
        quarantine_after_crashes: int | None = 3,
        quarantine_window_s: float = 300.0,
        worker_threads: int | None = None,
        backend: WorkerBackend | None = None,
    ) -> None:
        self.backend: WorkerBackend = backend or ProcessBackend()
        self.ping_interval_s = ping_interval_s
        self.ping_timeout_s = ping_timeout_s
        self.initial_backoff_s = initial_backoff_s
        self.max_backoff_s = max_backoff_s
        self.restart_wait_s = restart_wait_s
        self.memory_limit_mb = memory_limit_mb
        self.log_level = log_level
        self.max_retries = max_retries
        self.quarantine_after_crashes = quarantine_after_crashes
        self.quarantine_window_s = quarantine_window_s
        self.worker_threads = worker_threads
        self._slots: dict[WorkerKey, _Slot] = {}
        self._closing = False
        #: model -> loop times of its recent crashes
        self._crash_times: dict[str, collections.deque[float]] = {}
        #: quarantined model -> why (the message its calls are refused with)
        self._quarantined: dict[str, str] = {}

    # -- what the engine calls -----------------------------------------------------------

    async def load(
        self, key: WorkerKey, model_id: str, plugin: str, contexts: tuple[LoadContext, ...]
    ) -> Loaded:
        """Load a model into the worker of ``key`` (started on first use)."""
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = _Slot(key)
            try:
                slot.process = await self._spawn(slot)
            except BaseException:
                # a worker that could not start (a Ray actor no node took) leaves no slot
                del self._slots[key]
                raise
            slot.ready.set()
            slot.supervisor = asyncio.create_task(self._supervise(slot), name=f"{key.name}-sup")
        message = LoadModel(model_id, plugin, contexts)
        assert slot.process is not None
        loaded: Loaded = await slot.process.call(message, node=contexts[0].node, plugin=plugin)
        slot.models[model_id] = message
        slot.loaded.add(model_id)
        return loaded

    async def unload(self, key: WorkerKey, model_id: str) -> None:
        """Unload a model from the worker of ``key`` and forget it: a replacement worker does
        not load it again, and its crashes and quarantine are forgotten (its id may come back).

        The caller has drained it: a call still in flight fails in the worker.  A worker that
        is being replaced has nothing to unload.

        Raises:
            DagserveError: the worker failed to unload it (the model is forgotten anyway).
        """
        self._quarantined.pop(model_id, None)
        self._crash_times.pop(model_id, None)
        slot = self._slots.get(key)
        if slot is None or slot.models.pop(model_id, None) is None:
            return
        loaded = model_id in slot.loaded
        slot.loaded.discard(model_id)
        try:
            if loaded and slot.ready.is_set() and slot.process is not None:
                await slot.process.call(Unload(model_id), node=None, plugin=None)
        finally:
            if not slot.models and self.backend.release_idle:
                await self._retire(slot)

    async def _retire(self, slot: _Slot) -> None:
        """Stop a worker that hosts nothing any more, and forget it (a later load of its key
        starts a new one)."""
        self._slots.pop(slot.key, None)
        if slot.supervisor is not None:
            slot.supervisor.cancel()
            await asyncio.gather(slot.supervisor, return_exceptions=True)
        if slot.process is not None:
            await slot.process.stop()
        logger.info("worker %s stopped: it hosts no model any more", slot.key.name)

    async def predict(
        self,
        key: WorkerKey,
        model_id: str,
        inputs: Batch,
        *,
        instance: int = 0,
        node: str | None = None,
        plugin: str | None = None,
        deadline: float | None = None,
        timeout_s: float | None = None,
        retry: bool = True,
    ) -> Batch:
        """Run ``model_id`` on one batch in the worker of ``key``.

        Args:
            instance: which loaded copy runs it; the caller keeps to one call per instance
                (a second call waits in the worker until the first is done).
            node, plugin: for the messages of errors (a shared model's caller leaves ``node``
                out: its batch serves several nodes, which name themselves).
            deadline: on the loop's clock, when the last request of the batch gives up; waiting
                for a replacement worker ends there.
            timeout_s: a call that runs longer has hung its instance: it fails and its worker
                is replaced (the other calls in flight on it are sent again).
            retry: send the call again when another call crashed its worker
                (the plugin's ``retry_on_worker_loss``).

        Raises:
            ModelQuarantined: the model crashed its worker too often.
            WorkerDied: this call crashed the worker (or may have), or ``retry`` is False, or
                its worker died under it more than ``max_retries`` times with no culprit named.
            InferenceError: the plugin raised, ran past ``timeout_s``, or its worker did not
                come back within ``restart_wait_s``.
            DeadlineExceeded: the deadline passed while waiting for the worker to come back.
        """
        slot = self._slots[key]
        message = Predict(model_id, inputs, instance)
        retries = 0
        while True:
            reason = self._quarantined.get(model_id)
            if reason is not None:
                raise ModelQuarantined(reason, node=node, plugin=plugin)
            if not slot.ready.is_set():
                await self._wait_ready(slot, node, plugin, deadline)
                continue  # the model may have been quarantined meanwhile
            assert slot.process is not None
            try:
                return await self._call(slot, slot.process, message, node, plugin, timeout_s)
            except WorkerDied as exc:
                if not (retry and exc.retryable):
                    raise
                # Quarantine bounds the crashes laid at another model's door; count the rest.
                if not exc.blamed_elsewhere or self.quarantine_after_crashes is None:
                    if retries >= self.max_retries:
                        raise
                    retries += 1
                slot.retried += 1
                logger.info("%s; sending it to the new worker", exc.message)

    async def _call(
        self,
        slot: _Slot,
        process: Worker,
        message: Predict,
        node: str | None,
        plugin: str | None,
        timeout_s: float | None,
    ) -> Batch:
        result: Batch
        if timeout_s is None:
            result = await process.call(message, node=node, plugin=plugin)
            return result
        try:
            async with asyncio.timeout(timeout_s):
                result = await process.call(message, node=node, plugin=plugin)
                return result
        except TimeoutError:
            # The call cannot be interrupted inside the worker and holds an instance: replace
            # the worker (its models are loaded again) rather than let every later call queue
            # behind a hung one.  This call is the culprit; the others in flight are not.
            who = f"node {node!r}" if node else f"model {message.model_id}"
            why = f"{who} ran past its timeout_ms ({timeout_s * 1000:g} ms)"
            if process is slot.process and not process.killed and not process.exited.is_set():
                logger.warning("replacing worker %s (pid %s): %s", slot.key.name, process.pid, why)
                self._record_crash(slot, message.model_id)
                process.kill(spare_in_flight=True)
            msg = f"{why}; its worker {slot.key.name} is being replaced"
            raise InferenceError(msg, node=node, plugin=plugin) from None

    def statistics(self) -> dict[str, dict[str, object]]:
        """Per worker: pid, restarts, hosted models, whether it is ready, crashes by model
        (``""``: no crash dump named one), calls retried after a crash, quarantined models;
        on a Ray cluster also the node it runs on (``ray_node``, ``ray_ip``)."""
        return {
            slot.key.name: {
                **(slot.process.location if slot.process else {}),
                "pid": slot.process.pid if slot.process else None,
                "restarts": slot.restarts,
                "models": sorted(slot.models),
                "ready": slot.ready.is_set(),
                "crashes": dict(slot.crashes),
                "retried": slot.retried,
                "quarantined": sorted(m for m in slot.models if m in self._quarantined),
            }
            for slot in self._slots.values()
        }

    def quarantined(self) -> dict[str, str]:
        """Quarantined model -> why."""
        return dict(self._quarantined)

    async def lift_quarantine(self, model_id: str) -> bool:
        """Serve a quarantined model again: forget its crashes and load it into its worker.

        Returns:
            Whether the model was quarantined.

        Raises:
            DagserveError: loading it into the running worker failed (it is then served by the
                next replacement worker).
        """
        if self._quarantined.pop(model_id, None) is None:
            return False
        self._crash_times.pop(model_id, None)
        logger.warning("model %s: quarantine lifted", model_id)
        for slot in self._slots.values():
            message = slot.models.get(model_id)
            # A worker being replaced loads it with the others (see _supervise).
            if message is None or not slot.ready.is_set() or model_id in slot.loaded:
                continue
            assert slot.process is not None
            await slot.process.call(message, node=message.contexts[0].node, plugin=message.plugin)
            slot.loaded.add(model_id)
        return True

    def replace(self, key: WorkerKey, why: str) -> None:
        """Kill the worker of ``key`` (it hung); the supervisor starts a new one."""
        process = self.process(key)
        if process is not None and not process.exited.is_set():
            logger.warning("replacing worker %s (pid %s): %s", key.name, process.pid, why)
            process.kill()

    def process(self, key: WorkerKey) -> Worker | None:
        slot = self._slots.get(key)
        return slot.process if slot else None

    async def aclose(self) -> None:
        """Stop supervising, then ask every worker to unload and exit."""
        self._closing = True
        for slot in self._slots.values():
            if slot.supervisor is not None:
                slot.supervisor.cancel()
        await asyncio.gather(
            *(s.supervisor for s in self._slots.values() if s.supervisor), return_exceptions=True
        )
        await asyncio.gather(
            *(s.process.stop() for s in self._slots.values() if s.process), return_exceptions=True
        )
        await self.backend.aclose()

    # -- supervision -----------------------------------------------------------------------

    async def _spawn(self, slot: _Slot) -> Worker:
        # on_exit clears `ready` the moment the socket closes, so that no request is sent to
        # a dead worker while the supervisor has not noticed yet.
        process = self.backend.new_worker(
            slot.key,
            threads_setting=self.worker_threads,
            log_level=self.log_level,
            on_exit=lambda death: self._on_death(slot, death),
        )
        await process.start()
        return process

    def _on_death(self, slot: _Slot, death: Death) -> None:
        slot.ready.clear()
        slot.loaded.clear()
        if death.stopped or death.spared or self._closing:
            return  # a shutdown; or a timeout, counted where it was found
        (culprit,) = death.culprits if len(death.culprits) == 1 else ("",)
        self._record_crash(slot, culprit)

    def _record_crash(self, slot: _Slot, model_id: str) -> None:
        """Count a death of ``slot``'s worker against ``model_id``; quarantine it if due."""
        slot.crashes[model_id] += 1
        limit = self.quarantine_after_crashes
        if not model_id or limit is None or model_id in self._quarantined:
            return
        now = asyncio.get_running_loop().time()
        times = self._crash_times.setdefault(model_id, collections.deque())
        times.append(now)
        while times[0] < now - self.quarantine_window_s:
            times.popleft()
        if len(times) >= limit:
            reason = (
                f"model {model_id} quarantined after {len(times)} crashes in "
                f"{self.quarantine_window_s:g} s; restart the server to lift it"
            )
            self._quarantined[model_id] = reason
            logger.error("%s (worker %s)", reason, slot.key.name)

    async def _wait_ready(
        self, slot: _Slot, node: str | None, plugin: str | None, deadline: float | None
    ) -> None:
        loop = asyncio.get_running_loop()
        limit = loop.time() + self.restart_wait_s
        when = limit if deadline is None else min(deadline, limit)
        try:
            async with asyncio.timeout_at(when):
                await slot.ready.wait()
        except TimeoutError:
            if deadline is not None and when == deadline:
                msg = f"deadline exceeded waiting for worker {slot.key.name} to restart"
                raise DeadlineExceeded(msg) from None
            msg = (
                f"worker {slot.key.name} is restarting and was not back in {self.restart_wait_s} s"
            )
            raise InferenceError(msg, node=node, plugin=plugin) from None

    async def _supervise(self, slot: _Slot) -> None:
        backoff = self.initial_backoff_s
        loop = asyncio.get_running_loop()
        started = loop.time()
        while not self._closing:
            process = slot.process
            assert process is not None
            why = await self._watch(process)
            if self._closing:
                return
            slot.ready.clear()
            process.kill()
            await process.exited.wait()
            # A worker that dies soon after it started is crash-looping: back off further.
            lived = loop.time() - started
            backoff = min(backoff * 2, self.max_backoff_s) if lived < 10 else self.initial_backoff_s
            logger.warning(
                "worker %s (pid %s) %s; restarting in %.1f s",
                slot.key.name, process.pid, why, backoff,
            )  # fmt: skip
            await asyncio.sleep(backoff)
            slot.restarts += 1
            started = loop.time()
            try:
                slot.process = await self._spawn(slot)
                # Until none is missing: a quarantine may be lifted meanwhile.
                while todo := [
                    message
                    for model_id, message in slot.models.items()
                    if model_id not in slot.loaded and model_id not in self._quarantined
                ]:
                    for message in todo:
                        await slot.process.call(message, node=message.contexts[0].node)
                        slot.loaded.add(message.model_id)
            except (DagserveError, OSError) as exc:
                logger.error("worker %s could not be restarted: %s", slot.key.name, exc)
                continue
            slot.ready.set()
            logger.info("worker %s is back (pid %s)", slot.key.name, slot.process.pid)

    async def _watch(self, process: Worker) -> str:
        """Return, with the reason, once the worker died or stopped answering pings."""
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.ping_interval_s):
                    await process.exited.wait()
                    return "died"
            if not await _answers_ping(process, self.ping_timeout_s):
                return f"did not answer a ping within {self.ping_timeout_s} s"
            # a pid on another node (a Ray actor's) is not this machine's to read
            if self.memory_limit_mb is not None and not process.location:
                resident = resident_mb(process.pid)
                if resident is not None and resident > self.memory_limit_mb:
                    return (
                        f"grew to {resident:.0f} MB, past its limit of {self.memory_limit_mb:g} MB"
                    )
        return "closing"


async def _answers_ping(worker: Worker, timeout_s: float) -> bool:
    try:
        async with asyncio.timeout(timeout_s):
            await worker.call(Ping())
    except (TimeoutError, DagserveError):
        return False
    return True


def resident_mb(pid: int | None) -> float | None:
    """Resident memory of a process, from /proc (None where it cannot be read)."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def worker_key(framework: str | None, device: str, actor: ActorRequest | None = None) -> WorkerKey:
    return WorkerKey(framework or "numpy", device, actor)


__all__ = [
    "ModelQuarantined",
    "ProcessBackend",
    "Worker",
    "WorkerBackend",
    "WorkerDied",
    "WorkerKey",
    "WorkerPool",
    "worker_key",
]
