"""What handing a tensor to a worker process and back costs, against calling in-process.

    .venv/bin/python -m benchmarks.worker_crossing [--repeat 20]

Measured in one run, side by side: the identity plugin called in-process, the same plugin in
a worker (the crossing: request and reply, tensors out of band over a Unix socket), two
memcpy of the tensor (the floor of a shared-memory design, which must copy into the segment
and out of it), and a ResNet-18 forward pass in a PyTorch worker at the same batch size, to
put the crossing in proportion.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable

import numpy as np

from engine.runtime.workers.pool import WorkerKey, WorkerPool
from engine.tools.bench import render_table
from model_plugins.builtins.identity import Identity
from model_plugins.plugin import LoadContext


async def median_ms(call: Callable[[], Awaitable[object]], repeat: int) -> float:
    """The median time of ``repeat`` awaits of ``call()``, in ms, after one to warm up."""
    await call()  # warm up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        await call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


async def main(repeat: int, resnet: bool) -> list[dict[str, object]]:
    pool = WorkerPool()
    numpy_key, torch_key = WorkerKey("numpy", "cpu"), WorkerKey("torch", "cpu")
    ctx = LoadContext(node="identity", plugin="identity")
    await pool.load(numpy_key, "bench/identity", "identity", (ctx,))
    if resnet:
        rctx = LoadContext(node="resnet", plugin="benchmarks.resnet18:ResNet18")
        await pool.load(torch_key, "bench/resnet", "benchmarks.resnet18:ResNet18", (rctx,))
    local = Identity()
    local.load(ctx)
    rows = []
    try:
        for batch in (1, 32):
            x = np.random.default_rng(0).random((batch, 3, 224, 224), dtype=np.float32)

            async def in_process(x: np.ndarray = x) -> object:
                return local.predict({"x": x})

            async def crossing(x: np.ndarray = x) -> object:
                return await pool.predict(
                    numpy_key, "bench/identity", {"x": x}, node="i", plugin="identity"
                )

            scratch = np.empty_like(x)

            async def two_copies(x: np.ndarray = x, scratch: np.ndarray = scratch) -> object:
                # The floor of a shared-memory design: copy in, copy the result out.
                np.copyto(scratch, x)
                np.copyto(scratch, x)
                return scratch

            async def forward(x: np.ndarray = x) -> object:
                return await pool.predict(
                    torch_key, "bench/resnet", {"pixels": x}, node="r", plugin="r"
                )

            row: dict[str, object] = {
                "batch": batch,
                "MB each way": x.nbytes / 1e6,
                "in-process ms": await median_ms(in_process, repeat),
                "worker round trip ms": await median_ms(crossing, repeat),
                "shm floor (2 memcpy) ms": await median_ms(two_copies, repeat),
            }
            if resnet:
                row["resnet18 in worker ms"] = await median_ms(forward, max(3, repeat // 4))
                row["crossing / forward"] = (
                    row["worker round trip ms"] / row["resnet18 in worker ms"]
                )  # type: ignore[operator]
            rows.append(row)
    finally:
        await pool.aclose()
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--no-resnet", action="store_true", help="skip the PyTorch forward pass")
    args = parser.parse_args()
    print(render_table(asyncio.run(main(args.repeat, not args.no_resnet))))
