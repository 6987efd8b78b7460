"""Ray Serve ``@serve.batch`` against dagserve, on the same two models, twice in one run.

    .venv/bin/python -m benchmarks.ray_serve [--quick] [--skip-ours] [--skip-handle]

The models are those of ``benchmarks.batching`` (TorchScript ResNet-18 "heavy", MLP
512-1024-1024-10 "light", fixed seeds). For each model and concurrency (64: throughput;
1: idle latency) the same closed loop runs against

- dagserve: ``dagserve serve`` in a subprocess (``max_batch_size: 32, max_delay_ms: 0``),
  called over Thrift with the closed loop of ``engine.tools.bench``;
- Ray Serve, HTTP: one replica, ``@serve.batch(max_batch_size=32, batch_wait_timeout_s=0)``
  (matched to ``max_delay_ms: 0``), ``max_ongoing_requests`` >= the concurrency, called over
  HTTP/1.1 keep-alive on 127.0.0.1 (one connection per task, raw float32 body): the fair
  comparison with our RPC;
- Ray Serve, HTTP, Ray's default ``batch_wait_timeout_s=0.01`` (concurrency 64 only);
- Ray Serve through a ``DeploymentHandle`` from the driver: Ray's best case (no HTTP proxy).

The comparison runs twice (issue 15), both servers up from start to end and loaded in turn:
round 1 dagserve then Ray, round 2 Ray then dagserve (a drift of the shared machine then weighs
on both alike).  Round 1 runs every Ray variant above; round 2 (and ``--quick``) the fair one
(HTTP, wait 0).  Steps of one model and batch wait share one Ray deployment, whose
``max_ongoing_requests`` is their largest concurrency.

Ray runs from its own venv, ``benchmarks/.ray-venv``, which ``make bench`` installs beforehand
(``make ray-venv``: the pinned versions of :data:`RAY_REQUIREMENTS`); this scenario never
installs anything, it checks that Ray imports there and stops if not.  Ray is kept on 127.0.0.1
(``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, ``ray.init(_node_ip_address="127.0.0.1")``), and
stopped with ``serve.shutdown()`` / ``ray.shutdown()`` by the driver that started it (never
``ray stop``). Its logs are then searched for any IPv4 address other than 127.0.0.1/0.0.0.0.

This file runs in two interpreters: the project's (dagserve side, orchestration) and the Ray
venv's (``--_ray-driver``: one Ray session for both rounds, a plan per line on its stdin, a
``RESULT`` line per plan on its stdout); the Ray side imports nothing from the project.
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
#: what the Makefile's ray-venv target installs there (keep the two alike)
RAY_REQUIREMENTS = ("ray[serve]==2.60.0", "torch==2.13.0", "numpy==2.4.6")
#: the driver's answer to a plan: this prefix, then JSON
RESULT = "RESULT "
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


def ray_driver(models_dir: Path, http_port: int) -> dict:
    """Runs in the Ray venv: one Ray session; for each plan (a JSON line on stdin) deploy each
    configuration, load it and answer the figures (a ``RESULT`` line on stdout); at the end of
    stdin shut Ray down and return where its logs are and what addresses they name."""
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

    def run_plan(plan: list[dict[str, object]]) -> list[dict[str, object]]:
        """Each step's figures; consecutive steps of one (model, wait) share a deployment,
        ``max_ongoing_requests`` their largest concurrency (a deployment takes ~8 s here)."""
        results = []
        deployed: tuple[str, float] | None = None
        for i, step in enumerate(plan):
            key = str(step["model"])
            spec = MODELS[key]
            concurrency = int(step["concurrency"])
            same = (key, float(step["wait_s"]))
            if deployed != same:
                if deployed is not None:
                    serve.delete(deployed[0])
                group = [s for s in plan[i:] if (s["model"], float(s["wait_s"])) == same]
                app = Model.options(
                    max_ongoing_requests=max(int(s["concurrency"]) for s in group)
                ).bind(str(models_dir / spec["file"]), spec["shape"], 32, same[1])
                handle = serve.run(app, name=key, route_prefix=f"/{key}", blocking=False)
                deployed = same
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
        if deployed is not None:
            serve.delete(deployed[0])
        return results

    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        for line in sys.stdin:
            results = run_plan(json.loads(line))
            print(RESULT + json.dumps(results), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return {"session_dir": session_dir, "addresses": scan_logs(session_dir)}


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


def ray_python() -> Path:
    """The Ray venv's interpreter, once Ray Serve, torch and numpy import there (never installs)."""
    python = RAY_VENV / "bin" / "python"
    probe = [str(python), "-c", "import ray, ray.serve, torch, numpy; print(ray.__version__)"]
    done = (
        subprocess.run(probe, capture_output=True, text=True, timeout=300)
        if python.exists()
        else None
    )
    if done is None or done.returncode != 0:
        why = "it does not exist" if done is None else done.stderr.strip()[-500:]
        msg = (
            f"Ray Serve is not importable from {RAY_VENV} ({why}): install it with "
            f"`make ray-venv` ({', '.join(RAY_REQUIREMENTS)}; `make bench` does it first)"
        )
        raise SystemExit(msg)
    return python


class RayDriver:
    """The Ray venv's driver process: one Ray session, a plan at a time."""

    def __init__(self, python: Path, http_port: int, log: Path) -> None:
        env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONPATH": str(ROOT)}
        self.log = log
        self._sink = log.open("w")
        self.process = subprocess.Popen(
            [str(python), "-m", "benchmarks.ray_serve", "--_ray-driver",
             "--http-port", str(http_port)],
            cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._sink, text=True,
        )  # fmt: skip

    def run(self, plan: list[dict[str, object]]) -> list[dict[str, object]]:
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.process.stdin.write(json.dumps(plan) + "\n")
        self.process.stdin.flush()
        for line in self.process.stdout:
            if line.startswith(RESULT):
                results: list[dict[str, object]] = json.loads(line[len(RESULT) :])
                return results
        msg = f"the Ray driver ended ({self.process.wait()}) mid-plan; its stderr: {self.log}"
        raise RuntimeError(msg)

    def close(self) -> dict[str, object]:
        """End the session (Ray shuts down): where its logs are and what they name."""
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.process.stdin.close()
        out = self.process.stdout.read()
        self.process.wait(120)
        self._sink.close()
        lines = out.strip().splitlines()
        last: dict[str, object] = json.loads(lines[-1]) if lines else {}
        return last

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._sink.close()


def run_ours(port: int, plan: list[dict[str, object]]) -> list[dict[str, object]]:
    import numpy as np

    from benchmarks.batching import batch_counters
    from engine.tools.bench import BenchSpec, run_bench

    rows = []
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
        print(json.dumps(row, default=str), file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def cells(row: dict[str, object], who: str, round_: int) -> dict[str, object]:
    errors = row["errors"]
    return {
        "round": round_, "server": who, "model": row["model"],
        "concurrency": row["concurrency"], "items/s": row["items/s"], "p50 ms": row["p50 ms"],
        "p99 ms": row["p99 ms"], "mean batch": row.get("mean batch (whole run)", math.nan),
        "errors": sum(errors.values()) if isinstance(errors, dict) else 0,
    }  # fmt: skip


def ratio_rows(
    ours: list[dict[str, object]], ray: list[dict[str, object]], round_: int
) -> list[dict[str, object]]:
    """dagserve over each Ray variant at the same model and concurrency, in one round."""
    rows = []
    for o in ours:
        for r in ray:
            if r["model"] != o["model"] or r["concurrency"] != o["concurrency"]:
                continue
            ours_tput, ray_tput = float(o["items/s"]), float(r["items/s"])  # type: ignore[arg-type]
            ours_p99, ray_p99 = float(o["p99 ms"]), float(r["p99 ms"])  # type: ignore[arg-type]
            rows.append({
                "round": round_, "model": o["model"], "concurrency": o["concurrency"],
                "Ray": f"{r['via']}, wait {r['wait_s']}",
                "items/s ours / Ray": ours_tput / ray_tput if ray_tput else math.nan,
                "p99 ours / Ray": ours_p99 / ray_p99 if ray_p99 else math.nan,
            })  # fmt: skip
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip-ours", action="store_true")
    parser.add_argument("--skip-handle", action="store_true")
    parser.add_argument("--skip-default-wait", action="store_true")
    parser.add_argument("--http-port", type=int, default=18123)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--_ray-driver", dest="ray_driver", action="store_true",
                        help=argparse.SUPPRESS)  # fmt: skip
    args = parser.parse_args()
    if args.ray_driver:
        print(json.dumps(ray_driver(MODELS_DIR, args.http_port)))
        return 0

    heavy = (1.0, 3.0) if args.quick else (3.0, 10.0)
    light = (0.5, 2.0) if args.quick else (2.0, 6.0)
    idle = (0.5, 1.5) if args.quick else (1.0, 4.0)

    def step(model: str, c: int, wd: tuple[float, float], **extra: object) -> dict[str, object]:
        return {"model": model, "concurrency": c, "warmup": wd[0], "duration": wd[1], **extra}

    base = [step("heavy", 64, heavy), step("heavy", 1, idle), step("light", 64, light),
            step("light", 1, idle)]  # fmt: skip
    # Ray's steps in deployment order (one deployment per model and wait); round 2 and
    # --quick run the fair comparison alone
    fair = [{**s, "via": "http", "wait_s": 0.0} for s in base]
    full = []
    for model in MODELS:
        full += [s for s in fair if s["model"] == model]
        if not args.skip_handle:
            full += [{**s, "via": "handle", "wait_s": 0.0} for s in base
                     if s["model"] == model and s["concurrency"] > 1]  # fmt: skip
    if not args.skip_default_wait:
        full += [{**s, "via": "http", "wait_s": 0.01} for s in base if s["concurrency"] > 1]
    if args.quick:
        full = fair

    from benchmarks.batching import start_server, write_pipelines
    from engine.tools.bench import render_table

    started = time.perf_counter()
    python = ray_python()
    subprocess.run([sys.executable, "-m", "benchmarks.batching", "--_export", str(MODELS_DIR)],
                   cwd=ROOT, check=True)  # fmt: skip
    paths = [p for p in write_pipelines(MODELS_DIR, max_batch=32) if "nobatch" not in p.name]
    ours: dict[int, list[dict[str, object]]] = {}
    ray: dict[int, list[dict[str, object]]] = {}
    process = port = None
    if not args.skip_ours:
        print("dagserve ...", file=sys.stderr, flush=True)
        process, port = start_server(paths, MODELS_DIR / "server-ray-compare.log")
    print("Ray Serve ...", file=sys.stderr, flush=True)
    driver = RayDriver(python, args.http_port, MODELS_DIR / "ray_driver.log")
    try:
        # round 1: dagserve, then Ray (every variant); round 2: Ray (the fair one), dagserve
        for round_, order in ((1, ("ours", "ray")), (2, ("ray", "ours"))):
            for who in order:
                print(f"round {round_}: {who} ...", file=sys.stderr, flush=True)
                if who == "ours" and port is not None:
                    ours[round_] = run_ours(port, base)
                elif who == "ray":
                    ray[round_] = driver.run(full if round_ == 1 else fair)
        addresses = driver.close()
    except BaseException:
        driver.kill()
        raise
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=30)

    rows, ratios = [], []
    for round_ in (1, 2):
        rows += [cells(r, "dagserve (Thrift)", round_) for r in ours.get(round_, [])]
        for r in ray[round_]:
            via = "HTTP" if r["via"] == "http" else "handle"
            rows.append(cells(r, f"Ray Serve {via}, wait {r['wait_s']}", round_))
        ratios += ratio_rows(ours.get(round_, []), ray[round_], round_)
    print("### dagserve against Ray Serve (@serve.batch, max_batch_size 32), two rounds\n")
    print(render_table(rows))
    print("\n### Ratios, per round\n")
    print(render_table(ratios))
    replica = [r["replica torch threads"] for round_ in (1, 2) for r in ray[round_]]
    print(f"\nRay replica torch threads: {replica}")
    found = addresses.get("addresses") or {}
    print(
        f"Ray logs: {addresses.get('session_dir')}: {found.get('files_scanned')} files, "  # type: ignore[union-attr]
        f"addresses other than 127.0.0.1/0.0.0.0: "
        f"{json.dumps(found.get('other_addresses'), indent=1) or 'none'}"  # type: ignore[union-attr]
    )
    for r in [row for rows_ in (*ours.values(), *ray.values()) for row in rows_]:
        for kind, message in (r.get("error_examples") or {}).items():  # type: ignore[attr-defined]
            print(f"  {r['model']} c{r['concurrency']} {r.get('via', 'ours')}: {kind}: {message}")
    print(f"total {time.perf_counter() - started:.0f} s")
    fair_ratios = [
        f"round {r['round']} {r['model']} x{r['concurrency']} {r['items/s ours / Ray']:.2f}"
        for r in ratios
        if r["Ray"] == "http, wait 0.0"
    ]
    print(
        "\nReading: dagserve items/s / Ray Serve's (HTTP, batch wait 0), two rounds: "
        + ("; ".join(fair_ratios) or "no dagserve rows (--skip-ours)")
    )
    if args.json:
        args.json.write_text(
            json.dumps({"ours": ours, "ray": ray, "ray_logs": addresses}, indent=2, default=str)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
