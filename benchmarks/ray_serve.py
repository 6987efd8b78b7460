"""Ray Serve ``@serve.batch`` against dagserve, on the same two models, in one run.

    .venv/bin/python -m benchmarks.ray_serve [--quick] [--skip-ours] [--skip-handle]

The models are those of ``benchmarks.batching`` (TorchScript ResNet-18 "heavy", MLP
512-1024-1024-10 "light", fixed seeds). For each model and concurrency (64: throughput;
1: idle latency) the same closed loop runs against

- dagserve: ``dagserve serve`` in a subprocess (``max_batch_size: 32, max_delay_ms: 0``),
  called over Thrift with the closed loop of ``engine.tools.bench``;
- Ray Serve, HTTP: one replica, ``@serve.batch(max_batch_size=32, batch_wait_timeout_s=0)``
  (matched to ``max_delay_ms: 0``), ``max_ongoing_requests`` = the concurrency, called over
  HTTP/1.1 keep-alive on 127.0.0.1 (one connection per task, raw float32 body): the fair
  comparison with our RPC;
- Ray Serve, HTTP, Ray's default ``batch_wait_timeout_s=0.01`` (concurrency 64 only);
- Ray Serve through a ``DeploymentHandle`` from the driver: Ray's best case (no HTTP proxy).

Ray runs from its own venv, ``benchmarks/.ray-venv`` (created here on first use:
``ray[serve]``, ``torch==2.13.0``, ``numpy``), kept on 127.0.0.1
(``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, ``ray.init(_node_ip_address="127.0.0.1")``), and
stopped with ``serve.shutdown()`` / ``ray.shutdown()`` by the driver that started it (never
``ray stop``). Its logs are then searched for any IPv4 address other than 127.0.0.1/0.0.0.0.

This file runs in two interpreters: the project's (dagserve side, orchestration) and the Ray
venv's (``--_ray-driver``); the Ray side imports nothing from the project.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RAY_VENV = ROOT / "benchmarks" / ".ray-venv"
MODELS_DIR = ROOT / "benchmarks" / ".cache" / "batching"
MODELS = {
    "heavy": {"file": "resnet18.pt", "input": "pixels", "shape": [3, 224, 224], "out": "logits"},
    "light": {"file": "mlp.pt", "input": "features", "shape": [512], "out": "scores"},
}


def _pct(sorted_s: list[float], p: float) -> float:
    if not sorted_s:
        return math.nan
    return sorted_s[max(1, math.ceil(p / 100 * len(sorted_s))) - 1] * 1000


# --- Ray side (the Ray venv's interpreter) -------------------------------------------------


async def _http_closed_loop(
    port: int, route: str, body: bytes, concurrency: int, duration: float, warmup: float
) -> dict[str, object]:
    """Closed loop over raw HTTP/1.1 keep-alive connections (one per task)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    w0, w1 = start + warmup, start + warmup + duration
    lat: list[float] = []
    errors: dict[str, int] = {}
    example: dict[str, str] = {}
    head = (
        f"POST {route} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()

    async def task() -> None:
        reader = writer = None
        while loop.time() < w1:
            sent = loop.time()
            error = None
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.writelines((head, body))
                await writer.drain()
                status_line = await reader.readline()
                status = int(status_line.split()[1])
                length = 0
                while True:
                    line = await reader.readline()
                    if line in (b"\r\n", b""):
                        break
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                payload = await reader.readexactly(length)
                if status != 200:
                    error = f"HTTP{status}"
                    example.setdefault(error, payload[:300].decode(errors="replace"))
            except Exception as exc:
                error = type(exc).__name__
                example.setdefault(error, str(exc)[:300])
                if writer is not None:
                    writer.close()
                reader = writer = None
            done = loop.time()
            if w0 <= done < w1:
                if error is None:
                    lat.append(done - sent)
                else:
                    errors[error] = errors.get(error, 0) + 1
        if writer is not None:
            writer.close()

    await asyncio.gather(*(task() for _ in range(concurrency)))
    lat.sort()
    return _figures(lat, duration, errors, example)


async def _handle_closed_loop(
    handle, x, concurrency: int, duration: float, warmup: float
) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    start = loop.time()
    w0, w1 = start + warmup, start + warmup + duration
    lat: list[float] = []
    errors: dict[str, int] = {}
    example: dict[str, str] = {}

    async def task() -> None:
        while loop.time() < w1:
            sent = loop.time()
            error = None
            try:
                await handle.infer.remote(x)
            except Exception as exc:
                error = type(exc).__name__
                example.setdefault(error, str(exc)[:300])
            done = loop.time()
            if w0 <= done < w1:
                if error is None:
                    lat.append(done - sent)
                else:
                    errors[error] = errors.get(error, 0) + 1

    await asyncio.gather(*(task() for _ in range(concurrency)))
    lat.sort()
    return _figures(lat, duration, errors, example)


def _figures(lat: list[float], duration: float, errors: dict, example: dict) -> dict[str, object]:
    return {
        "requests": len(lat), "items/s": len(lat) / duration, "p50 ms": _pct(lat, 50),
        "p95 ms": _pct(lat, 95), "p99 ms": _pct(lat, 99), "errors": errors,
        "error_examples": example,
    }  # fmt: skip


def ray_driver(plan: list[dict[str, object]], models_dir: Path, http_port: int) -> dict:
    """Runs in the Ray venv: deploy each configuration, load it, return the figures."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import numpy as np
    import ray
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import Response

    @serve.deployment(ray_actor_options={"num_cpus": 1})
    class Model:
        def __init__(self, path: str, shape: list[int], max_batch: int, wait_s: float) -> None:
            import torch

            self.threads_before = torch.get_num_threads()
            # Ray sets OMP_NUM_THREADS from the actor's num_cpus (1): match the dagserve
            # worker, which keeps torch's default (one thread per core, 2 here).
            torch.set_num_threads(os.cpu_count() or 1)
            self.torch = torch
            self.model = torch.jit.load(path).eval()
            self.shape = tuple(shape)
            self.batched = serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=wait_s)(
                self._batched
            )
            self.sizes: list[int] = []

        async def _batched(self, xs: list) -> list:
            self.sizes.append(len(xs))
            x = self.torch.from_numpy(np.stack(xs))
            with self.torch.inference_mode():
                y = self.model(x).numpy()
            return list(y)

        async def __call__(self, request: Request) -> Response:
            body = await request.body()
            x = np.frombuffer(body, dtype=np.float32).reshape(self.shape)
            y = await self.batched(x)
            return Response(y.tobytes(), media_type="application/octet-stream")

        async def infer(self, x):
            return await self.batched(x)

        def stats(self) -> dict:
            sizes, self.sizes = self.sizes, []
            return {
                "threads_before": self.threads_before,
                "threads": self.torch.get_num_threads(),
                "batches": len(sizes),
                "mean_batch": sum(sizes) / len(sizes) if sizes else math.nan,
            }

    ray.init(
        _node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=2,
        logging_level="warning", log_to_driver=False,
    )  # fmt: skip
    session_dir = ray._private.worker._global_node.get_session_dir_path()
    results = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        for step in plan:
            key = str(step["model"])
            spec = MODELS[key]
            concurrency = int(step["concurrency"])
            app = Model.options(max_ongoing_requests=concurrency).bind(
                str(models_dir / spec["file"]), spec["shape"], 32, float(step["wait_s"])
            )
            handle = serve.run(app, name=key, route_prefix=f"/{key}", blocking=False)
            x = np.random.default_rng(1).random(spec["shape"], dtype=np.float32)
            started = time.perf_counter()
            if step["via"] == "http":
                figures = asyncio.run(_http_closed_loop(
                    http_port, f"/{key}", x.tobytes(), concurrency,
                    float(step["duration"]), float(step["warmup"]),
                ))  # fmt: skip
            else:

                async def via_handle(
                    handle=handle, x=x, step=step, concurrency=concurrency
                ) -> dict:
                    return await _handle_closed_loop(
                        handle, x, concurrency, float(step["duration"]), float(step["warmup"])
                    )

                figures = asyncio.run(via_handle())
            stats = handle.stats.remote().result()
            figures.update(step)
            figures["mean batch (whole run)"] = stats["mean_batch"]
            figures["replica torch threads"] = f"{stats['threads_before']}->{stats['threads']}"
            figures["wall s"] = time.perf_counter() - started
            print(json.dumps(figures), file=sys.stderr, flush=True)
            results.append(figures)
            serve.delete(key)
    finally:
        serve.shutdown()
        ray.shutdown()
    return {"results": results, "session_dir": session_dir, "addresses": scan_logs(session_dir)}


def scan_logs(session_dir: str) -> dict[str, object]:
    """Every IPv4 address in Ray's session logs other than loopback and 0.0.0.0."""
    pattern = re.compile(rb"(?<![\d.])(\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3})(?![\d.])")
    found: dict[str, str] = {}
    files = 0
    for path in Path(session_dir).rglob("*"):
        if not path.is_file() or path.stat().st_size > 50_000_000:
            continue
        files += 1
        for line in path.read_bytes().splitlines():
            for match in pattern.finditer(line):
                address = match.group(1).decode()
                if address in ("127.0.0.1", "0.0.0.0") or address in found:
                    continue
                if all(int(part) <= 255 for part in address.split(".")):
                    found[address] = f"{path.name}: {line[:200].decode(errors='replace')}"
    return {"files_scanned": files, "other_addresses": found}


# --- project side --------------------------------------------------------------------------


def ensure_ray_venv() -> Path:
    python = RAY_VENV / "bin" / "python"
    probe = [str(python), "-c", "import ray, ray.serve, torch, numpy; print(ray.__version__)"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    print(f"creating {RAY_VENV} (ray[serve], torch==2.13.0, numpy) ...", flush=True)
    subprocess.run([sys.executable.replace(sys.prefix, sys.base_prefix), "-m", "venv",
                    str(RAY_VENV)], check=True)  # fmt: skip
    subprocess.run([str(python), "-m", "pip", "install", "-q", "ray[serve]", "torch==2.13.0",
                    "numpy"], check=True)  # fmt: skip
    return python


def run_ours(plan: list[dict[str, object]]) -> list[dict[str, object]]:
    import numpy as np

    from benchmarks.batching import batch_counters, start_server, write_pipelines
    from engine.tools.bench import BenchSpec, run_bench

    paths = [p for p in write_pipelines(MODELS_DIR, max_batch=32) if "nobatch" not in p.name]
    process, port = start_server(paths, MODELS_DIR / "server-ray-compare.log")
    rows = []
    try:
        for step in plan:
            key = str(step["model"])
            spec = MODELS[key]
            x = np.random.default_rng(1).random((1, *spec["shape"]), dtype=np.float32)
            load = BenchSpec(
                "127.0.0.1", port, key, [{spec["input"]: x}],
                concurrency=int(step["concurrency"]), duration_s=float(step["duration"]),
                warmup_s=float(step["warmup"]), timeout_ms=60_000,
            )  # fmt: skip
            b0, i0 = batch_counters(port, key)
            result = asyncio.run(run_bench(load))
            b1, i1 = batch_counters(port, key)
            row = {
                **step, "requests": result.ok, "items/s": result.throughput_items_s,
                "p50 ms": result.latency_ms(50), "p95 ms": result.latency_ms(95),
                "p99 ms": result.latency_ms(99), "errors": dict(result.errors),
                "error_examples": result.error_examples,
                "mean batch (whole run)": (i1 - i0) / (b1 - b0) if b1 > b0 else math.nan,
            }  # fmt: skip
            print(json.dumps(row, default=str), flush=True)
            rows.append(row)
    finally:
        process.terminate()
        process.wait(timeout=30)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip-ours", action="store_true")
    parser.add_argument("--skip-handle", action="store_true")
    parser.add_argument("--skip-default-wait", action="store_true")
    parser.add_argument("--http-port", type=int, default=18123)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--_ray-driver", dest="ray_driver", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ray_driver:
        plan = json.loads(args.ray_driver.read_text())
        print(json.dumps(ray_driver(plan, MODELS_DIR, args.http_port)))
        return 0

    heavy = (2.0, 4.0) if args.quick else (5.0, 20.0)
    light = (1.0, 3.0) if args.quick else (3.0, 12.0)
    idle = (0.5, 2.0) if args.quick else (2.0, 8.0)

    def step(model: str, c: int, wd: tuple[float, float], **extra: object) -> dict[str, object]:
        return {"model": model, "concurrency": c, "warmup": wd[0], "duration": wd[1], **extra}

    base = [step("heavy", 64, heavy), step("light", 64, light), step("heavy", 1, idle),
            step("light", 1, idle)]  # fmt: skip
    ray_plan = [{**s, "via": "http", "wait_s": 0.0} for s in base]
    if not args.skip_default_wait:
        ray_plan += [{**s, "via": "http", "wait_s": 0.01} for s in base if s["concurrency"] > 1]
    if not args.skip_handle:
        ray_plan += [{**s, "via": "handle", "wait_s": 0.0} for s in base if s["concurrency"] > 1]

    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "benchmarks.batching", "--_export", str(MODELS_DIR)],
                   cwd=ROOT, check=True)  # fmt: skip
    ours = [] if args.skip_ours else run_ours(base)

    python = ensure_ray_venv()
    plan_file = MODELS_DIR / "ray_plan.json"
    plan_file.write_text(json.dumps(ray_plan))
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONPATH": str(ROOT)}
    print("Ray Serve ...", flush=True)
    proc = subprocess.run(
        [str(python), "-m", "benchmarks.ray_serve", "--_ray-driver", str(plan_file),
         "--http-port", str(args.http_port)],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )  # fmt: skip
    ray_log = MODELS_DIR / "ray_driver.log"
    ray_log.write_text(proc.stderr)
    if proc.returncode != 0:
        print(f"the Ray driver failed ({proc.returncode}); its stderr is in {ray_log}:")
        print(proc.stderr[-4000:])
        return 1
    ray = json.loads(proc.stdout.strip().splitlines()[-1])

    from engine.tools.bench import render_table

    def cells(row: dict[str, object], who: str) -> dict[str, object]:
        return {
            "server": who, "model": row["model"], "concurrency": row["concurrency"],
            "items/s": row["items/s"], "p50 ms": row["p50 ms"], "p99 ms": row["p99 ms"],
            "mean batch": row.get("mean batch (whole run)", math.nan),
            "errors": sum(row["errors"].values()) if row["errors"] else 0,  # type: ignore[union-attr]
        }  # fmt: skip

    rows = [cells(r, "dagserve (Thrift)") for r in ours]
    for r in ray["results"]:
        via = "HTTP" if r["via"] == "http" else "handle"
        rows.append(cells(r, f"Ray Serve {via}, wait {r['wait_s']}"))
    print("\n### dagserve against Ray Serve (@serve.batch, max_batch_size 32)\n")
    print(render_table(rows))
    ratios = []
    for o in ours:
        for r in ray["results"]:
            if r["model"] == o["model"] and r["concurrency"] == o["concurrency"]:
                ratios.append({
                    "model": o["model"], "concurrency": o["concurrency"],
                    "Ray": f"{r['via']}, wait {r['wait_s']}",
                    "items/s ours / Ray": o["items/s"] / r["items/s"] if r["items/s"] else math.nan,  # type: ignore[operator]
                    "p99 ours / Ray": o["p99 ms"] / r["p99 ms"] if r["p99 ms"] else math.nan,  # type: ignore[operator]
                })  # fmt: skip
    print("\n### Ratios\n")
    print(render_table(ratios))
    print(f"\nRay replica torch threads: {[r['replica torch threads'] for r in ray['results']]}")
    print(
        f"Ray logs: {ray['session_dir']}: {ray['addresses']['files_scanned']} files, "
        f"addresses other than 127.0.0.1/0.0.0.0: "
        f"{json.dumps(ray['addresses']['other_addresses'], indent=1) or 'none'}"
    )
    for r in ours + ray["results"]:
        for kind, message in (r.get("error_examples") or {}).items():  # type: ignore[union-attr]
            print(f"  {r['model']} c{r['concurrency']} {r.get('via', 'ours')}: {kind}: {message}")
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"ours": ours, "ray": ray}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
