"""A model's compute time inside a worker process against the same call offline.

    .venv/bin/python -m benchmarks.worker_speed [--quick] [--pairs N] [--calls N]
        [--worker-threads auto|N] [--cores N] [--offline-as-is]

Two models, fixed seeds: a TorchScript CNN (four 3x3 conv layers on 3x224x224, traced) and a
numpy MatVec (a 4096x4096 float32 matrix times each item).  Each plugin times its own compute
(``perf_counter``, the process's CPU time and its minor page faults around the forward / the
product) and returns them with its output, so what is compared is the model's compute alone,
not the crossing.

* **worker**: the plugin loaded in a worker (``WorkerPool``, as the server does), called one
  batch at a time;
* **offline**: the same plugin class in a fresh process, loaded and called on a thread (what a
  user's script does; the framework's default threads), with the same pause between calls as
  the worker had (measured from the end of one compute to the start of the next).  Its glibc
  allocator keeps freed memory as a worker's does (``malloc_environment``), so that both run
  at their best; ``--offline-as-is`` leaves glibc's defaults, under which a process re-faults
  a forward's buffers on every call or not, by the luck of what it allocated first.

Blocks alternate (worker, offline, worker, ...) so that both meet the same neighbours on the
machine; the ratio is worker/offline median compute time per pair of blocks, and the table
gives the median and range over the pairs.  Each model runs at batch 1 and at its best batch
(the one with the most items/s offline, from a short sweep, printed below the table; when it
is batch 1, the model has one row).  Target (issue 15): worker / offline <= 1.10 in each
row.  A last row runs two instances of the CNN in one worker, called at once, against one
instance: what a second thread team costs.  ``--cores N`` pins this process (and so the
worker and the offline process) to N CPUs.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import itertools
import multiprocessing
import os
import resource
import statistics
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from benchmarks._serving import serve_on_one_thread
from engine.runtime.workers.pool import WorkerKey, WorkerPool
from engine.tools.bench import render_table
from model_plugins import LoadContext, ModelPlugin, TensorSpec
from model_plugins._host.threads import malloc_environment

#: per item: compute wall s, process CPU s during it, perf_counter at start and at end, minor
#: page faults of the process during it
TIMES = TensorSpec("float64", [5])


def _mark() -> tuple[float, float, int]:
    return (
        time.perf_counter(),
        time.process_time(),
        resource.getrusage(resource.RUSAGE_SELF).ru_minflt,
    )


def _times(n: int, mark: tuple[float, float, int]) -> np.ndarray:
    end = time.perf_counter()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - mark[2]
    row = np.array([end - mark[0], time.process_time() - mark[1], mark[0], end, faults])
    return np.repeat(row[None, :], n, axis=0)


def build_cnn(path: Path) -> None:
    """Four 3x3 conv layers (3->32->64->64->128, three of stride 2), pooled to 10 logits."""
    import warnings

    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, 1, 1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU(),
        nn.Conv2d(64, 64, 3, 2, 1), nn.ReLU(),
        nn.Conv2d(64, 128, 3, 2, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10),
    ).eval()  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, torch.zeros(1, 3, 224, 224))  # type: ignore[no-untyped-call]
        torch.jit.save(traced, str(path))


class TimedCNN(ModelPlugin):
    """The CNN's logits, and how long the forward took."""

    framework = "torch"
    inputs: ClassVar = {"x": TensorSpec("float32", [3, 224, 224])}
    outputs: ClassVar = {"y": TensorSpec("float32", [10]), "t": TIMES}

    def load(self, context: LoadContext) -> None:
        import warnings

        import torch

        self.torch = torch
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model = torch.jit.load(context.params["path"])  # type: ignore[no-untyped-call]

    def predict(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = batch["x"]
        if not x.flags.writeable:  # from_numpy warns on read-only arrays
            x = x.copy()
        mark = _mark()
        with self.torch.inference_mode():
            y = self.model(self.torch.from_numpy(x)).numpy()
        return {"y": y, "t": _times(len(x), mark)}


class TimedMatVec(ModelPlugin):
    """A 4096x4096 float32 matrix times each item (numpy's BLAS), and how long it took."""

    inputs: ClassVar = {"x": TensorSpec("float32", [4096])}
    outputs: ClassVar = {"y": TensorSpec("float32", [4096]), "t": TIMES}

    def load(self, context: LoadContext) -> None:
        self.w = np.random.default_rng(0).random((4096, 4096), dtype=np.float32)

    def predict(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = batch["x"]
        mark = _mark()
        y = x @ self.w.T
        return {"y": y, "t": _times(len(x), mark)}


MODELS: dict[str, dict[str, Any]] = {
    "cnn": {
        "plugin": "benchmarks.worker_speed:TimedCNN", "class": TimedCNN, "key": "torch",
        "shape": (3, 224, 224), "sweep": (1, 4, 8, 16),
    },
    "matvec": {
        "plugin": "benchmarks.worker_speed:TimedMatVec", "class": TimedMatVec, "key": "numpy",
        "shape": (4096,), "sweep": (1, 16, 64, 256),
    },
}  # fmt: skip


#: issue 15: a model's compute time inside the worker within 10 % of offline
TARGET = 1.10
#: model -> batch size -> offline items/s, from the sweep that picks the best batch
SWEEPS: dict[str, dict[int, float]] = {}


# --- offline: a fresh process that runs the plugin on a thread ---------------------------


def _offline_main(conn: Connection, name: str, params: dict[str, Any]) -> None:
    plugin = MODELS[name]["class"]()

    def load() -> Any:
        plugin.load(LoadContext(node=name, plugin=MODELS[name]["plugin"], params=params))
        return plugin

    def run(plugin: Any, command: Any) -> list[Any]:
        x, calls, gap = command
        plugin.predict({"x": x})  # warm
        rows = []
        for _ in range(calls):
            time.sleep(gap)
            rows.append(plugin.predict({"x": x})["t"][0])
        return rows

    serve_on_one_thread(conn, load, run)


class Offline:
    def __init__(self, name: str, params: dict[str, Any], keep: bool = True) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_offline_main, args=(child, name, params))
        # the worker's allocator settings (read by glibc at start), so that both run at their
        # best; the child copies os.environ when it starts
        env = malloc_environment() if keep else {}
        saved = {var: os.environ.get(var) for var in env}
        os.environ.update(env)
        try:
            self.process.start()
        finally:
            for var, value in saved.items():
                if value is None:
                    os.environ.pop(var, None)
                else:
                    os.environ[var] = value
        assert self.conn.recv() == "loaded"

    def run(self, x: np.ndarray, calls: int, gap: float) -> list[np.ndarray]:
        self.conn.send((x, calls, gap))
        rows: list[np.ndarray] = self.conn.recv()
        return rows

    def close(self) -> None:
        self.conn.send(None)
        self.process.join(30)


# --- the worker side -----------------------------------------------------------------------


async def _worker_block(
    pool: WorkerPool, key: WorkerKey, model_id: str, x: np.ndarray, calls: int, pause: float
) -> list[np.ndarray]:
    await pool.predict(key, model_id, {"x": x})  # warm
    rows = []
    for _ in range(calls):
        if pause:
            await asyncio.sleep(pause)
        rows.append((await pool.predict(key, model_id, {"x": x}))["t"][0])
    return rows


def _gap(rows: list[np.ndarray]) -> float:
    """Median time from the end of one compute to the start of the next."""
    gaps = [b[2] - a[3] for a, b in itertools.pairwise(rows)]
    return statistics.median(gaps) if gaps else 0.0


def _ms(rows: list[np.ndarray], column: int = 0) -> float:
    return statistics.median(float(r[column]) for r in rows) * 1000


def _pool(worker_threads: int | None) -> WorkerPool:
    # `worker_threads` exists from this benchmark's commit on; leave it out for "auto" so
    # that the same script measures the code before it.
    return WorkerPool(**({"worker_threads": worker_threads} if worker_threads else {}))


async def compare(
    name: str, params: dict[str, Any], pairs: int, calls: int, pause: float,
    worker_threads: int | None, quick: bool, keep: bool = True,
) -> list[dict[str, object]]:  # fmt: skip
    """Rows for one model: batch 1 and its best batch, worker against offline."""
    spec = MODELS[name]
    rng = np.random.default_rng(1)
    offline = Offline(name, params, keep)
    pool = _pool(worker_threads)
    key = WorkerKey(spec["key"], "cpu")
    model_id = f"bench/{name}"
    rows: list[dict[str, object]] = []
    try:
        context = LoadContext(node=name, plugin=spec["plugin"], params=params)
        await pool.load(key, model_id, spec["plugin"], (context,))
        # the best batch: most items/s offline, a few calls each
        sweep = {}
        for size in spec["sweep"]:
            x = rng.random((size, *spec["shape"]), dtype=np.float32)
            got = await asyncio.to_thread(offline.run, x, 3 if quick else 6, 0.0)
            sweep[size] = size / _ms(got) * 1000
        best = max(sweep, key=lambda s: sweep[s])
        SWEEPS[name] = sweep
        for size in dict.fromkeys((1, best)):
            x = rng.random((size, *spec["shape"]), dtype=np.float32)
            ratios, worker_ms, offline_ms, worker_cpu, offline_cpu = [], [], [], [], []
            faults: dict[str, list[float]] = {"worker": [], "offline": []}
            for _ in range(pairs):
                got = await _worker_block(pool, key, model_id, x, calls, pause)
                await asyncio.sleep(0.2)  # let the worker's spinning threads settle
                off = await asyncio.to_thread(offline.run, x, calls, _gap(got))
                await asyncio.sleep(0.2)
                worker_ms.append(_ms(got))
                offline_ms.append(_ms(off))
                worker_cpu.append(_ms(got, 1))
                offline_cpu.append(_ms(off, 1))
                faults["worker"] += [float(r[4]) for r in got]
                faults["offline"] += [float(r[4]) for r in off]
                ratios.append(worker_ms[-1] / offline_ms[-1])
            ratio = statistics.median(ratios)
            rows.append({
                "model": name,
                "batch": size,
                "best batch?": "yes" if size == best else "no",
                "worker ms": statistics.median(worker_ms),
                "offline ms": statistics.median(offline_ms),
                "ratio": ratio,
                "target": f"<= {TARGET:.2f}",
                "met?": "yes" if ratio <= TARGET else "NO",
                "ratio range": f"{min(ratios):.2f}-{max(ratios):.2f}",
                "worker CPU ms": statistics.median(worker_cpu),
                "offline CPU ms": statistics.median(offline_cpu),
                "worker faults/call": statistics.mean(faults["worker"]),
                "offline faults/call": statistics.mean(faults["offline"]),
            })  # fmt: skip
    finally:
        await pool.aclose()
        offline.close()
    return rows


async def two_instances(
    params: dict[str, Any], calls: int, worker_threads: int | None
) -> dict[str, object]:
    """Two CNN instances in one worker called at once, against one instance alone."""
    spec = MODELS["cnn"]
    pool = _pool(worker_threads)
    key = WorkerKey("torch", "cpu")
    x = np.random.default_rng(2).random((1, *spec["shape"]), dtype=np.float32)
    try:
        contexts = tuple(
            LoadContext(node="cnn", plugin=spec["plugin"], params=params, instance=i)
            for i in range(2)
        )
        await pool.load(key, "bench/cnn2", spec["plugin"], contexts)

        async def loop(instance: int) -> list[np.ndarray]:
            out = []
            for _ in range(calls):
                got = await pool.predict(key, "bench/cnn2", {"x": x}, instance=instance)
                out.append(got["t"][0])
            return out

        await loop(0)
        await loop(1)
        alone = await loop(0)
        start = time.perf_counter()
        both = await asyncio.gather(loop(0), loop(1))
        seconds = time.perf_counter() - start
    finally:
        await pool.aclose()
    return {
        "one instance ms": _ms(alone),
        "two at once ms": statistics.median(_ms(rows) for rows in both),
        "two at once items/s": 2 * calls / seconds,
        "one instance items/s": 1000 / _ms(alone),
    }


async def main(args: argparse.Namespace) -> str:
    threads = None if args.worker_threads == "auto" else int(args.worker_threads)
    out = []
    with tempfile.TemporaryDirectory(prefix="worker-speed-") as folder:
        path = Path(folder) / "cnn.pt"
        build_cnn(path)
        params = {"cnn": {"path": str(path)}, "matvec": {}}
        rows = []
        for name in args.models:
            rows += await compare(
                name, params[name], args.pairs, args.calls, args.pause_ms / 1000, threads,
                args.quick, not args.offline_as_is,
            )  # fmt: skip
        out.append(
            f"Worker against offline, batch 1 and the best batch (target: worker / offline "
            f"compute time <= {TARGET:.2f}):\n"
        )
        out.append(render_table(rows))
        sweep_rows = [
            {"model": name, "batch": size, "offline items/s": speed,
             "best": "yes" if speed == max(sweep.values()) else ""}
            for name, sweep in SWEEPS.items() for size, speed in sweep.items()
        ]  # fmt: skip
        out.append("\nThe sweep that picks each model's best batch (offline, no pause):\n")
        out.append(render_table(sweep_rows))
        if not args.quick and "cnn" in args.models:
            two = await two_instances(params["cnn"], args.calls, threads)
            out.append("\nTwo CNN instances in one worker, batch 1, called at once:\n")
            out.append(render_table([two]))
    worst = max(float(r["ratio"]) for r in rows)  # type: ignore[arg-type]
    cores = len(os.sched_getaffinity(0))
    each = ", ".join(
        f"{r['model']}@{r['batch']}{' (best)' if r['best batch?'] == 'yes' else ''} "
        f"{float(r['ratio']):.2f} ({'met' if r['met?'] == 'yes' else 'NOT met'})"  # type: ignore[arg-type]
        for r in rows
    )
    out.append(
        f"\nReading: worker/offline compute time (target <= {TARGET:.2f}), median over "
        f"{args.pairs} pairs of alternating blocks of {args.calls} calls on {cores} CPUs: "
        f"{each}; worst {worst:.2f} (worker_threads {args.worker_threads})."
    )
    return "\n".join(out)


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer pairs and calls")
    parser.add_argument("--pairs", type=int, default=None, help="worker/offline block pairs")
    parser.add_argument("--calls", type=int, default=None, help="calls per block")
    parser.add_argument("--pause-ms", type=float, default=2.0, help="pause between calls")
    parser.add_argument("--worker-threads", default="auto", help="auto or N (per instance)")
    parser.add_argument("--cores", type=int, default=None, help="pin to this many CPUs")
    parser.add_argument(
        "--offline-as-is", action="store_true",
        help="leave glibc's malloc defaults in the offline process (a plain script's lottery)",
    )  # fmt: skip
    parser.add_argument("--models", nargs="+", default=None, choices=list(MODELS))
    args = parser.parse_args(argv)
    if args.models is None:  # the CNN where torch is installed
        torch = importlib.util.find_spec("torch") is not None
        args.models = [name for name in MODELS if torch or MODELS[name]["key"] != "torch"]
    args.pairs = args.pairs or (2 if args.quick else 4)
    args.calls = args.calls or (6 if args.quick else 10)
    return args


if __name__ == "__main__":
    arguments = _parse()
    if arguments.cores:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: arguments.cores])
    print(asyncio.run(main(arguments)))
