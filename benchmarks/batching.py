"""Dynamic batching: served throughput against the same model run offline, and the light
model against the echo ceiling of the same stack.

    .venv/bin/python -m benchmarks.batching [--quick] [--out DIR] [--json FILE]

Two TorchScript models (fixed seeds): a ResNet-18 ("heavy", 3x224x224 -> 1000) and an MLP
512-1024-1024-10 ("light"). Each is served by a one-node pipeline with batching
(``max_batch_size: 32, max_delay_ms: 0``) by ``dagserve serve`` in a SUBPROCESS (the load
generator runs in this process and does not share the server's GIL). Offline figures come
from ``torch`` called directly in another subprocess (``torch.inference_mode()``, torch's
default thread count, as in the worker) at batch sizes 1, 4, 8, 16 and 32 (the served
``max_batch_size``), before the served runs; the best size of each model is measured again
after them, and the better figure is used, which makes every served/offline ratio
conservative.

Windows (all in one run, side by side), closed loops of one-item requests at concurrency 64:

  1. heavy, batched: items/s against the offline best batch's items/s (target >= 0.9);
  2. light, batched, and the **echo ceiling**: ``benchmarks.rpc_overhead``'s bare same-stack
     server (dagserve's own ``ThriftServer`` answering the request's tensors undecoded) under
     the same load and payload, in halves ordered light, echo, echo, light; target: light
     items/s >= 0.5 of the lesser of its offline best batch and the echo ceiling.

Mean batch sizes come from the server's health details (``model.<pipeline>/<node>``),
differenced over each measurement window.  Idle latency at batch 1 is ``benchmarks.idle``'s.
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
#: offline batch sizes (the served max_batch_size is the largest)
BATCH_SIZES = (1, 4, 8, 16, 32)
QUICK_BATCH_SIZES = (1, 8, 32)
MAX_BATCH = 32
CONCURRENCY = 64
#: issue 15's targets: heavy served / offline best; light served / min(offline best, echo)
TARGETS = {"heavy": 0.9, "light": 0.5}

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
    folder: Path, seconds: float, sizes: dict[str, tuple[int, ...]]
) -> dict[str, dict[str, float]]:
    """Per model: items/s at each of its batch sizes (median time per call), and the batch-1
    latency where batch 1 is among them."""
    import warnings

    import torch

    result: dict[str, dict[str, float]] = {"threads": {"torch": float(torch.get_num_threads())}}
    rng = np.random.default_rng(0)
    for key, model_sizes in sizes.items():
        spec = MODELS[key]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = torch.jit.load(str(folder / spec["file"]))
        module.eval()
        with torch.inference_mode():  # TorchScript profiles its first calls
            for _ in range(2):
                module(torch.zeros((1, *spec["shape"])))
        row: dict[str, float] = {}
        for size in model_sizes:
            x = torch.from_numpy(rng.random((size, *spec["shape"]), dtype=np.float32))
            times: list[float] = []
            with torch.inference_mode():
                module(x)  # warm this size up
                until = time.perf_counter() + seconds
                # a few calls at least: a large batch on a busy machine may take seconds
                while time.perf_counter() < until or len(times) < 3:
                    start = time.perf_counter()
                    module(x)
                    times.append(time.perf_counter() - start)
            median = float(np.median(times))
            row[f"items/s@{size}"] = size / median
            if size == 1:
                row["batch1 ms"] = median * 1000
        result[key] = row
    return result


def offline_in_subprocess(
    folder: Path, seconds: float, sizes: dict[str, tuple[int, ...]]
) -> dict[str, dict[str, float]]:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.batching", "--_offline", str(folder),
         "--_seconds", str(seconds), "--_sizes", json.dumps(sizes)]
        + (["--quick"] if seconds < 1 else []),
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
    used = CPU.setdefault(f"{pipeline} c{concurrency}", {})  # summed over a load's windows
    for name in c0:
        used[name] = used.get(name, 0.0) + c1[name] - c0[name]
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


def merged_window(
    runs: list[tuple[BenchResult, float, int]],
) -> tuple[BenchResult, float, int]:
    """Several windows against one pipeline as one (requests, windows and batches summed)."""
    from benchmarks.rpc_overhead import merge

    result = merge([run[0] for run in runs])
    result.concurrency = runs[0][0].concurrency
    batches = sum(run[2] for run in runs)
    items = sum(run[1] * run[2] for run in runs if run[2])
    return result, items / batches if batches else float("nan"), batches


def best_batch(figures: dict[str, float]) -> tuple[int, float]:
    """(size, items/s) of the batch size with the most items/s."""
    sizes = [int(k.split("@")[1]) for k in figures if k.startswith("items/s@")]
    size = max(sizes, key=lambda s: figures[f"items/s@{s}"])
    return size, figures[f"items/s@{size}"]


def target_rows(
    offline: dict[str, dict[str, float]],
    served: dict[str, tuple[BenchResult, float, int]],
    echo_items_s: float,
) -> list[dict[str, object]]:
    """The issue's two batching targets, one row per model."""
    rows: list[dict[str, object]] = []
    for key in ("heavy", "light"):
        size, best = best_batch(offline[key])
        result, mean_batch, _ = served[key]
        served_tput = result.throughput_items_s
        reference = best if key == "heavy" else min(best, echo_items_s)
        ratio = served_tput / reference if reference else float("nan")
        rows.append({
            "model": key, "clients": CONCURRENCY, "served items/s": served_tput,
            "mean batch": mean_batch, "offline best batch (size, items/s)": f"{size}, {best:.0f}",
            "echo ceiling": echo_items_s if key == "light" else "-",
            "ratio": ratio, "target": f">= {TARGETS[key]}",
            "met?": "yes" if ratio >= TARGETS[key] else "NO",
        })  # fmt: skip
    return rows


def reading(rows: list[dict[str, object]]) -> str:
    parts = [
        f"{r['model']} {float(r['ratio']):.2f} of "  # type: ignore[arg-type]
        + ("its offline best batch" if r["model"] == "heavy" else
           "min(offline best batch, echo ceiling)")
        + f" (target {r['target']}: {'met' if r['met?'] == 'yes' else 'NOT met'})"
        for r in rows
    ]  # fmt: skip
    return f"served items/s under {CONCURRENCY} clients: " + "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run (< ~60 s)")
    parser.add_argument("--out", type=Path, help="model/pipeline folder (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    parser.add_argument("--_offline", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--_export", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--_seconds", type=float, default=1.5, help=argparse.SUPPRESS)
    parser.add_argument("--_sizes", type=json.loads, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._export:
        export_models(args._export)
        return 0
    if args._offline:
        print(json.dumps(measure_offline(args._offline, args._seconds, args._sizes)))
        return 0

    from benchmarks._serving import measure, serving

    quick = args.quick
    # (warm-up s, window s) per load; offline seconds per batch size
    heavy_w, heavy_d = (1.0, 3.0) if quick else (3.0, 12.0)
    light_w, light_d = (0.5, 2.0) if quick else (2.0, 8.0)
    echo_d = 1.0 if quick else 6.0
    offline_s = 0.3 if quick else 1.5
    sizes = QUICK_BATCH_SIZES if quick else BATCH_SIZES
    started = time.perf_counter()
    tmp = None
    if args.out is None:
        tmp = tempfile.TemporaryDirectory(prefix="dagserve-batching-")
        folder = Path(tmp.name)
    else:
        folder = args.out
        folder.mkdir(parents=True, exist_ok=True)

    print(f"models and pipelines in {folder}", file=sys.stderr, flush=True)
    subprocess.run(
        [sys.executable, "-m", "benchmarks.batching", "--_export", str(folder)],
        cwd=ROOT, check=True,
    )  # fmt: skip
    paths = [p for p in write_pipelines(folder, MAX_BATCH) if "nobatch" not in p.name]
    print("offline (before) ...", file=sys.stderr, flush=True)
    offline_before = offline_in_subprocess(folder, offline_s, {k: sizes for k in MODELS})
    print("starting the servers ...", file=sys.stderr, flush=True)
    process, port = start_server(paths, folder / "server.log")
    echo_port = free_port()
    echo_command = [sys.executable, "-m", "benchmarks.rpc_overhead", "--_bare", "same-stack",
                    str(echo_port)]  # fmt: skip
    figures: dict[str, object] = {"offline_before": offline_before}
    try:
        with Client("127.0.0.1", port) as client:
            details = client.health().details
        workers = {k: v for k, v in details.items() if k.startswith("worker.")}
        figures["workers"] = workers
        PIDS.update(server_pids(port, process.pid))

        async def heavy_and_light() -> dict[str, tuple[BenchResult, float, int]]:
            print(f"heavy x{CONCURRENCY} ({heavy_w:.0f} s warm-up + {heavy_d:.0f} s) ...",
                  file=sys.stderr, flush=True)  # fmt: skip
            heavy = await served(port, "heavy", CONCURRENCY, heavy_d, heavy_w)
            print(f"light x{CONCURRENCY} ({light_w:.0f} s warm-up + {light_d:.0f} s), in halves "
                  "around the echo ceiling ...", file=sys.stderr, flush=True)  # fmt: skip
            first = await served(port, "light", CONCURRENCY, light_d / 2, light_w)
            return {"heavy": heavy, "light": first}

        runs = asyncio.run(heavy_and_light())
        light_x = load_spec(port, "light", 1, 1, 0).samples
        with serving(echo_command, echo_port):
            echo = merge_echo([
                measure(echo_port, "light", light_x, concurrency=CONCURRENCY,
                        duration_s=echo_d / 2, warmup_s=0.5)
                for _ in range(2)
            ])  # fmt: skip
        second = asyncio.run(served(port, "light", CONCURRENCY, light_d / 2, 0.5))
        runs["light"] = merged_window([runs["light"], second])
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    print("offline (after) ...", file=sys.stderr, flush=True)
    best_sizes: dict[str, tuple[int, ...]] = {
        k: (best_batch(offline_before[k])[0],) for k in MODELS
    }
    offline_after = offline_in_subprocess(folder, offline_s, best_sizes)
    figures["offline_after"] = offline_after

    # offline: the better of before/after, per batch size measured both times
    offline: dict[str, dict[str, float]] = {}
    for key in MODELS:
        merged = dict(offline_before[key])
        for k, b in offline_after[key].items():
            merged[k] = min(merged[k], b) if k.endswith("ms") else max(merged[k], b)
        offline[key] = merged

    print(
        f"torch threads: {int(offline_before['threads']['torch'])} (offline), "
        f"server workers: {figures['workers']}"
    )
    print(f"\n### 1-2. Served at concurrency {CONCURRENCY} against offline and the echo "
          "ceiling\n")  # fmt: skip
    rows = target_rows(offline, runs, echo.throughput_items_s)
    print(render_table(rows))
    print(
        "\nratio: heavy served / offline best batch; light served / the lesser of offline "
        "best batch and the echo ceiling (the bare same-stack echo server's req/s under the "
        f"same {CONCURRENCY} clients and payload)"
    )

    print("\n### Offline (torch directly, inference_mode; better of before/after)\n")
    table = []
    for key in MODELS:
        for when, data in (("before", offline_before), ("after", offline_after),
                           ("used (better)", offline)):  # fmt: skip
            row: dict[str, object] = {"model": key, "measured": when}
            for size in sizes:
                row[f"items/s @{size}"] = data[key].get(f"items/s@{size}", float("nan"))
            table.append(row)
        size = best_sizes[key][0]
        a, b = offline_before[key][f"items/s@{size}"], offline_after[key][f"items/s@{size}"]
        if abs(a / b - 1) > 0.2:
            print(
                f"NOTE: {key}: before and after differ by {abs(a / b - 1):.0%} at batch {size}: "
                "the machine was busy (other work) during one of them"
            )
    print(render_table(table))

    print("\n### Served windows\n")
    served_rows = [{"scenario": f"{key} batched", **_row(*run)} for key, run in runs.items()]
    served_rows.append({"scenario": "echo ceiling (same stack)", **_row(echo, float("nan"), 0)})
    print(render_table(served_rows))
    print("\n### Where the CPU went in each window (CPU seconds / window seconds; 2 cores = 2.0)\n")
    cpu_rows = []
    for label, run in runs.items():
        used = CPU.get(f"{run[0].pipeline} c{run[0].concurrency}", {})
        cpu_row: dict[str, object] = {"scenario": label}
        for name in ("front", "worker", "loadgen"):
            cpu_row[name] = used.get(name, float("nan")) / run[0].window_s
        cpu_row["items/s"] = run[0].throughput_items_s
        cpu_rows.append(cpu_row)
    print(render_table(cpu_rows))
    figures["cpu"] = CPU
    errors = {label: run[0].errors for label, run in runs.items() if run[0].errors}
    print(f"\nerrors in the windows: {errors or 'none'}")
    for label, run in runs.items():
        for kind, message in run[0].error_examples.items():
            print(f"  {label}: first {kind}: {message}")
    print(f"total {time.perf_counter() - started:.0f} s")
    print(f"\nReading: {reading(rows)}")

    if args.json:
        figures["offline"] = offline
        figures["served"] = {label: {**_row(*run)} for label, run in runs.items()}
        figures["echo_items_s"] = echo.throughput_items_s
        figures["targets"] = rows
        args.json.write_text(json.dumps(figures, indent=2, default=str))
    if tmp is not None:
        tmp.cleanup()
    return 0


def merge_echo(results: list[BenchResult]) -> BenchResult:
    from benchmarks.rpc_overhead import merge

    merged = merge(results)
    merged.concurrency = results[0].concurrency
    return merged


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
