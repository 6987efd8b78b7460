"""``dagserve serve``: the server's lifecycle.

``serve()`` = capture signals -> ``startup()`` (load pipelines and plugins, bind, *then* say
ready) -> wait for a signal -> ``shutdown()`` (stop accepting, close connections, unload).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from dag.pipeline import Pipeline
from engine.config import ServerConfig
from engine.errors import ConfigError
from engine.fronts import Fronts, front_count, per_front
from engine.observability.http import MetricsServer
from engine.runtime.devices import DeviceInventory
from engine.runtime.engine import Engine
from engine.runtime.ray_placement import RayInventory
from engine.runtime.registry import configure as configure_registry
from engine.runtime.relay import RelayServer
from engine.runtime.watch import Watcher
from engine.runtime.workers.pool import WorkerBackend, WorkerPool
from engine.transport.admin import admin_server
from engine.transport.handler import InferenceHandler
from engine.transport.thrift import ThriftServer

logger = logging.getLogger("dagserve")
T = TypeVar("T")


def _ray_backend(config: ServerConfig, pipelines: Sequence[Pipeline]) -> WorkerBackend | None:
    """Model workers as Ray actors when the config has ``ray:`` (Ray is imported only then,
    when the first actor starts); else None, local processes.  Without ``ray:``, a node's
    ``ray_resources`` mean nothing: say so."""
    if config.ray is None:
        for pipeline in pipelines:
            for name, node in pipeline.spec.nodes.items():
                if node.ray_resources:
                    logger.warning(
                        "pipeline %s node %s: ray_resources %s ignored: the server config "
                        "has no ray: key (its workers are local processes)",
                        pipeline.name, name, node.ray_resources,
                    )  # fmt: skip
        return None
    from engine.runtime.workers.ray_worker import RayBackend

    return RayBackend(config.ray)


class Server:
    """One dagserve process: an engine behind a Thrift server."""

    def __init__(self, config: ServerConfig, pipelines: Sequence[Pipeline]) -> None:
        self.config = config
        self.front_count = front_count(config.front_processes)
        #: the files the other front processes load (they cannot be handed the objects)
        self.pipeline_files = [p.path for p in pipelines if p.path is not None]
        if self.front_count > 1 and len(self.pipeline_files) < len(pipelines):
            msg = "front_processes > 1 needs pipelines loaded from files (each front loads them)"
            raise ConfigError(msg)
        workers = WorkerPool(
            ping_interval_s=config.worker_ping_interval_s,
            ping_timeout_s=config.worker_ping_timeout_s,
            restart_wait_s=config.worker_restart_wait_s,
            memory_limit_mb=config.worker_memory_limit_mb,
            quarantine_after_crashes=config.quarantine_after_crashes,
            quarantine_window_s=config.quarantine_window_s,
            worker_threads=None if config.worker_threads == "auto" else config.worker_threads,
            log_level=logging.getLevelName(config.log_level.upper()),
            backend=_ray_backend(config, pipelines),
        )
        # models:/ and s3:// model names resolve against these (engine.runtime.registry)
        configure_registry(config.registry_uri, config.model_cache_dir)
        inventory: DeviceInventory
        if config.ray is not None:  # the cluster's GPUs are Ray's to place, not this machine's
            inventory = RayInventory(config.ray.num_cpus)
        elif config.gpus is not None:
            inventory = DeviceInventory.from_config(config.gpus)
        else:
            inventory = DeviceInventory.from_nvml()
        self.engine = Engine(
            pipelines,
            thread_pool_size=config.thread_pool_size,
            workers=workers,
            inventory=inventory,
            gpu_reserve_mb=config.gpu_reserve_mb,
            slow_request_ms=config.slow_request_ms,
            max_inflight=per_front(config.max_inflight, self.front_count),
            state_file=config.state_file,
            drain_timeout_s=config.drain_timeout_s,
        )
        self.thrift: ThriftServer | None = None
        # With several front processes (engine.fronts): the relay that gives the others this
        # process's models, and the processes themselves.
        self.relay: RelayServer | None = None
        self.fronts: Fronts | None = None
        self._relay_dir: str | None = None
        # The admin port (issue 12) and the file watcher act on the engine's lifecycle, where
        # the config asks for them; made here, so that a bad admin setting (a ConfigError)
        # stops the server before any model loads.
        self.admin: ThriftServer | None = None
        self.watcher: Watcher | None = None
        if config.admin_port is not None:
            self.admin = admin_server(config, self.engine.lifecycle)
        if config.watch:
            self.watcher = Watcher(self.engine.lifecycle, config.watch_interval_s)
        self.http: MetricsServer | None = None
        self.should_exit = asyncio.Event()
        self.started = asyncio.Event()

    @property
    def metrics_port(self) -> int | None:
        return self.http.port if self.http is not None else None

    @property
    def ready(self) -> bool:
        """Every model loaded and every front process serving, and not draining (so that a
        load balancer stops sending new connections while requests in flight finish)."""
        if not self.engine.ready or self.should_exit.is_set():
            return False
        return self.relay is None or self.relay.all_ready(self.front_count)

    @property
    def port(self) -> int:
        assert self.thrift is not None, "server not started"
        return self.thrift.port

    @property
    def admin_port(self) -> int | None:
        return self.admin.port if self.admin is not None else None

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._handle_exit, sig)
        try:
            await self.startup()
            await self.should_exit.wait()
        finally:
            await self.shutdown()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    def _handle_exit(self, sig: signal.Signals) -> None:
        if self.should_exit.is_set():
            # A second signal: stop now.  Workers see their socket close and exit by themselves.
            logger.warning("second %s: exiting without draining", sig.name)
            os._exit(1)
        logger.info(
            "%s: draining (up to %.0f s); again to force", sig.name, self.config.drain_timeout_s
        )
        self.should_exit.set()

    async def startup(self) -> None:
        # The metrics port comes first: /healthz answers and /readyz says 503 while loading.
        if self.config.metrics_port is not None:
            self.http = MetricsServer(
                self.engine.metrics, lambda: self.ready, self.config.host,
                self.config.metrics_port,
            )  # fmt: skip
            await self.http.start()
        # Place and load every model: one that fails to load stops the server here.
        await self.engine.start()
        relay = None
        if self.front_count > 1:
            self._relay_dir = tempfile.mkdtemp(prefix="dagserve-fronts-")
            relay = self.relay = RelayServer(self.engine, os.path.join(self._relay_dir, "relay"))
            await relay.start()
            # An admin change (or --watch) reaches every front before its call returns.
            self.engine.lifecycle.on_change = relay.sync
        self.thrift = ThriftServer(
            InferenceHandler(self.engine, health=_async(relay.health) if relay else None),
            host=self.config.host,
            port=self.config.port,
            max_frame_bytes=self.config.max_frame_bytes,
            idle_timeout_s=self.config.idle_timeout_s,
            ssl_context=self.config.tls.server_context() if self.config.tls else None,
        )
        await self.thrift.start()
        thrift = self.thrift
        if relay is not None:
            # The others bind the port this one got (SO_REUSEPORT), also when asked for port 0.
            config = self.config.model_copy(update={"port": thrift.port, "metrics_port": None})
            self.fronts = Fronts(config, self.pipeline_files, self.front_count, relay)
            await self.fronts.start()
        self.engine.metrics.watch(
            self.engine, lambda: thrift.open_connections + (relay.connections() if relay else 0)
        )
        logger.info("dagserve listening on %s:%d", self.config.host, self.thrift.port)
        await self._start_lifecycle_services()
        self.started.set()

    async def _start_lifecycle_services(self) -> None:
        # Once the inference port serves; they stop before it.
        if self.admin is not None:
            await self.admin.start()
            logger.info("dagserve admin listening on %s:%d", self.config.host, self.admin.port)
        if self.watcher is not None:
            await self.watcher.start()

    async def shutdown(self) -> None:
        self.should_exit.set()  # /readyz answers 503 from now on
        if self.watcher is not None:
            await self.watcher.aclose()
        if self.admin is not None:
            await self.admin.aclose(grace_s=self.config.drain_timeout_s)
        # Stop accepting, let requests in flight finish (bounded), then unload the plugins.
        # The other fronts drain meanwhile; their model items still reach the relay.
        grace_s = self.config.drain_timeout_s
        await asyncio.gather(
            self.thrift.aclose(grace_s=grace_s) if self.thrift else asyncio.sleep(0),
            self.fronts.drain(grace_s) if self.fronts else asyncio.sleep(0),
        )
        if self.relay is not None:
            await self.relay.aclose()
        if self._relay_dir is not None:
            shutil.rmtree(self._relay_dir, ignore_errors=True)
        await self.engine.aclose()
        if self.http is not None:
            await self.http.aclose()
        logger.info("dagserve stopped")


def _async(function: Callable[[], T]) -> Callable[[], Awaitable[T]]:
    async def call() -> T:
        return function()

    return call


__all__ = ["Server"]
