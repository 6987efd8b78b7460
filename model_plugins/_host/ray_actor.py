"""The worker's side on a Ray cluster: the same :class:`~model_plugins._host.main.Host` as a
spawned worker, its messages brought by actor method calls instead of a socket.

The parent (``engine.runtime.workers.ray_worker``) wraps :class:`RayHost` with
``ray.remote`` as a *threaded* actor: each ``call`` runs on one of Ray's actor threads, hands
the message to the host, and blocks until the host's reply to it comes (from the instance's
own thread for a predict, from the control pool for a load), then returns the
:class:`~model_plugins._host.messages.Reply` itself, which the parent unwraps exactly as it
does a reply read off a socket.  So the instances of the actor's models run in parallel, as in
a local worker; Ray's ``max_concurrency`` only has to be larger than the calls that can be in
flight at once (every instance's predict, plus loads, pings and the shutdown).

Nothing here imports Ray: the actor process has it, the parent imports it lazily.  The call
table of the host lives in a temporary file on the actor's node and is never read (no crash
dump crosses nodes: a death is judged by the parent with nobody blamed).
"""

from __future__ import annotations

import os
import socket
import threading
from concurrent.futures import Future
from typing import Any

from model_plugins._host.main import Host, worker_setup
from model_plugins._host.messages import Reply
from model_plugins._host.postmortem import CallTable, FlightRecord


class RayHost:
    """A worker's models inside a Ray actor.

    Args:
        name: the worker's name (``torch@cuda:0``), for logs and thread names.
        log_level: the server's log level.
    """

    def __init__(self, name: str, log_level: int) -> None:
        # The variables of threads.worker_environment came with the actor's runtime_env
        # (set before the process started, as a spawned worker gets them).
        worker_setup(name, log_level)
        self.name = name
        self._record = FlightRecord(name)
        calls_path, _ = self._record.paths()
        self._lock = threading.Lock()
        self._waiting: dict[int, Future[Reply]] = {}
        self._ids = 0
        self.host = Host(self._deliver, name, CallTable(calls_path))

    def where(self) -> tuple[int, str, str]:
        """The actor process's pid, and the id and IP of the Ray node it runs on."""
        import ray  # in the actor process, where Ray is loaded already

        context = ray.get_runtime_context()
        ip = ray.util.get_node_ip_address() or socket.gethostname()  # type: ignore[no-untyped-call]
        return os.getpid(), context.get_node_id(), ip

    def call(self, message: Any) -> Reply:
        """Handle one message and return its reply (on one of the actor's threads)."""
        future: Future[Reply] = Future()
        with self._lock:
            self._ids += 1
            message_id = self._ids
            self._waiting[message_id] = future
        try:
            self.host.handle(message_id, message)
            return future.result()
        finally:
            with self._lock:
                self._waiting.pop(message_id, None)

    def close(self) -> None:
        """After ``Shutdown``: stop the control pool and remove the call table's file."""
        self.host.pool.shutdown(wait=False, cancel_futures=True)
        self._record.remove()

    def _deliver(self, reply: Reply) -> None:
        with self._lock:
            future = self._waiting.get(reply.id)
        if future is not None and not future.done():
            future.set_result(reply)


__all__ = ["RayHost"]
