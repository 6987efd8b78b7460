"""Start, watch and restart the worker processes; route loads and predicts to them.

One worker per :class:`WorkerKey` (framework, device).  A supervisor task per worker pings it
every ``ping_interval_s``; a worker that died, or that did not answer a ping within
``ping_timeout_s``, is killed and replaced after a backoff that doubles up to
``max_backoff_s``, and every model it hosted is loaded again.  Requests that arrive while a
worker is being replaced wait for it, bounded by their deadline and ``restart_wait_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

from engine.workers.messages import Loaded, LoadModel, Predict
from engine.workers.process import WorkerDied, WorkerProcess
from model_plugins.errors import DagserveError, DeadlineExceeded, InferenceError
from model_plugins.plugin import Batch, LoadContext

logger = logging.getLogger(__name__)


@dataclass(frozen=True, order=True)
class WorkerKey:
    """Which worker hosts a model: one per framework and device."""

    framework: str  # "torch", "tensorflow", "paddle" or "numpy"
    device: str  # "cpu" or "cuda:N"

    @property
    def name(self) -> str:
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


@dataclass
class _Slot:
    """A worker key's current process and what it must host."""

    key: WorkerKey
    process: WorkerProcess | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    models: dict[str, LoadModel] = field(default_factory=dict)
    restarts: int = 0
    supervisor: asyncio.Task[None] | None = None


class WorkerPool:
    """The worker processes of one server."""

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
    ) -> None:
        self.ping_interval_s = ping_interval_s
        self.ping_timeout_s = ping_timeout_s
        self.initial_backoff_s = initial_backoff_s
        self.max_backoff_s = max_backoff_s
        self.restart_wait_s = restart_wait_s
        self.memory_limit_mb = memory_limit_mb
        self.log_level = log_level
        self._slots: dict[WorkerKey, _Slot] = {}
        self._closing = False

    # -- what the engine calls -----------------------------------------------------------

    async def load(
        self, key: WorkerKey, model_id: str, plugin: str, contexts: tuple[LoadContext, ...]
    ) -> Loaded:
        """Load a model into the worker of ``key`` (started on first use)."""
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = _Slot(key)
            slot.process = await self._spawn(slot)
            slot.ready.set()
            slot.supervisor = asyncio.create_task(self._supervise(slot), name=f"{key.name}-sup")
        message = LoadModel(model_id, plugin, contexts)
        assert slot.process is not None
        loaded: Loaded = await slot.process.call(message, node=contexts[0].node, plugin=plugin)
        slot.models[model_id] = message
        return loaded

    async def predict(
        self,
        key: WorkerKey,
        model_id: str,
        inputs: Batch,
        *,
        node: str,
        plugin: str,
        deadline: float | None = None,
    ) -> Batch:
        slot = self._slots[key]
        if not slot.ready.is_set():
            await self._wait_ready(slot, node, plugin, deadline)
        assert slot.process is not None
        result: Batch = await slot.process.call(Predict(model_id, inputs), node=node, plugin=plugin)
        return result

    def statistics(self) -> dict[str, dict[str, object]]:
        """Per worker: pid, restarts, hosted models, whether it is ready."""
        return {
            slot.key.name: {
                "pid": slot.process.pid if slot.process else None,
                "restarts": slot.restarts,
                "models": sorted(slot.models),
                "ready": slot.ready.is_set(),
            }
            for slot in self._slots.values()
        }

    def replace(self, key: WorkerKey, why: str) -> None:
        """Kill the worker of ``key`` (it hung); the supervisor starts a new one."""
        process = self.process(key)
        if process is not None and not process.exited.is_set():
            logger.warning("replacing worker %s (pid %s): %s", key.name, process.pid, why)
            process.kill()

    def process(self, key: WorkerKey) -> WorkerProcess | None:
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

    # -- supervision -----------------------------------------------------------------------

    async def _spawn(self, slot: _Slot) -> WorkerProcess:
        # on_exit clears `ready` the moment the socket closes, so that no request is sent to
        # a dead worker while the supervisor has not noticed yet.
        key = slot.key
        process = WorkerProcess(
            key.name, env=key.environment(), log_level=self.log_level, on_exit=slot.ready.clear
        )
        await process.start()
        return process

    async def _wait_ready(
        self, slot: _Slot, node: str, plugin: str, deadline: float | None
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
                for message in slot.models.values():
                    await slot.process.call(message, node=message.contexts[0].node)
            except (DagserveError, OSError) as exc:
                logger.error("worker %s could not be restarted: %s", slot.key.name, exc)
                continue
            slot.ready.set()
            logger.info("worker %s is back (pid %s)", slot.key.name, slot.process.pid)

    async def _watch(self, process: WorkerProcess) -> str:
        """Return, with the reason, once the worker died or stopped answering pings."""
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.ping_interval_s):
                    await process.exited.wait()
                    return "died"
            if not await process.ping(self.ping_timeout_s):
                return f"did not answer a ping within {self.ping_timeout_s} s"
            if self.memory_limit_mb is not None:
                resident = resident_mb(process.pid)
                if resident is not None and resident > self.memory_limit_mb:
                    return (
                        f"grew to {resident:.0f} MB, past its limit of {self.memory_limit_mb:g} MB"
                    )
        return "closing"


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


def worker_key(framework: str | None, device: str) -> WorkerKey:
    return WorkerKey(framework or "numpy", device)


__all__ = ["WorkerDied", "WorkerKey", "WorkerPool", "worker_key"]
