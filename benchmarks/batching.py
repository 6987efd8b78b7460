"""Dynamic batching: served throughput and latency against the same model run offline.

    .venv/bin/python -m benchmarks.batching [--quick] [--out DIR]

Two TorchScript models (fixed seeds): a ResNet-18 ("heavy", 3x224x224 -> 1000) and an MLP
512-1024-1024-10 ("light"). Each is served by one-node pipelines, with batching
(``max_batch_size: 32, max_delay_ms: 0``) and without, by ``dagserve serve`` in a SUBPROCESS
(the load generator runs in this process and does not share the server's GIL). Offline figures
come from ``torch`` called directly in another subprocess (``torch.inference_mode()``, torch's
default thread count, as in the worker), measured before AND after the served runs; the
better of the two is used, which makes every served/offline ratio conservative.

Scenarios (all in one run, side by side):
  1. heavy, closed loop at concurrency 64, batched: items/s against the best offline items/s
  2. light, the same
  3. concurrency 1: served p50 against the offline batch-1 latency, both models
  4. concurrency 32, batched against not batched, both models

Mean batch sizes come from the server's health details (``model.<pipeline>/<node>``),
differenced over each measurement window.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from engine.tools.bench import BenchResult, BenchSpec, render_table, run_bench
from engine.tools.ports import free_port, wait_ready
from engine.transport.client import Client

ROOT = Path(__file__).resolve().parent.parent
BATCH_SIZES = (1, 8, 16, 32, 64)
QUICK_BATCH_SIZES = (1, 8, 32)

MODELS = {
    "heavy": {"file": "resnet18.pt", "input": "pixels", "shape": [3, 224, 224], "out": "logits"},
    "light": {"file": "mlp.pt", "input": "features", "shape": [512], "out": "scores"},
}


# --- offline side (runs in a subprocess: `python -m benchmarks.batching --_offline DIR`) ------


def _build_mlp(seed: int = 0):  # type: ignore[no-untyped-def]
    import torch
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
    ).eval()


def export_models(folder: Path) -> None:
    """Write resnet18.pt and mlp.pt (torch.jit.trace, fixed seeds) unless they exist."""
    import warnings

    import torch

    from benchmarks.resnet18 import build_resnet18

    folder.mkdir(parents=True, exist_ok=True)
    for name, build, example in (
        ("resnet18.pt", build_resnet18, torch.zeros(1, 3, 224, 224)),
        ("mlp.pt", _build_mlp, torch.zeros(1, 512)),
    ):
        path = folder / name
        if path.exists():
            continue
        with torch.inference_mode(False), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(build(), example)
            tmp = path.with_suffix(".tmp")
            torch.jit.save(traced, str(tmp))
        tmp.replace(path)


def measure_offline(
    folder: Path, seconds: float, sizes: tuple[int, ...] = BATCH_SIZES
) -> dict[str, dict[str, float]]:
    """Per model: items/s at each batch size (median time per call) and batch-1 latency."""
    quick = seconds < 1
    import warnings

    import torch

    result: dict[str, dict[str, float]] = {"threads": {"torch": float(torch.get_num_threads())}}
    rng = np.random.default_rng(0)
    for key in ("heavy", "light"):
        spec = MODELS[key]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = torch.jit.load(str(folder / spec["file"]))
        module.eval()
        row: dict[str, float] = {}
        for size in sizes:
            x = torch.from_numpy(rng.random((size, *spec["shape"]), dtype=np.float32))
            times: list[float] = []
            with torch.inference_mode():
                for _ in range(2):  # warm up (TorchScript profiles the first calls)
                    module(x)
                until = time.perf_counter() + seconds
                while time.perf_counter() < until or len(times) < (3 if quick else 5):
                    start = time.perf_counter()
                    module(x)
                    times.append(time.perf_counter() - start)
            median = float(np.median(times))
            row[f"items/s@{size}"] = size / median
            if size == 1:
                row["batch1 ms"] = median * 1000
        result[key] = row
    return result


def offline_in_subprocess(folder: Path, seconds: float) -> dict[str, dict[str, float]]:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.batching", "--_offline", str(folder),
         "--_seconds", str(seconds)] + (["--quick"] if seconds < 1 else []),
        cwd=ROOT, check=True, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- served side --------------------------------------------------------------------------


def write_pipelines(folder: Path, max_batch: int) -> list[Path]:
    paths = []
    for key, spec in MODELS.items():
        for batched in (True, False):
            name = key if batched else f"{key}_nobatch"
            batching = (
                f"    batching: {{max_batch_size: {max_batch}, max_delay_ms: 0, max_queue: 1024}}\n"
                if batched
                else ""
            )
            text = (
                f"name: {name}\n"
                f"inputs:\n"
                f"  {spec['input']}: {{dtype: float32, shape: {spec['shape']}}}\n"
                f"nodes:\n"
                f"  model:\n"
                f"    plugin: torchscript\n"
                f"    model: {spec['file']}\n"
                f"    params: {{input_names: [x], output_names: [{spec['out']}]}}\n"
                f"    instances: 1\n"
                f"{batching}"
                f"    inputs: {{x: $inputs.{spec['input']}}}\n"
                f"outputs:\n"
                f"  {spec['out']}: model.{spec['out']}\n"
            )
            path = folder / f"{name}.yaml"
            path.write_text(text)
            paths.append(path)
    return paths


def start_server(paths: list[Path], log: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", "serve", *map(str, paths),
             "--port", str(port), "--log-level", "warning"],
            cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_ready(port, process, timeout_s=180, poll_s=0.3, output=lambda: log.read_text()[-3000:])
    except BaseException:
        process.terminate()
        raise
    return process, port


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process so far (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_pids(port: int, front: int) -> dict[str, int]:
    """{"front": pid, "worker": pid} (the torch@cpu worker, from the health details)."""
    with Client("127.0.0.1", port, timeout_s=10) as client:
        details = client.health().details
    pids = {"front": front, "loadgen": os.getpid()}
    match = re.search(r"pid=(\d+)", details.get("worker.torch@cpu", ""))
    if match:
        pids["worker"] = int(match.group(1))
    return pids


def batch_counters(port: int, pipeline: str) -> tuple[int, float]:
    """(batches, items) of the pipeline's model, from the health details."""
    with Client("127.0.0.1", port, timeout_s=10) as client:
        details = client.health().details
    text = details.get(f"model.{pipeline}/model", "")
    batches = re.search(r"batches=(\d+)", text)
    mean = re.search(r"mean_batch=([\d.]+)", text)
    if not batches or not mean:
        return 0, 0.0
    return int(batches.group(1)), int(batches.group(1)) * float(mean.group(1))


#: process name -> pid, set once the server is up (for the CPU split of each window)
PIDS: dict[str, int] = {}
#: scenario pipeline+concurrency -> process -> CPU seconds used during its window
CPU: dict[str, dict[str, float]] = {}


def load_spec(
    port: int, pipeline: str, concurrency: int, duration_s: float, warmup_s: float
) -> BenchSpec:
    """Closed-loop load of one-item requests (fixed seed) on one model's pipeline."""
    spec = MODELS[pipeline.split("_")[0]]
    x = np.random.default_rng(1).random((1, *spec["shape"]), dtype=np.float32)
    return BenchSpec(
        "127.0.0.1", port, pipeline, [{spec["input"]: x}], concurrency=concurrency,
        duration_s=duration_s, warmup_s=warmup_s, timeout_ms=60_000,
    )  # fmt: skip


async def served(
    port: int, pipeline: str, concurrency: int, duration: float, warmup: float
) -> tuple[BenchResult, float, int]:
    """Run the load; also the mean batch size and batches over the window (from health)."""
    if warmup > 0:  # a run of its own: the batch counters then cover the window alone
        await run_bench(load_spec(port, pipeline, concurrency, warmup, 0.0))
    b0, i0 = batch_counters(port, pipeline)
    c0 = {name: cpu_seconds(pid) for name, pid in PIDS.items()}
    result = await run_bench(load_spec(port, pipeline, concurrency, duration, 0.0))
    c1 = {name: cpu_seconds(pid) for name, pid in PIDS.items()}
    b1, i1 = batch_counters(port, pipeline)
    CPU[f"{pipeline} c{concurrency}"] = {name: c1[name] - c0[name] for name in c0}
    batches = b1 - b0
    mean = (i1 - i0) / batches if batches else float("nan")
    return result, mean, batches


def _row(result: BenchResult, mean_batch: float, batches: int) -> dict[str, object]:
    # the columns the batching tables have always had (run_bench's summary has others)
    return {
        "pipeline": result.pipeline,
        "concurrency": result.concurrency,
        "requests": result.ok,
        "items/s": result.throughput_items_s,
        "p50 ms": result.latency_ms(50),
        "p95 ms": result.latency_ms(95),
        "p99 ms": result.latency_ms(99),
        "errors": ", ".join(f"{k}={v}" for k, v in sorted(result.errors.items())) or "0",
        "mean batch": mean_batch,
        "batches": batches,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run (< ~60 s)")
    parser.add_argument("--out", type=Path, help="model/pipeline folder (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    parser.add_argument("--_offline", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--_export", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--_seconds", type=float, default=2.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._export:
        export_models(args._export)
        return 0
    if args._offline:
        sizes = QUICK_BATCH_SIZES if args.quick else BATCH_SIZES
        print(json.dumps(measure_offline(args._offline, args._seconds, sizes)))
        return 0

    quick = args.quick
    # (warm-up s, window s) per load; offline seconds per batch size
    heavy_w, heavy_d = (1.0, 3.0) if quick else (5.0, 25.0)
    light_w, light_d = (0.5, 2.0) if quick else (3.0, 15.0)
    idle_w, idle_d = (0.5, 1.5) if quick else (2.0, 10.0)
    offline_s = 0.3 if quick else 2.5
    sizes = QUICK_BATCH_SIZES if quick else BATCH_SIZES
    started = time.perf_counter()
    tmp = None
    if args.out is None:
        tmp = tempfile.TemporaryDirectory(prefix="dagserve-batching-")
        folder = Path(tmp.name)
    else:
        folder = args.out
        folder.mkdir(parents=True, exist_ok=True)

    print(f"models and pipelines in {folder}", flush=True)
    subprocess.run(
        [sys.executable, "-m", "benchmarks.batching", "--_export", str(folder)],
        cwd=ROOT, check=True,
    )  # fmt: skip
    paths = write_pipelines(folder, max_batch=32)
    print("offline (before) ...", flush=True)
    offline_before = offline_in_subprocess(folder, offline_s)
    print("starting the server ...", flush=True)
    process, port = start_server(paths, folder / "server.log")
    figures: dict[str, object] = {"offline_before": offline_before}
    try:
        with Client("127.0.0.1", port) as client:
            details = client.health().details
        workers = {k: v for k, v in details.items() if k.startswith("worker.")}
        figures["workers"] = workers
        PIDS.update(server_pids(port, process.pid))

        async def scenarios() -> dict[str, tuple[BenchResult, float, int]]:
            out: dict[str, tuple[BenchResult, float, int]] = {}
            plan = [
                ("s1 heavy c64", "heavy", 64, heavy_d, heavy_w),
                ("s2 light c64", "light", 64, light_d, light_w),
                ("s3 heavy c1", "heavy", 1, idle_d, idle_w),
                ("s3 light c1", "light", 1, idle_d, idle_w),
                ("s4 heavy c32 batched", "heavy", 32, heavy_d * 0.6, heavy_w),
                ("s4 heavy c32 not batched", "heavy_nobatch", 32, heavy_d * 0.6, heavy_w),
                ("s4 light c32 batched", "light", 32, light_d, light_w),
                ("s4 light c32 not batched", "light_nobatch", 32, light_d, light_w),
            ]
            for label, pipeline, concurrency, duration, warmup in plan:
                print(f"{label} ({warmup:.0f} s warm-up + {duration:.0f} s) ...", flush=True)
                out[label] = await served(port, pipeline, concurrency, duration, warmup)
            return out

        runs = asyncio.run(scenarios())
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    print("offline (after) ...", flush=True)
    offline_after = offline_in_subprocess(folder, offline_s)
    figures["offline_after"] = offline_after

    # offline: the better of before/after, per batch size
    offline: dict[str, dict[str, float]] = {}
    for key in ("heavy", "light"):
        merged = {}
        for k in offline_before[key]:
            a, b = offline_before[key][k], offline_after[key][k]
            merged[k] = min(a, b) if k.endswith("ms") else max(a, b)
        offline[key] = merged

    print()
    print(
        f"torch threads: {int(offline_before['threads']['torch'])} (offline), "
        f"server workers: {figures['workers']}"
    )
    print("\n### Offline (torch directly, inference_mode; better of before/after)\n")
    rows = []
    for key in ("heavy", "light"):
        for when, data in (("before", offline_before), ("after", offline_after),
                           ("used (better)", offline)):  # fmt: skip
            row: dict[str, object] = {"model": key, "measured": when,
                                      "batch-1 ms": data[key]["batch1 ms"]}  # fmt: skip
            for size in sizes:
                row[f"items/s @{size}"] = data[key][f"items/s@{size}"]
            rows.append(row)
        spread = max(
            abs(offline_before[key][k] / offline_after[key][k] - 1) for k in offline_before[key]
        )
        if spread > 0.2:
            print(
                f"NOTE: {key}: before and after differ by up to {spread:.0%}: "
                "the machine was busy (other work) during one of them"
            )
    print(render_table(rows))

    print("\n### Served runs\n")
    print(render_table([{"scenario": label, **_row(*run)} for label, run in runs.items()]))

    print("\n### 1-2. Batching efficiency at concurrency 64 (target heavy >= 0.9, light >= 0.4)\n")
    rows = []
    summary: dict[str, object] = {}
    for key, label, target in (("heavy", "s1 heavy c64", 0.9), ("light", "s2 light c64", 0.4)):
        best_size = max(sizes, key=lambda s: offline[key][f"items/s@{s}"])
        best = offline[key][f"items/s@{best_size}"]
        at32 = offline[key]["items/s@32"]
        served_tput = runs[label][0].throughput_items_s
        ratio = served_tput / best
        rows.append({
            "model": key, "served items/s": served_tput, "mean batch": runs[label][1],
            "offline best items/s": best, "best batch": best_size,
            "served / offline best": ratio, "served / offline@32": served_tput / at32,
            "target": target, "met": "yes" if ratio >= target else "NO",
        })  # fmt: skip
        summary[f"efficiency_{key}"] = ratio
    print(render_table(rows))

    print("\n### 3. Idle latency, concurrency 1 (target: served p50 <= offline batch-1 + 1 ms)\n")
    rows = []
    for key in ("heavy", "light"):
        result = runs[f"s3 {key} c1"][0]
        p50 = result.latency_ms(50)
        base = offline[key]["batch1 ms"]
        rows.append({
            "model": key, "served p50 ms": p50, "served p99 ms": result.latency_ms(99),
            "offline batch-1 ms": base, "difference ms": p50 - base,
            "met": "yes" if p50 - base <= 1.0 else "NO",
        })  # fmt: skip
        summary[f"idle_overhead_ms_{key}"] = p50 - base
    print(render_table(rows))

    print("\n### 4. Batched against not batched, concurrency 32\n")
    rows = []
    for key in ("heavy", "light"):
        on = runs[f"s4 {key} c32 batched"]
        off = runs[f"s4 {key} c32 not batched"]
        rows.append({
            "model": key,
            "batched items/s": on[0].throughput_items_s, "batched p99 ms": on[0].latency_ms(99),
            "mean batch": on[1],
            "not batched items/s": off[0].throughput_items_s,
            "not batched p99 ms": off[0].latency_ms(99),
            "speed-up": on[0].throughput_items_s / off[0].throughput_items_s
            if off[0].throughput_items_s else float("nan"),
        })  # fmt: skip
        summary[f"speedup_{key}"] = rows[-1]["speed-up"]
    print(render_table(rows))
    print("\n### Where the CPU went in each window (CPU seconds / window seconds; 2 cores = 2.0)\n")
    rows = []
    for label, run in runs.items():
        used = CPU.get(f"{run[0].pipeline} c{run[0].concurrency}", {})
        row = {"scenario": label}
        for name in ("front", "worker", "loadgen"):
            row[name] = used.get(name, float("nan")) / run[0].window_s
        row["items/s"] = run[0].throughput_items_s
        rows.append(row)
    print(render_table(rows))
    figures["cpu"] = CPU
    errors = {label: run[0].errors for label, run in runs.items() if run[0].errors}
    print(f"\nerrors in the windows: {errors or 'none'}")
    for label, run in runs.items():
        for kind, message in run[0].error_examples.items():
            print(f"  {label}: first {kind}: {message}")
    print(f"total {time.perf_counter() - started:.0f} s")

    if args.json:
        figures["offline"] = offline
        figures["served"] = {label: {**_row(*run)} for label, run in runs.items()}
        figures["summary"] = summary
        args.json.write_text(json.dumps(figures, indent=2, default=str))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
