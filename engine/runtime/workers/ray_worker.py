"""Model workers as Ray actors: the pool's :class:`~engine.runtime.workers.pool.WorkerBackend`
for a server with ``ray:`` in its config (README, "Workers on a Ray cluster").

A :class:`RayWorker` has the interface of a local
:class:`~engine.runtime.workers.process.WorkerProcess`, so the pool supervises, retries,
quarantines and times out its calls the same way; only what carries a message differs:

* The actor (``model_plugins._host.ray_actor.RayHost``) hosts models exactly as a spawned
  worker does (the same ``Host``: one thread per instance, loads on a control pool, outputs
  checked to be numpy).  It is a threaded actor, so that its instances run in parallel, with
  ``max_restarts=0``: after a death the pool's supervisor asks for a new actor (Ray places it
  wherever resources allow, a node that came back included) and loads its models again, as it
  restarts a local worker.  It is not detached: the server owns it and kills it on shutdown.
* A call is an actor method call, ``actor.call.remote(message)``, awaited from the event
  loop.  Ray inlines small arguments and results in the call itself and puts larger ones
  (over ``max_direct_call_object_size``, 100 KiB) in the object store by itself; numpy arrays
  are passed as they are, and read back from the store without a copy.
* A death (the actor's process, or its node: ``RayActorError`` and its kinds) fails every call
  in flight with a *retryable* :class:`~engine.runtime.workers.process.WorkerDied`: no crash
  dump crosses nodes, so nobody is blamed and ``max_retries`` bounds the retries.  A plugin's
  exception is an ordinary error reply, not a death.
* An actor that cannot be placed within ``ray.start_timeout_s`` is refused with
  :class:`RayPlacementError`: what it asked for and what the cluster has.

Ray is imported when the first actor starts, never at import of this module.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

from engine.config import RayConfig
from engine.runtime.placement import PlacementError
from engine.runtime.workers.pool import Worker, WorkerKey
from engine.runtime.workers.process import Death, WorkerDied
from model_plugins._host import threads
from model_plugins._host.messages import Loaded, LoadModel, Reply, Shutdown, Unload
from model_plugins.errors import DagserveError, InferenceError

logger = logging.getLogger(__name__)

#: actor threads that loads, unloads, signatures and pings may hold besides the instances' calls
#: (the host's control pool has 8 threads; a ping and a shutdown come on top)
_CONTROL_CALLS = 10


class RayPlacementError(PlacementError):
    """A worker's actor could not be placed on the Ray cluster within ``start_timeout_s``:
    the message says what it asked for and what the cluster has in all."""


class RayClusterError(DagserveError):
    """The Ray cluster of ``ray.address`` could not be reached within ``start_timeout_s``, or
    refused the connection: the message names the address and the cause."""


class RayCluster:
    """The server's connection to its Ray cluster, made when the first actor starts.

    ``ray.init`` is called here unless the process is connected already (a test, an embedding
    application); :meth:`aclose` calls ``ray.shutdown`` only if it was.  ``ray.init`` keeps
    trying an address where no cluster answers for minutes: it runs on a daemon thread, and the
    server gives up after ``start_timeout_s`` (:class:`RayClusterError`).
    """

    def __init__(self, config: RayConfig) -> None:
        self.config = config
        self._lock = asyncio.Lock()
        self._connected = False
        self._owned = False
        self._actor_class: Any = None

    async def connect(self) -> Any:
        """The ``ray`` module, connected; the actor class, made once."""
        async with self._lock:
            import ray

            if not self._connected:
                if not ray.is_initialized():
                    await self._init_bounded(ray)
                    self._owned = True
                self._connected = True
            if self._actor_class is None:
                from model_plugins._host.ray_actor import RayHost

                self._actor_class = ray.remote(RayHost)
            return ray

    async def _init_bounded(self, ray: Any) -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def settle(error: BaseException | None) -> None:
            if done.done():
                return  # given up on already
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error)

        def run() -> None:
            try:
                self._init(ray)
            except BaseException as exc:
                loop.call_soon_threadsafe(settle, exc)
            else:
                loop.call_soon_threadsafe(settle, None)

        # A daemon thread: one that hangs must not keep the process from exiting.
        threading.Thread(target=run, name="dagserve-ray-init", daemon=True).start()
        address = self.config.address
        timeout_s = self.config.start_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                await done
        except TimeoutError:
            msg = (
                f"cannot connect to the Ray cluster at {address}: no answer within {timeout_s:g} s"
            )
            raise RayClusterError(msg) from None
        except Exception as exc:
            msg = f"cannot connect to the Ray cluster at {address}: {_first_line(exc)}"
            raise RayClusterError(msg) from exc

    def _init(self, ray: Any) -> None:
        config = self.config
        kwargs: dict[str, Any] = {"namespace": config.namespace}
        if config.node_ip_address is not None:
            kwargs["_node_ip_address"] = config.node_ip_address
        logger.info("connecting to the Ray cluster at %s", config.address)
        ray.init(address=config.address, **kwargs)

    @property
    def actor_class(self) -> Any:
        assert self._actor_class is not None, "connect() first"
        return self._actor_class

    async def aclose(self) -> None:
        if self._owned:
            import ray

            await asyncio.to_thread(ray.shutdown)
            self._owned = self._connected = False


class RayBackend:
    """Makes the pool's workers as actors of one Ray cluster.

    An actor whose last model is unloaded is stopped: it would hold its CPUs, GPU share and
    custom resources on the cluster for nothing.
    """

    release_idle = True

    def __init__(self, config: RayConfig) -> None:
        self.config = config
        self.cluster = RayCluster(config)

    def new_worker(
        self,
        key: WorkerKey,
        *,
        threads_setting: int | None,
        log_level: int,
        on_exit: Callable[[Death], None],
    ) -> Worker:
        return RayWorker(
            key, self.cluster, threads_setting=threads_setting, log_level=log_level,
            on_exit=on_exit,
        )  # fmt: skip

    async def aclose(self) -> None:
        await self.cluster.aclose()


class RayWorker:
    """One worker as a Ray actor (the interface of ``WorkerProcess``; see the module)."""

    def __init__(
        self,
        key: WorkerKey,
        cluster: RayCluster,
        *,
        threads_setting: int | None = None,
        log_level: int = logging.INFO,
        on_exit: Callable[[Death], None] | None = None,
    ) -> None:
        self.key = key
        self.name = key.name
        self.cluster = cluster
        self.config = cluster.config
        self.on_exit = on_exit
        self.log_level = log_level
        cores = max(1, int(key.actor.num_cpus)) if key.actor is not None else 1
        #: the worker's environment, as a spawned worker gets it (its CPUs: the actor's)
        self.env = threads.worker_environment(key.framework, threads_setting, cores=cores)
        self.exited = asyncio.Event()
        #: kill() was called: the actor is dying or dead
        self.killed = False
        self.actor: Any = None
        self.actor_pid: int | None = None
        self.node_id: str | None = None
        self.node_ip: str | None = None
        self._calls: dict[int, _RayCall] = {}
        #: model -> its instances loaded in the actor
        self._instances: dict[str, int] = {}
        self._ids = 0
        self._stopping = False
        self._spare = False

    @property
    def pid(self) -> int | None:
        """The actor process's pid, on its node (see :attr:`location`)."""
        return self.actor_pid

    @property
    def location(self) -> dict[str, str]:
        if self.node_id is None:
            return {}
        return {"ray_node": self.node_id, "ray_ip": self.node_ip or ""}

    def options(self) -> dict[str, Any]:
        """The actor's options: its resources (from ``key.actor``), threads and environment."""
        request = self.key.actor
        resources = request.options() if request is not None else {"num_cpus": 1, "num_gpus": 0}
        return {
            **resources,
            "max_restarts": 0,
            "max_task_retries": 0,
            "max_concurrency": self.config.actor_max_concurrency,
            "namespace": self.config.namespace,
            "runtime_env": {"env_vars": self.env},
        }

    async def start(self) -> None:
        """Create the actor and wait until it runs somewhere (bounded by ``start_timeout_s``).

        Raises:
            RayPlacementError: no node took it in time.
            WorkerDied: it died while starting.
        """
        ray = await self.cluster.connect()
        options = self.options()
        self.actor = self.cluster.actor_class.options(**options).remote(self.name, self.log_level)
        try:
            async with asyncio.timeout(self.config.start_timeout_s):
                pid, node_id, ip = await self.actor.where.remote()
        except TimeoutError:
            ray.kill(self.actor, no_restart=True)
            self.exited.set()
            raise RayPlacementError([self._unplaced(ray)]) from None
        except ray.exceptions.RayError as exc:
            self.exited.set()
            msg = f"worker {self.name}: its Ray actor died while starting: {exc}"
            raise WorkerDied(msg) from exc
        self.actor_pid, self.node_id, self.node_ip = pid, node_id, ip
        logger.info(
            "worker %s started as a Ray actor on node %s (%s), pid %s: %s",
            self.name, node_id, ip, pid, self._request(),
        )  # fmt: skip

    def _request(self) -> str:
        request = self.key.actor
        return request.describe() if request is not None else "num_cpus=1"

    def _unplaced(self, ray: Any) -> str:
        """What the actor asked for, against what the cluster has in all and free now."""
        try:
            total, free = ray.cluster_resources(), ray.available_resources()
        except Exception as exc:  # the cluster went away too: say so instead
            have = f"the cluster's resources are unknown ({exc})"
        else:
            have = f"the cluster has in all {_resources(total)}, free now {_resources(free)}"
        return (
            f"worker {self.name}: its Ray actor ({self._request()}) was not placed (or did not "
            f"start) within {self.config.start_timeout_s:g} s; {have}"
        )

    async def call(
        self, message: Any, *, node: str | None = None, plugin: str | None = None
    ) -> Any:
        """Send ``message`` to the actor and return the value of its reply."""
        if self.exited.is_set() or self.actor is None:
            msg = f"worker {self.name} is not running"
            raise WorkerDied(msg, node=node, plugin=plugin, retryable=True)
        import ray

        loop = asyncio.get_running_loop()
        self._ids += 1
        call_id = self._ids
        call = self._calls[call_id] = _RayCall(loop.create_future(), node, plugin)
        try:
            ref = self.actor.call.remote(message)
        except ray.exceptions.RayError as exc:
            self._calls.pop(call_id, None)
            msg = f"worker {self.name} cannot be reached: {exc}"
            raise WorkerDied(msg, node=node, plugin=plugin, retryable=True) from exc
        # The callback comes on one of Ray's threads: hand the outcome to the loop.
        ref.future().add_done_callback(
            lambda done: loop.call_soon_threadsafe(self._settle, call_id, done)
        )
        # A caller that gives up (deadline, timeout) leaves the call listed till its answer
        # or the actor's death: _settle drops it then.
        reply: Reply = await call.future
        error = reply.exception(node, plugin)
        if error is not None:
            raise error
        if isinstance(message, LoadModel) and isinstance(reply.value, Loaded):
            logger.info(
                "model %s loaded in worker %s on Ray node %s (%s)",
                message.model_id, self.name, self.node_id, self.node_ip,
            )  # fmt: skip
            self._instances[message.model_id] = len(message.contexts)
            self._check_concurrency()
        elif isinstance(message, Unload):
            self._instances.pop(message.model_id, None)
        return reply.value

    def _check_concurrency(self) -> None:
        """Warn when the actor's threads cannot run every instance and the control calls at
        once: predicts past them queue in Ray, and a ping behind them may time out."""
        instances = sum(self._instances.values())
        threads = self.config.actor_max_concurrency
        if instances + _CONTROL_CALLS > threads:
            logger.warning(
                "worker %s holds %d model instances; ray.actor_max_concurrency (%d) should be "
                "at least %d, or calls queue in Ray",
                self.name, instances, threads, instances + _CONTROL_CALLS,
            )  # fmt: skip

    def _settle(self, call_id: int, done: Any) -> None:
        """On the loop: the outcome of one actor call."""
        import ray

        call = self._calls.pop(call_id, None)
        if call is None or call.future.done():
            return  # its caller gave up (deadline), or a death failed it already
        try:
            reply = done.result()
        except ray.exceptions.RayActorError as exc:
            call.future.set_exception(self._died_under(call, exc))
            self._declare_dead(f"its Ray actor died: {_first_line(exc)}")
        except (ray.exceptions.RayError, Exception) as exc:
            msg = f"worker {self.name} (Ray node {self.node_ip}): the call failed: {exc}"
            call.future.set_exception(InferenceError(msg, node=call.node, plugin=call.plugin))
        else:
            call.future.set_result(reply)

    def _died_under(self, call: _RayCall, exc: BaseException | None) -> WorkerDied:
        where = f"node {call.node!r}" if call.node else "a call"
        how = f": {_first_line(exc)}" if exc is not None else ""
        msg = (
            f"worker {self.name} (Ray actor pid {self.pid} on node {self.node_ip}) died while "
            f"{where} was in flight on it{how}"
        )
        if self._stopping:
            return WorkerDied(msg, node=call.node, plugin=call.plugin)
        return WorkerDied(
            msg, node=call.node, plugin=call.plugin, retryable=True, blamed_elsewhere=self._spare
        )

    def _declare_dead(self, how: str) -> None:
        if self.exited.is_set():
            return
        for call in self._calls.values():
            if not call.future.done():
                call.future.set_exception(self._died_under(call, None))
        self._calls.clear()
        self.exited.set()
        if self.actor is not None and not self.killed:
            self._kill_actor()  # unavailable is not always dead: make it so
        if self.on_exit is not None:
            self.on_exit(Death(how, frozenset(), self._stopping, self._spare))
        level = logging.INFO if self._stopping else logging.WARNING
        logger.log(level, "worker %s (Ray node %s) ended: %s", self.name, self.node_ip, how)

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Ask the actor to unload its models, then kill it (after ``timeout_s`` at most)."""
        self._stopping = True
        if not self.exited.is_set() and self.actor is not None:
            try:
                async with asyncio.timeout(timeout_s):
                    await self.call(Shutdown())
                    await self.actor.close.remote()
            except (TimeoutError, DagserveError):
                pass
            except Exception as exc:  # a Ray error: it is going anyway
                logger.debug("worker %s: shutdown: %s", self.name, exc)
        self.kill()
        self._declare_dead("stopped")

    def kill(self, *, spare_in_flight: bool = False) -> None:
        """Kill the actor (``ray.kill``); its calls in flight fail as a death.

        Args:
            spare_in_flight: the call that made the worker useless has been answered already
                (it ran past its timeout): every call still in flight is innocent.
        """
        if self.actor is None or self.killed or self.exited.is_set():
            return
        self._spare = self._spare or spare_in_flight
        self._kill_actor()
        # Ray reports the death to the calls in flight in its own time: declare it now.
        asyncio.get_running_loop().call_soon(self._declare_dead, "killed")

    def _kill_actor(self) -> None:
        import ray

        self.killed = True
        try:
            ray.kill(self.actor, no_restart=True)
        except Exception as exc:  # the cluster is gone: nothing left to kill
            logger.debug("worker %s: ray.kill: %s", self.name, exc)


class _RayCall:
    __slots__ = ("future", "node", "plugin")

    def __init__(self, future: asyncio.Future[Reply], node: str | None, plugin: str | None) -> None:
        self.future = future
        self.node = node
        self.plugin = plugin


def _resources(resources: dict[str, float]) -> dict[str, float]:
    """Resources as an operator reads them: no per-node ``node:IP`` entries, sorted."""
    return {k: v for k, v in sorted(resources.items()) if not k.startswith("node:")}


def _first_line(exc: BaseException | None) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


__all__ = ["RayBackend", "RayCluster", "RayClusterError", "RayPlacementError", "RayWorker"]
