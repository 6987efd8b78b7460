"""A worker's compute threads and memory: how many threads per model, how they wait, and
keeping freed memory for the next call.

A worker runs each loaded instance of a model on a thread of its own.  When that thread calls
the framework, the op runs on a *team* of threads: torch starts an OpenMP team per calling
thread (two instances, or two models, are two teams), numpy's OpenBLAS has one pool.  Left
alone, every team is as wide as the machine: I instances run I x cores threads, and once a
process holds more OpenMP threads than cores, libgomp stops spinning at barriers and sleeps
instead (14 voluntary context switches per forward of the benchmark CNN instead of 0).

The rule (``ServerConfig.worker_threads``):

* ``auto``: a worker is given ``cores`` CPUs (its CPU affinity, capped by a cgroup CPU quota);
  a call gets ``max(1, cores // R)`` intra-op threads, R being the instances *running*: the
  calls in flight in the worker, this one included, and the instances whose last call ended
  within :data:`BUSY_WINDOW_S` (a batcher under load calls again within milliseconds).  So a
  model whose neighbours in the worker are idle runs on every core, as it would in a script,
  and busy instances together do not run more compute threads than there are cores (a call
  already running keeps its width until it ends: for a moment after a neighbour wakes, the
  teams may hold a few threads more than the cores).  Held instances, not running ones, set
  the width of what is process-wide (numpy's BLAS pool: changing it costs about a
  millisecond): ``max(1, cores // I)`` for the I instances the worker holds.
  ``OMP_NUM_THREADS`` in the server's environment counts as ``N``.
* ``N``: each instance gets N intra-op threads, whatever it holds.

Inter-op: torch's inter-op pool (``torch.jit.fork``) gets 1 thread (each task on it would
start one more team); TensorFlow's pools are process-wide, shared by every call of the worker:
intra-op = the worker's width, inter-op = 2 (at most the width).  Paddle predictors use one
math thread each unless a node sets the adapter's ``cpu_threads``.

How: the parent sets the worker's environment before it starts (:func:`worker_environment`:
``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``, TensorFlow's
``TF_NUM_INTRAOP_THREADS`` / ``TF_NUM_INTEROP_THREADS``, how long idle threads spin
(:data:`SPIN_VARS`) and glibc's malloc (:func:`malloc_environment`), all read when a library
loads); in the worker, each instance thread calls :func:`settle` before it loads its model and
runs each call inside :func:`running`, which set that thread's share (``torch.set_num_threads``
holds per calling thread; numpy's BLAS through ``threadpoolctl`` where it is installed).
Variables the operator set are left as they are.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import os
import sys
import threading
import time
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger("dagserve.worker")

#: set by the parent for the worker: "auto" or a positive int (threads per instance)
THREADS_VAR = "DAGSERVE_WORKER_THREADS"
#: set by the parent for the worker: the CPUs it is given
CORES_VAR = "DAGSERVE_WORKER_CORES"
#: set by the parent for the worker: the framework it hosts (torch, tensorflow, paddle, numpy)
FRAMEWORK_VAR = "DAGSERVE_WORKER_FRAMEWORK"
#: the variables a framework reads at import for the width of its teams
TEAM_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
#: TensorFlow's process-wide pools
TF_INTER_OP = 2
#: how long an idle compute thread spins before it sleeps.  libgomp (torch) spins 300k rounds
#: by default (2-5 ms here), OpenBLAS (numpy) 2^28 cycles (~0.1 s): a worker called every few
#: ms keeps a team's threads spinning between calls, on cores the server process needs, and a
#: spinning team whose partner was preempted burns its time slice (the benchmark CNN at batch 1
#: took 159 ms instead of 10 beside one busy loop on 2 CPUs; 26-45 ms with 10-30k rounds).
#: 30k rounds cost the CNN nothing measurable when quiet; OpenBLAS threads woken from sleep cost
#: ~2 ms per call on a 2 ms product here, so they spin 2^24 cycles (~7 ms) rather than 2^20.
SPIN_VARS = {"GOMP_SPINCOUNT": "30000", "OPENBLAS_THREAD_TIMEOUT": "24"}
#: glibc malloc in a worker: one arena, no mmap for big blocks, freed memory kept (1 GiB at the
#: top of the heap); see :func:`malloc_environment`
MALLOC_TUNABLES = {
    "glibc.malloc.arena_max": "1",
    "glibc.malloc.mmap_max": "0",
    "glibc.malloc.trim_threshold": str(1 << 30),
}
#: an instance whose last call ended this recently still counts as running (see the rule)
BUSY_WINDOW_S = 0.05
_MALLOC_VARS = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_",
                "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")  # fmt: skip


def malloc_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``GLIBC_TUNABLES`` that make a worker keep the memory its models free (the parent's side).

    A forward pass allocates its intermediate tensors (megabytes each, hundreds at large
    batches) and frees them before the next call.  Under glibc's defaults the blocks above an
    adaptive threshold are mmap'ed and unmapped every call, a thread's own arena hands whole
    64 MiB heaps back when they empty, and the heap's top is trimmed: every page is then
    faulted in again on every call (the benchmark CNN: 3,888 minor faults per batch-1 forward,
    +100 % time, in some processes and none in others, by the luck of what each allocated
    first; ~22,000 at batch 4; ~155,000, +30 % time, at batch 16).  One arena (the main heap),
    no mmap'ed blocks and a trim threshold of 1 GiB keep that memory in the heap, reused from
    call to call, at the cost of the worker keeping its peak heap (``worker_memory_limit_mb``
    sees it).  Read by glibc when the process starts, so set at spawn.  Empty where the
    operator set glibc's malloc variables already; harmless where the C library is not glibc.
    """
    environ = os.environ if environ is None else environ
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc." in tunables or any(var in environ for var in _MALLOC_VARS):
        return {}
    ours = ":".join(f"{key}={value}" for key, value in MALLOC_TUNABLES.items())
    return {"GLIBC_TUNABLES": f"{tunables}:{ours}" if tunables else ours}


def available_cores() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def _cgroup_quota() -> float | None:
    """CPUs allowed by the cgroup's CPU quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``)."""
    quotas: list[float] = []
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            hierarchy, controllers, path = line.split(":", 2)
            base = Path("/sys/fs/cgroup")
            if hierarchy == "0":  # v2: walk from the process's group up to the root
                folder = base / path.lstrip("/")
                while True:
                    with contextlib.suppress(OSError, ValueError):
                        limit, period = (folder / "cpu.max").read_text().split()
                        if limit != "max":
                            quotas.append(int(limit) / int(period))
                    if folder == base or base not in folder.parents:
                        break
                    folder = folder.parent
            elif "cpu" in controllers.split(","):
                for root in (base / "cpu,cpuacct", base / "cpu"):
                    with contextlib.suppress(OSError, ValueError):
                        limit_us = int((root / "cpu.cfs_quota_us").read_text())
                        period_us = int((root / "cpu.cfs_period_us").read_text())
                        if limit_us > 0:
                            quotas.append(limit_us / period_us)
    return min(quotas) if quotas else None


def parse_setting(value: object) -> int | None:
    """``"auto"`` (or None) -> None; a positive int (or its text) -> that int.

    Raises:
        ValueError: anything else.
    """
    if value is None or value == "auto":
        return None
    try:
        number = int(str(value))
    except ValueError:
        number = 0
    if number < 1:
        msg = f"worker threads must be 'auto' or a positive integer, not {value!r}"
        raise ValueError(msg)
    return number


def explicit_setting(setting: int | None, environ: Mapping[str, str]) -> int | None:
    """The configured count; under ``auto``, an ``OMP_NUM_THREADS`` the server was given."""
    if setting is not None:
        return setting
    with contextlib.suppress(ValueError):
        return parse_setting(environ.get("OMP_NUM_THREADS"))
    return None


def per_instance(cores: int, instances: int, setting: int | None) -> int:
    """Intra-op threads of each instance: ``setting``, else ``max(1, cores // instances)``."""
    if setting is not None:
        return setting
    return max(1, cores // max(1, instances))


def worker_environment(
    framework: str,
    setting: int | None,
    *,
    cores: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The variables a worker of ``framework`` starts with (the parent's side).

    Args:
        setting: threads per instance; None: auto.
        cores: the CPUs the worker is given; default :func:`available_cores`.
        environ: the server's environment (default ``os.environ``): variables already set
            there are kept as they are.
    """
    environ = os.environ if environ is None else environ
    cores = available_cores() if cores is None else cores
    setting = explicit_setting(setting, environ)
    # Before the worker knows its models, a team is at most as wide as the cores (or N);
    # settle() narrows each instance's team once the worker knows how many it holds.
    width = per_instance(cores, 1, setting)
    env = {
        THREADS_VAR: "auto" if setting is None else str(setting),
        CORES_VAR: str(cores),
        FRAMEWORK_VAR: framework,
    }
    wanted = {var: str(width) for var in TEAM_VARS}
    if framework == "tensorflow":
        wanted["TF_NUM_INTRAOP_THREADS"] = str(width)
        wanted["TF_NUM_INTEROP_THREADS"] = str(min(width, TF_INTER_OP))
    if "OMP_WAIT_POLICY" not in environ:  # else the operator chose how threads wait
        wanted.update(SPIN_VARS)
    env.update({var: value for var, value in wanted.items() if var not in environ})
    env.update(malloc_environment(environ))
    return env


class _Budget:
    """The worker's side: the instance threads it holds and what each was set to."""

    def __init__(self) -> None:
        environ = os.environ
        self.setting: int | None = None
        if THREADS_VAR in environ:  # the parent resolved it (OMP_NUM_THREADS is its own now)
            with contextlib.suppress(ValueError):
                self.setting = parse_setting(environ[THREADS_VAR])
        else:  # started by something else than a WorkerPool
            self.setting = explicit_setting(None, environ)
        try:
            self.cores = max(1, int(environ[CORES_VAR]))
        except (KeyError, ValueError):
            self.cores = available_cores()
        self.framework = environ.get(FRAMEWORK_VAR)
        self.lock = threading.Lock()
        self.threads: weakref.WeakSet[threading.Thread] = weakref.WeakSet()
        #: instance thread -> when its last call ended (``inf`` while one runs)
        self.ended: weakref.WeakKeyDictionary[threading.Thread, float] = weakref.WeakKeyDictionary()
        self.local = threading.local()
        self.blas: int | None = None
        self.interop_done = False

    def instances(self) -> int:
        with self.lock:
            self.threads.add(threading.current_thread())
            return sum(1 for thread in self.threads if thread.is_alive())

    def begin(self) -> int:
        """This thread starts a call: the instances running now, this one included."""
        now = time.monotonic()
        with self.lock:
            me = threading.current_thread()
            self.threads.add(me)
            self.ended[me] = math.inf
            recent = now - BUSY_WINDOW_S
            return sum(1 for t, end in self.ended.items() if end >= recent and t.is_alive())

    def end(self) -> None:
        with self.lock:
            self.ended[threading.current_thread()] = time.monotonic()

    def settle(self, running: int | None = None) -> int:
        held = self.instances()
        count = per_instance(self.cores, held if running is None else running, self.setting)
        process_wide = per_instance(self.cores, held, self.setting)
        if getattr(self.local, "count", None) != count or self.blas != process_wide:
            self.local.count = count
            try:
                self._apply(count, process_wide)
            except Exception:  # a framework that will not be set must not fail the call
                logger.warning("could not set %d intra-op threads", count, exc_info=True)
        return count

    def _apply(self, count: int, process_wide: int) -> None:
        if self.framework == "torch":
            with contextlib.suppress(ImportError):  # the plugin imports it anyway: set it first
                importlib.import_module("torch")
        torch: Any = sys.modules.get("torch")
        if torch is not None:
            if not self.interop_done:
                self.interop_done = True
                with contextlib.suppress(RuntimeError):  # too late once inter-op work ran
                    torch.set_num_interop_threads(1)
            if torch.get_num_threads() != count:  # per calling thread (its OpenMP team)
                torch.set_num_threads(count)
        if self.blas != process_wide and "numpy" in sys.modules:
            self.blas = process_wide
            with contextlib.suppress(ImportError):
                from threadpoolctl import threadpool_limits

                threadpool_limits(limits=process_wide, user_api="blas")


_budget: _Budget | None = None
_budget_lock = threading.Lock()


def _the_budget() -> _Budget:
    global _budget
    with _budget_lock:
        if _budget is None:
            _budget = _Budget()
        return _budget


def settle() -> int:
    """On an instance's thread, before it loads: set the intra-op threads of the calling
    thread to its share of the cores among the instances held; returns it."""
    return _the_budget().settle()


@contextlib.contextmanager
def running() -> Iterator[int]:
    """On an instance's thread, around each call: its share of the cores among the instances
    running now (see the module's rule); yields it."""
    budget = _the_budget()
    try:
        yield budget.settle(budget.begin())
    finally:
        budget.end()


__all__ = [
    "available_cores",
    "malloc_environment",
    "parse_setting",
    "per_instance",
    "running",
    "settle",
    "worker_environment",
]
