"""``front_processes``: several processes serve one port, and the first keeps the models.

One Python process decodes, checks and runs a few thousand requests a second per core, whatever
the GPUs behind it.  With ``front_processes: N`` the server runs N front processes that listen
on the same port (``SO_REUSEPORT``: the kernel spreads new connections over them):

- the *primary* (the process ``dagserve serve`` started) loads the pipelines, places and loads
  the models, runs their batchers and supervises the workers, exactly as a one-front server;
- each *secondary* (started here, with ``spawn``) loads the same pipeline files, takes the
  primary's placement and model ids, binds the port, and serves its connections: the Thrift
  codec, the checks, the DAG and the nodes that run in the front process run there, and the
  items of model nodes go to the primary's batchers (``engine.runtime.relay``), so a model's
  batches hold the items of every front.

The server is one to the outside: the primary's ``/metrics`` adds in what each secondary
reports every second, its ``/readyz`` is ready once every front is, and the ``health`` call,
wherever it lands, answers for the whole server with a line per front.  A secondary that dies
is started again (its connections are lost: their clients reconnect, to any front); when the
primary goes, the secondaries see their relay close and stop.  On SIGTERM the primary tells
every secondary to drain, drains its own connections meanwhile, and unloads the models last.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import multiprocessing
import os
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine.config import ServerConfig
from engine.errors import ConfigError
from engine.runtime.relay import REPORT_INTERVAL_S, RelayClient, RelayServer
from model_plugins._host import threads
from model_plugins.errors import InferenceError

logger = logging.getLogger("dagserve")

_SPAWN = multiprocessing.get_context("spawn")
#: ``front_processes: auto`` runs one front per core, up to this many
MAX_AUTO_FRONTS = 8
#: how long a secondary may take to load its pipelines and bind
START_TIMEOUT_S = 120.0


def front_count(setting: int | str, cores: int | None = None) -> int:
    """How many front processes ``front_processes`` asks for: ``auto`` is one per usable core
    (the CPU affinity, capped by a cgroup CPU quota: a pod's limit), at most
    :data:`MAX_AUTO_FRONTS`."""
    if setting != "auto":
        return int(setting)
    if cores is None:
        cores = threads.available_cores()
    return max(1, min(cores, MAX_AUTO_FRONTS))


def per_front(limit: int | None, count: int) -> int | None:
    """A server-wide ``max_inflight`` shared among ``count`` fronts (each gets its share)."""
    return None if limit is None else max(1, math.ceil(limit / count))


class Fronts:
    """The secondary front processes of one server: start them, restart them, drain them."""

    def __init__(
        self, config: ServerConfig, paths: Sequence[Path], count: int, relay: RelayServer
    ) -> None:
        self.config = config
        self.paths = list(paths)
        self.count = count
        self.relay = relay
        self._processes: dict[int, multiprocessing.process.BaseProcess] = {}
        self._watching: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def pids(self) -> list[int | None]:
        return [p.pid for _, p in sorted(self._processes.items())]

    async def start(self) -> None:
        """Start fronts 1 .. count - 1 and wait until each has bound the port.

        Raises:
            ConfigError: a front exited before it was ready, or was not within
                :data:`START_TIMEOUT_S` (its log lines say why).
        """
        for index in range(1, self.count):
            self._spawn(index)
        loop = asyncio.get_running_loop()
        until = loop.time() + START_TIMEOUT_S
        while not self.relay.all_ready(self.count):
            for index, process in self._processes.items():
                if process.exitcode is not None:
                    msg = (
                        f"front process {index} (pid {process.pid}) exited with code "
                        f"{process.exitcode} while starting; see its log lines above"
                    )
                    raise ConfigError(msg)
            if loop.time() > until:
                msg = f"front processes were not ready within {START_TIMEOUT_S:g} s"
                raise ConfigError(msg)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.2):
                    await self.relay.wait_changed()
        self._watching = asyncio.create_task(self._watch(), name="fronts-watch")
        logger.info("%d front processes serve the port (pids %s)", self.count, self.pids)

    async def drain(self, grace_s: float) -> None:
        """Ask every secondary to drain (SIGTERM) and wait for it; kill what outlives
        ``grace_s`` and a little more."""
        self._closing = True
        if self._watching is not None:
            self._watching.cancel()
            await asyncio.gather(self._watching, return_exceptions=True)
        for process in self._processes.values():
            if process.is_alive() and process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)
        exits = [_exited(p) for p in self._processes.values()]
        if exits:
            await asyncio.wait(exits, timeout=grace_s + 5.0)
        for index, process in self._processes.items():
            if process.is_alive():
                logger.warning(
                    "front process %d (pid %s) did not stop: killing it", index, process.pid
                )
                process.kill()
            process.join(1)

    def _spawn(self, index: int) -> None:
        process = _SPAWN.Process(
            target=front_entry,
            args=(index, self.config, self.paths, self.relay.path),
            name=f"dagserve-front-{index}",
        )
        process.start()
        self._processes[index] = process

    async def _watch(self) -> None:
        """Start a front again when it dies (its clients reconnect, to whichever front)."""
        backoff = 0.1
        while not self._closing:
            await asyncio.sleep(0.5)
            for index, process in list(self._processes.items()):
                if process.exitcode is None or self._closing:
                    continue
                logger.warning(
                    "front process %d (pid %s) ended with code %s; starting it again in %.1f s",
                    index, process.pid, process.exitcode, backoff,
                )  # fmt: skip
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                if not self._closing:
                    self._spawn(index)


def _exited(process: multiprocessing.process.BaseProcess) -> asyncio.Future[None]:
    """Done when ``process`` has ended (its sentinel becomes readable)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    sentinel = process.sentinel

    def ended() -> None:
        loop.remove_reader(sentinel)
        if not done.done():
            done.set_result(None)

    if process.exitcode is not None:
        done.set_result(None)
    else:
        loop.add_reader(sentinel, ended)
        done.add_done_callback(lambda _: loop.remove_reader(sentinel))
    return done


# --- a secondary front ----------------------------------------------------------------------


def front_entry(index: int, config: ServerConfig, paths: list[Path], relay_path: str) -> None:
    """The target of a spawned secondary front."""
    from engine.observability.logs import configure
    from engine.observability.otel import exporting_traces
    from engine.transport.thrift import run

    # The primary handles Ctrl-C and drains its fronts in order (SIGTERM); a terminal's
    # SIGINT reaches the whole process group, so ignore it here.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure(config.log_level, config.log_format)
    with exporting_traces(config.tracing):  # each front exports its own requests' spans
        code = run(serve_front(index, config, paths, relay_path))
    raise SystemExit(code)


async def serve_front(index: int, config: ServerConfig, paths: list[Path], relay_path: str) -> int:
    """Serve as secondary front ``index`` until SIGTERM or until the primary goes away."""
    # Imported here: the primary imports this module without them.
    from engine.runtime.devices import DeviceInventory
    from engine.runtime.engine import Engine
    from engine.runtime.loading import load_for_serving
    from engine.runtime.relay import Hello, Plan, RelayedModels, Report, Sync, health_from
    from engine.transport.handler import InferenceHandler
    from engine.transport.thrift import ThriftServer

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    from engine.runtime.registry import configure as configure_registry

    configure_registry(config.registry_uri, config.model_cache_dir)  # the primary's cache
    pipelines, errors = load_for_serving(paths)
    if errors:
        for error in errors:
            logger.error("front %d: %s", index, error)
        return 1
    relay = RelayClient()
    await relay.connect(relay_path)
    plan: Plan = await relay.call(Hello(index, os.getpid()))
    engine = Engine(
        pipelines,
        thread_pool_size=config.thread_pool_size,
        inventory=DeviceInventory.from_config([]),  # the primary reports the GPUs
        slow_request_ms=config.slow_request_ms,
        max_inflight=per_front(config.max_inflight, front_count(config.front_processes)),
        model_source=RelayedModels(relay, plan),
    )
    await engine.start()
    models = engine.model_source
    assert isinstance(models, RelayedModels)
    following = asyncio.Lock()

    async def follow(message: Any) -> None:
        """Serve the versions and routes of the first front (an admin call changed them)."""
        if not isinstance(message, Sync):
            msg = f"front {index} answers no {type(message).__name__}"
            raise InferenceError(msg)
        async with following:
            models.update(message.plan)
            if message.plan.state is not None:
                await engine.lifecycle.follow(message.plan.state)

    relay.on_request = follow
    if plan.state is not None:  # versions loaded at runtime, weights: as the first front has them
        async with following:
            await engine.lifecycle.follow(plan.state)
    thrift = ThriftServer(
        InferenceHandler(engine, health=health_from(relay)),
        host=config.host,
        port=config.port,
        max_frame_bytes=config.max_frame_bytes,
        idle_timeout_s=config.idle_timeout_s,
        ssl_context=config.tls.server_context() if config.tls else None,
    )
    await thrift.start()

    def report(ready: bool) -> None:
        metrics = engine.metrics.snapshot()
        relay.tell(Report(index, os.getpid(), ready, thrift.open_connections, metrics))

    report(True)
    logger.debug("front %d (pid %d) serving on %s:%d", index, os.getpid(), config.host, thrift.port)
    gone = asyncio.create_task(relay.closed.wait())
    stopping = asyncio.create_task(stop.wait())
    while not (gone.done() or stopping.done()):
        await asyncio.wait({gone, stopping}, timeout=REPORT_INTERVAL_S)
        report(not stopping.done())
    gone.cancel()
    stopping.cancel()
    if relay.closed.is_set() and not stop.is_set():
        logger.error("front %d: the first front process went away; stopping", index)
        await thrift.aclose(grace_s=0)
    else:
        await thrift.aclose(grace_s=config.drain_timeout_s)
        report(False)  # the last counts
    await engine.aclose()
    await relay.aclose()
    return 0


__all__ = ["MAX_AUTO_FRONTS", "Fronts", "front_count", "front_entry", "per_front", "serve_front"]
