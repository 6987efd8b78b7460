"""The worker's side: load plugins, run their predicts in threads, answer by correlation id.

One worker hosts every model of one framework on one device, so one CUDA context serves them
all.  A reader thread takes messages off the socket (or, on a Ray cluster, the actor's
method calls bring them: ``model_plugins._host.ray_actor``).  Each loaded instance of a model has a
thread of its own, which runs all its calls: a ``Predict`` names its instance (the parent's
batcher, which bounds a model's concurrency, keeps to one call per instance; another call for
a busy instance waits on its thread).  So different models and the instances of one model
execute concurrently whenever the framework releases the GIL; replies go back under a lock as
each finishes.

So that the parent can tell, after a crash, which call killed the worker and which calls were
only its neighbours, every thread that runs plugin code marks the call it runs in a shared
call table, and ``faulthandler`` dumps the faulting thread into a crash file
(``model_plugins._host.postmortem``).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from model_plugins._host import threads, wire
from model_plugins._host.messages import (
    GetSignature,
    Loaded,
    LoadModel,
    Ping,
    Predict,
    RemoteError,
    Reply,
    Shutdown,
    Unload,
)
from model_plugins._host.postmortem import CallTable, CrashDump, discard
from model_plugins.errors import DagserveError, InferenceError
from model_plugins.partial import Partial
from model_plugins.plugin import Batch, LoadContext, ModelPlugin, Signature
from model_plugins.registry import resolve

logger = logging.getLogger("dagserve.worker")


@dataclass
class _Instance:
    """One loaded copy of a model and the one thread that runs it.

    Every call of one instance runs on the same OS thread: frameworks keep per-thread state
    (an OpenMP team per calling thread in PyTorch), and calls spread over many threads
    oversubscribe the cores.
    """

    plugin: ModelPlugin
    thread: ThreadPoolExecutor
    slot: int  # its row in the call table


@dataclass
class _Hosted:
    plugin: str
    instances: list[_Instance]


class Host:
    """The models of one worker and the handling of its messages, whatever carries them.

    ``send`` takes each :class:`Reply`, from whichever thread finished the call: the socket
    of a spawned worker (:class:`_SocketWorker`) or the Ray actor that hosts models on a
    cluster node (``model_plugins._host.ray_actor``).
    """

    def __init__(
        self,
        send: Callable[[Reply], None],
        name: str,
        calls: CallTable,
        crash: CrashDump | None = None,
    ) -> None:
        self.send = send
        self.name = name
        self.calls = calls
        self.crash = crash
        self.models: dict[str, _Hosted] = {}
        # For loads and unloads; predicts run on each instance's own thread.
        self.pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix=f"{name}-ctl")

    def reply(self, message: Reply) -> None:
        self.send(message)

    def handle(self, message_id: int, message: Any) -> bool:
        """Start ``message``; its reply goes to ``send`` when done.  False after ``Shutdown``
        (answered once every model is unloaded): nothing more is to be handled."""
        if isinstance(message, Ping):
            self.reply(Reply(message_id, value=os.getpid()))
        elif isinstance(message, Predict):
            self.predict(message_id, message)
        elif isinstance(message, LoadModel):
            self.pool.submit(self._guarded, message_id, self.load, message_id, message)
        elif isinstance(message, Unload):
            self.pool.submit(self._guarded, message_id, self.unload, message.model_id)
        elif isinstance(message, GetSignature):
            self.pool.submit(self._guarded, message_id, _signature, message)
        elif isinstance(message, Shutdown):
            for model_id in list(self.models):
                self.unload(model_id)
            self.reply(Reply(message_id))
            return False
        return True

    def _guarded(self, message_id: int, function: Any, *args: Any) -> None:
        try:
            value = function(*args)
        except DagserveError as exc:
            self.reply(Reply(message_id, error=exc))
        except BaseException as exc:
            self.reply(Reply(message_id, error=RemoteError.from_exception(exc)))
        else:
            self.reply(Reply(message_id, value=value))

    def load(self, message_id: int, message: LoadModel) -> Loaded:
        start = time.perf_counter()
        # The import runs here and each instance loads on its own thread: both threads are
        # marked with this call, so that a crash while loading is laid at this model's door.
        slot = self.calls.claim()
        self.calls.begin(slot, message_id)
        instances: list[_Instance] = []
        try:
            plugin_class = resolve(message.plugin)
            for context in message.contexts:
                thread = ThreadPoolExecutor(1, f"{context.node}-{context.instance}")
                instance = _Instance(plugin_class(), thread, self.calls.claim())
                instances.append(instance)
                # loaded where it will run
                thread.submit(self._load_instance, instance, message_id, context).result()
        except BaseException:
            self._drop(instances)
            raise
        finally:
            self.calls.release(slot)
        self.models[message.model_id] = _Hosted(message.plugin, instances)
        if self.crash is not None:
            # A framework may install its own fatal-signal handlers when it is imported
            # (Paddle does): put faulthandler's in front again, or a crash names no thread.
            self.crash.rearm()
        first = instances[0].plugin
        # Adapters learn their specs from the model file during load: report what they state.
        inputs = dict(first.loaded_inputs or {})
        outputs = dict(first.loaded_outputs or {})
        logger.info("%s: loaded %s (%s)", self.name, message.model_id, message.plugin)
        return Loaded(inputs, outputs, plugin_class.framework, time.perf_counter() - start)

    def predict(self, message_id: int, message: Predict) -> None:
        """Run on the thread of the instance the message names."""
        hosted = self.models.get(message.model_id)
        if hosted is None or not 0 <= message.instance < len(hosted.instances):
            msg = (
                f"model {message.model_id!r} has no instance {message.instance} "
                f"loaded in worker {self.name}"
            )
            self.reply(Reply(message_id, error=InferenceError(msg)))
            return
        instance = hosted.instances[message.instance]
        instance.thread.submit(self._run_instance, instance, message_id, message)

    def _load_instance(self, instance: _Instance, message_id: int, context: LoadContext) -> None:
        self.calls.begin(instance.slot, message_id)
        threads.settle()  # this thread's share of the cores, before its framework starts
        instance.plugin.load(context)
        self.calls.end(instance.slot)

    def _run_instance(self, instance: _Instance, message_id: int, message: Predict) -> None:
        self.calls.begin(instance.slot, message_id)
        with threads.running():  # its share of the cores among the calls running now
            self._guarded(message_id, _predict, instance.plugin, message.inputs)
        self.calls.end(instance.slot)

    def unload(self, model_id: str) -> None:
        hosted = self.models.pop(model_id, None)
        for instance in hosted.instances if hosted else []:
            try:
                instance.thread.submit(instance.plugin.unload).result()
            except Exception:
                logger.exception("%s: unloading %s failed", self.name, model_id)
        self._drop(hosted.instances if hosted else [])

    def _drop(self, instances: list[_Instance]) -> None:
        for instance in instances:
            instance.thread.shutdown(wait=False)
            self.calls.release(instance.slot)


def _signature(message: GetSignature) -> Signature:
    inputs, outputs = resolve(message.plugin).signature(message.params, message.upstream)
    return dict(inputs), dict(outputs)


def _predict(plugin: ModelPlugin, inputs: Batch) -> Batch | Partial:
    """``plugin.predict``, refusing outputs that are not numpy: unpickling anything else (a
    framework's tensor) would import its framework in the parent."""
    result = plugin.predict(inputs)
    outputs = result.outputs if isinstance(result, Partial) else result
    if not isinstance(outputs, Mapping):
        return result  # the parent's contract check names what is wrong with it
    for name, value in outputs.items():
        if not isinstance(value, np.ndarray):
            msg = f"output {name!r} must be a numpy array (got {type(value).__name__})"
            raise TypeError(msg)
        if value.dtype.kind == "O":
            for element in value.flat:
                if not isinstance(element, (str, bytes)):
                    kind = type(element).__name__
                    msg = f"output {name!r} must hold str or bytes (holds {kind})"
                    raise TypeError(msg)
    return result


class _SocketWorker:
    """A spawned worker's end of the socket: messages in, :class:`Host` replies out."""

    def __init__(
        self, sock: socket.socket, host_name: str, calls: CallTable, crash: CrashDump
    ) -> None:
        self.sock = sock
        self.send_lock = threading.Lock()
        self.host = Host(self.send, host_name, calls, crash)

    def send(self, message: Reply) -> None:
        with self.send_lock:
            try:
                wire.send(self.sock, message)
            except (OSError, ValueError, TypeError) as exc:
                if isinstance(exc, OSError):
                    raise
                # The value did not pickle: answer with the reason instead.
                error = RemoteError.from_exception(exc)
                wire.send(self.sock, Reply(message.id, error=error))

    def serve(self) -> None:
        while True:
            try:
                message_id, message = wire.recv(self.sock)
            except (EOFError, OSError):
                return  # the parent went away: nothing left to serve
            if not self.host.handle(message_id, message):
                return


def worker_setup(name: str, log_level: int) -> None:
    """What every worker process does first, spawned or a Ray actor: frameworks print to
    stdout (Paddle's oneDNN check does), so stdout goes to stderr, and nothing a plugin prints
    can mix with whatever owns the process's stdout; logging names the worker and its pid."""
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    logging.basicConfig(
        level=log_level, format=f"%(asctime)s %(levelname)s [{name} pid %(process)d] %(message)s"
    )


def worker_entry(
    sock: socket.socket, name: str, log_level: int, calls_path: str, crash_path: str
) -> None:
    """The target of the spawned worker process.

    ``calls_path`` and ``crash_path`` are the call table and the crash file the parent reads
    after a death (``model_plugins._host.postmortem``).
    """
    worker_setup(name, log_level)
    # The parent handles Ctrl-C and shuts workers down in order; a terminal's SIGINT reaches
    # the whole process group, so ignore it here.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # On a fatal signal, the stacks of all threads, the faulting one named; the file stays
    # open for the life of the process.
    crash = CrashDump(open(crash_path, "w"))  # noqa: SIM115
    worker = _SocketWorker(sock, name, CallTable(calls_path), crash)
    try:
        worker.serve()
        discard(calls_path, crash_path)  # an orderly end: nothing to judge
    finally:
        worker.host.pool.shutdown(wait=False, cancel_futures=True)
        sock.close()
        # Skip interpreter teardown: frameworks' atexit hooks can hang or crash on the way out.
        os._exit(0)


__all__ = ["Host", "worker_entry", "worker_setup"]
