"""ResNet-18 on a GPU: the model called offline against the same TorchScript file served by
dagserve on ``cuda:0`` (torchscript adapter, dynamic batching), side by side in one run.

Needs a CUDA device and torch with CUDA; run where one is (``make gpu-check`` runs the GPU
tests, this measures)::

    python -m benchmarks.gpu [--seconds 5] [--out gpu.md]
    python -m benchmarks.gpu --report benchmarks/RESULTS-gpu.md --code COMMIT

``--report`` also runs the GPU tests (``pytest -m gpu tests/gpu``, what ``make gpu-check``
runs) and writes both, under a header naming the code, the machine and the date, to the file
that ``benchmarks.run_all`` appends to RESULTS.md as a separate run.

Offline: the traced module on ``cuda:0`` in this process, ``torch.cuda.synchronize()`` after
each call, with a numpy input copied to the card and the output copied back (what a served
call does too).  Served: ``dagserve serve`` in a subprocess, loaded by ``engine.tools.bench``'s
closed loop over Thrift on 127.0.0.1 (concurrency 1 for latency, 64 for throughput).
"""

from __future__ import annotations

import argparse
import datetime as dt
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._serving import (
    ROOT,
    dagserve_command,
    figures,
    measure,
    ratio,
    serving,
)
from benchmarks.batching import export_models
from engine.tools.ports import free_port

SIZES = (1, 8, 32, 64)
PIPELINE = """
name: gpu_resnet
inputs: {{pixels: {{dtype: float32, shape: [3, 224, 224]}}}}
nodes:
  net:
    plugin: torchscript
    model: {model}
    params: {{input_names: [pixels], output_names: [logits]}}
    device: cuda:0
    gpu_memory_mb: 2048
    batching: {{max_batch_size: {max_batch}, max_delay_ms: 2}}
    inputs: {{pixels: $inputs.pixels}}
    outputs: {{logits: {{dtype: float32, shape: [1000]}}}}
outputs: {{logits: net.logits}}
"""


def offline(model: Path, seconds: float) -> dict[str, float]:
    """items/s per batch size (median call) and the batch-1 latency, numpy in and out."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(model), map_location="cuda:0").eval()
    rng = np.random.default_rng(0)
    row: dict[str, float] = {"card": 0.0}
    with torch.inference_mode():
        for size in SIZES:
            x = rng.random((size, 3, 224, 224), dtype=np.float32)
            times: list[float] = []
            for _ in range(5):  # warm up: cuDNN picks its kernels, TorchScript profiles
                module(torch.from_numpy(x).to("cuda:0")).cpu()
            until = time.perf_counter() + seconds
            while time.perf_counter() < until or len(times) < 10:
                start = time.perf_counter()
                module(torch.from_numpy(x).to("cuda:0")).cpu().numpy()
                torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            median = float(np.median(times))
            row[f"items/s@{size}"] = size / median
            if size == 1:
                row["batch1 ms"] = median * 1000
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--report", type=Path, help="run the GPU tests too; write both here")
    parser.add_argument("--code", default="unknown", help="the commit measured (for --report)")
    args = parser.parse_args(argv)
    tests = gpu_tests() if args.report is not None else ""
    import torch

    name = torch.cuda.get_device_name(0)
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        folder = Path(tmp)
        export_models(folder)
        model = folder / "resnet18.pt"
        alone = offline(model, args.seconds)
        best_size = max(SIZES, key=lambda s: alone[f"items/s@{s}"])
        best = alone[f"items/s@{best_size}"]
        path = folder / "gpu.yaml"
        path.write_text(PIPELINE.format(model=model, max_batch=max(SIZES)))
        port = free_port()
        sample = [{"pixels": np.random.default_rng(1).random((1, 3, 224, 224), np.float32)}]
        with serving(dagserve_command([path], port), port, ready_timeout_s=300):
            idle = figures(measure(port, "gpu_resnet", sample, concurrency=1,
                                   duration_s=args.seconds, warmup_s=2))  # fmt: skip
            loaded = figures(measure(port, "gpu_resnet", sample, concurrency=64,
                                     duration_s=args.seconds * 2, warmup_s=2))  # fmt: skip
    lines = [
        f"ResNet-18 (TorchScript, fp32) on {name}, `python -m benchmarks.gpu --seconds "
        f"{args.seconds:g}`",
        "",
        "| | offline | served | served / offline |",
        "|---|---:|---:|---:|",
        f"| batch 1 latency, p50 ms | {alone['batch1 ms']:.2f} | {idle['p50 ms']:.2f} | "
        f"{ratio(idle['p50 ms'], alone['batch1 ms']):.2f} |",
        f"| throughput, items/s (offline: best batch {best_size}; served: 64 clients) | "
        f"{best:.0f} | {loaded['req/s']:.0f} | {ratio(loaded['req/s'], best):.2f} |",
        "",
        "Offline items/s by batch size: "
        + ", ".join(f"{s}: {alone[f'items/s@{s}']:.0f}" for s in SIZES)
        + f". Served at 64 clients: p99 {loaded['p99 ms']:.1f} ms, errors {loaded['errors']}.",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    if args.report is not None:
        when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        head = [
            "# GPU results",
            "",
            f"Code: {args.code}. Machine: {name}, torch {torch.__version__}, Python "
            f"{sys.version.split()[0]}. Date: {when}. Command: `python -m benchmarks.gpu "
            f"--report {args.report} --code {args.code} --seconds {args.seconds:g}`.",
            "",
            "## The GPU tests (`pytest -m gpu tests/gpu`, as `make gpu-check` runs them)",
            "",
            "```",
            tests.strip(),
            "```",
            "",
            "## Served against offline",
            "",
        ]
        args.report.write_text("\n".join(head) + text + "\n")
    return 0


def gpu_tests() -> str:
    """Run the GPU tests; their verbose result lines and summary."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-v", "-rs", "-m", "gpu", "tests/gpu",
         "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    lines = [
        line for line in done.stdout.splitlines()
        if "::" in line or line.startswith(("SKIPPED", "FAILED", "=", "GPU"))
    ]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
