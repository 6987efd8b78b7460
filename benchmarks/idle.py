"""Idle latency at batch 1: a served model against its own speed and the bare round trip.

    .venv/bin/python -m benchmarks.idle [--quick] [--rounds N] [--calls N] [--gap-ms MS]
        [--models NAME ...]

Issue 15's target: served p50 <= 1.1 x offline p50 + the bare round trip p50 of the same
payload + 1 ms, one client sending one item at a time.  Four models, built from code with fixed
seeds into a temporary folder:

- **cnn**: the TorchScript CNN of ``benchmarks.worker_speed`` (four 3x3 conv layers on
  3x224x224, 602 KB a request), built-in ``torchscript`` plugin;
- **matvec**: a 4096x4096 float32 matrix times the item (numpy, one BLAS thread in both places:
  the plugin sets numpy's BLAS pool to 1 before each product), :class:`MatVec`;
- **tf**: a small Keras model (two 3x3 convs, global pooling, a dense layer; 3x64x64
  channels-last input) exported as a SavedModel, built-in ``tensorflow`` plugin;
- **paddle**: the same shape of model in Paddle (3x64x64 channels-first), ``paddle.jit.save``,
  built-in ``paddle`` plugin.

Three things are measured per model, side by side in one run:

- **offline**: the same plugin class, loaded and called on a thread of a fresh process (one
  process per framework: TensorFlow then Paddle in one process crashes), the framework's default
  threads, glibc's malloc set as a worker's (``malloc_environment``, as ``worker_speed`` does,
  so that the offline figure is at its best); the time of ``predict`` alone;
- **bare round trip**: thriftpy2's stock asyncio server on our IDL answering the request's
  tensors as they came (``benchmarks.rpc_overhead``'s echo), the same client, the same payload
  (the echo sends the payload back, so for a model whose answer is small it is an upper bound of
  what the transport explains);
- **served**: ``dagserve serve`` with one one-node pipeline per model (all four in one server,
  each framework in its own worker), no batching.

Every call is followed by the same fixed gap (``--gap-ms``, 2 ms): the client waits it between a
reply and its next request, the offline thread between one call and the next.  The client is
``engine.transport.client.Client`` (synchronous, one pooled connection), timed with
``perf_counter`` around ``infer``.  Blocks of ``--calls`` calls alternate offline, served, bare
(the order turning each round) for ``--rounds`` rounds or until the measuring budget is spent,
so that the noise of the shared machine weighs on all three alike.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from benchmarks._serving import serve_on_one_thread
from model_plugins import LoadContext, ModelPlugin, TensorSpec

#: the target: served p50 <= FACTOR x offline p50 + bare round trip p50 + SLACK_MS
FACTOR = 1.1
SLACK_MS = 1.0


class MatVec(ModelPlugin):
    """A 4096x4096 float32 matrix (fixed seed) times each item, on one BLAS thread."""

    inputs: ClassVar = {"x": TensorSpec("float32", [4096])}
    outputs: ClassVar = {"y": TensorSpec("float32", [4096])}

    def load(self, context: LoadContext) -> None:
        from threadpoolctl import ThreadpoolController

        self.w = np.random.default_rng(0).random((4096, 4096), dtype=np.float32)
        # one thread in the worker and offline alike; set before each product, since the
        # worker sets its own share of threads before a call when its count changes
        self.blas = ThreadpoolController().select(user_api="blas").lib_controllers

    def predict(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for pool in self.blas:
            if pool.num_threads != 1:
                pool.set_num_threads(1)
        return {"y": batch["x"] @ self.w.T}


@dataclass(frozen=True)
class Model:
    """One model of the scenario: how it is built, served and fed."""

    name: str
    framework: str  # its offline process (and its server worker)
    plugin: str
    shape: tuple[int, ...]
    #: the node's YAML, its keys indented by 4 spaces (``plugin`` and ``inputs`` apart)
    node: str = ""
    outputs: dict[str, str] = field(default_factory=lambda: {"y": "y"})
    #: model path relative to the folder, or None
    path: str | None = None
    params: dict[str, Any] = field(default_factory=dict)


MODELS: dict[str, Model] = {
    "cnn": Model(
        "cnn", "torch", "torchscript", (3, 224, 224),
        node="    model: cnn.pt\n    params: {input_names: [x], output_names: [y]}\n"
             "    outputs: {y: {dtype: float32, shape: [10]}}\n",
        path="cnn.pt", params={"input_names": ["x"], "output_names": ["y"]},
    ),
    "matvec": Model("matvec", "numpy", "benchmarks.idle:MatVec", (4096,)),
    "tf": Model(
        "tf", "tensorflow", "tensorflow", (64, 64, 3),
        node="    model: tf_model\n    params: {output_map: {y: output_0}}\n",
        path="tf_model", params={"output_map": {"y": "output_0"}},
    ),
    "paddle": Model(
        "paddle", "paddle", "paddle", (3, 64, 64),
        node="    model: paddle_model/inference\n    params: {output_names: [y]}\n",
        path="paddle_model/inference", params={"output_names": ["y"]},
    ),
}  # fmt: skip


# --- building the models (each in its framework's offline process) -------------------------


def build_tf(path: Path) -> None:
    """Conv 3x3/2 (16) - ReLU - conv 3x3/2 (32) - ReLU - global mean - dense 10, Keras export."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    keras.utils.set_random_seed(0)
    x = keras.Input(shape=MODELS["tf"].shape, name="x", dtype="float32")
    h = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(x)
    h = keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    y = keras.layers.Dense(10)(h)
    keras.Model(x, y).export(str(path), format="tf_saved_model", verbose=False)


def build_paddle(prefix: Path) -> None:
    """The same layers as :func:`build_tf`, channels-first, ``paddle.jit.save``."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "No ccache found")
        import paddle

    class Net(paddle.nn.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = paddle.nn.Conv2D(3, 16, 3, stride=2, padding=1)
            self.conv2 = paddle.nn.Conv2D(16, 32, 3, stride=2, padding=1)
            self.dense = paddle.nn.Linear(32, 10)

        def forward(self, x: Any) -> Any:
            h = paddle.nn.functional.relu(self.conv1(x))
            h = paddle.nn.functional.relu(self.conv2(h))
            return self.dense(h.mean(axis=[2, 3]))

    paddle.seed(0)
    net = Net()
    net.eval()
    spec = paddle.static.InputSpec([None, *MODELS["paddle"].shape], "float32", name="x")
    paddle.jit.save(net, str(prefix), input_spec=[spec])


def build(framework: str, folder: Path) -> None:
    """Write the models of ``framework`` into ``folder``."""
    if framework == "torch":
        from benchmarks.worker_speed import build_cnn

        build_cnn(folder / "cnn.pt")
    elif framework == "tensorflow":
        build_tf(folder / "tf_model")
    elif framework == "paddle":
        (folder / "paddle_model").mkdir(exist_ok=True)
        build_paddle(folder / "paddle_model" / "inference")


# --- offline: one fresh process per framework, the model called on a thread ----------------


def load_plugin(model: Model, folder: Path) -> ModelPlugin:
    """The model's plugin class, loaded as a worker loads it (same params, same files)."""
    from model_plugins.registry import resolve

    plugin = resolve(model.plugin)()
    plugin.load(LoadContext(
        node="model", plugin=model.plugin, params=model.params, pipeline_dir=folder,
        model_path=folder / model.path if model.path else None,
    ))  # fmt: skip
    return plugin


def _offline_main(conn: Connection, framework: str, folder: str) -> None:
    os.dup2(2, 1)  # Keras and Paddle print to stdout: keep the scenario's tables clean
    build(framework, Path(folder))
    conn.send("built")
    models = [m for m in MODELS.values() if m.framework == framework]

    def load() -> dict[str, Any]:
        return {m.name: load_plugin(m, Path(folder)) for m in models}

    def run(plugins: dict[str, Any], command: Any) -> list[float]:
        name, x, calls, gap = command
        plugin = plugins[name]
        seconds = []
        for _ in range(calls):
            start = time.perf_counter()
            plugin.predict({"x": x})
            seconds.append(time.perf_counter() - start)
            time.sleep(gap)
        return seconds

    serve_on_one_thread(conn, load, run)


class Offline:
    """A framework's offline process: builds its models, loads them, times calls."""

    def __init__(self, framework: str, folder: Path) -> None:
        from model_plugins._host.threads import malloc_environment

        context = multiprocessing.get_context("spawn")
        self.framework = framework
        self.conn, child = context.Pipe()
        self.process = context.Process(
            target=_offline_main, args=(child, framework, str(folder)), daemon=True
        )
        env = {**malloc_environment(), "TF_CPP_MIN_LOG_LEVEL": "2"}
        saved = {var: os.environ.get(var) for var in env}
        os.environ.update(env)  # the child copies os.environ when it starts
        try:
            self.process.start()
        finally:
            for var, value in saved.items():
                if value is None:
                    os.environ.pop(var, None)
                else:
                    os.environ[var] = value

    def expect(self, what: str, timeout_s: float = 300.0) -> None:
        """Wait for the child's ``what`` message (``built``, ``loaded``)."""
        if not self.conn.poll(timeout_s):
            msg = f"the {self.framework} offline process did not report {what!r} in {timeout_s} s"
            raise RuntimeError(msg)
        try:
            got = self.conn.recv()
        except EOFError as exc:
            msg = f"the {self.framework} offline process died (exit {self.process.exitcode})"
            raise RuntimeError(msg) from exc
        if got != what:
            msg = f"the {self.framework} offline process said {got!r}, expected {what!r}"
            raise RuntimeError(msg)

    def run(self, name: str, x: np.ndarray, calls: int, gap: float) -> list[float]:
        self.conn.send((name, x, calls, gap))
        seconds: list[float] = self.conn.recv()
        return seconds

    def close(self) -> None:
        with contextlib.suppress(OSError, BrokenPipeError):
            self.conn.send(None)
        self.process.join(30)
        if self.process.is_alive():
            self.process.kill()


# --- served and bare: the same client, one item at a time ----------------------------------


def write_pipelines(folder: Path, models: Sequence[Model]) -> list[Path]:
    """One one-node pipeline per model, ``idle_<name>``, input ``x``, output ``y``."""
    paths = []
    for model in models:
        path = folder / f"idle_{model.name}.yaml"
        path.write_text(
            f"name: idle_{model.name}\n"
            f"inputs:\n  x: {{dtype: float32, shape: {list(model.shape)}}}\n"
            f"nodes:\n  model:\n    plugin: {model.plugin}\n{model.node}"
            "    inputs: {x: $inputs.x}\n"
            "outputs:\n  y: model.y\n",
            encoding="utf-8",
        )
        paths.append(path)
    return paths


def client_block(client: Any, pipeline: str, x: np.ndarray, calls: int, gap: float) -> list[float]:
    """``calls`` sequential requests, ``gap`` s between a reply and the next request."""
    seconds = []
    for _ in range(calls):
        start = time.perf_counter()
        client.infer(pipeline, {"x": x})
        seconds.append(time.perf_counter() - start)
        time.sleep(gap)
    return seconds


def target_ms(offline_ms: float, bare_ms: float) -> float:
    """Issue 15's bound on the served p50: 1.1 x offline + the bare round trip + 1 ms."""
    return FACTOR * offline_ms + bare_ms + SLACK_MS


def table_row(
    name: str, kb: float, times: dict[str, list[float]], served_rounds: Sequence[float] = ()
) -> dict[str, object]:
    """One model's row from its calls' seconds (``offline``, ``bare``, ``served``) and the
    served p50 of each round (ms): how steady it was."""
    p50 = {kind: statistics.median(s) * 1000 if s else float("nan") for kind, s in times.items()}
    bound = target_ms(p50["offline"], p50["bare"])
    spread = f"{min(served_rounds):.1f}-{max(served_rounds):.1f}" if served_rounds else "-"
    return {
        "model": name,
        "payload KB": kb,
        "offline p50 ms": p50["offline"],
        "bare round trip p50 ms": p50["bare"],
        "served p50 ms": p50["served"],
        "target ms": bound,
        "met?": "yes" if p50["served"] <= bound else "NO",
        "served - offline ms": p50["served"] - p50["offline"],
        "served p50 by round ms": spread,
        "calls each": min(len(s) for s in times.values()),
    }


def reading(rows: Sequence[dict[str, object]]) -> str:
    parts = [
        f"{r['model']} {r['served p50 ms']:.2f} ms against {r['target ms']:.2f} "
        f"({'met' if r['met?'] == 'yes' else 'NOT met'})"
        for r in rows
    ]
    return (
        "served p50 at batch 1, idle, against 1.1 x offline + bare round trip + 1 ms: "
        + "; ".join(parts)
    )


@contextlib.contextmanager
def offline_processes(frameworks: Sequence[str], folder: Path) -> Iterator[dict[str, Offline]]:
    started = {framework: Offline(framework, folder) for framework in frameworks}
    try:
        yield started
    finally:
        for offline in started.values():
            offline.close()


def measure(args: argparse.Namespace, models: Sequence[Model]) -> list[dict[str, object]]:
    from benchmarks._serving import HOST, dagserve_command, serving
    from engine.tools.ports import free_port
    from engine.transport.client import Client

    gap = args.gap_ms / 1000
    frameworks = list(dict.fromkeys(m.framework for m in models))
    with (
        tempfile.TemporaryDirectory(prefix="idle-") as tmp,
        offline_processes(frameworks, Path(tmp)) as offline,
        contextlib.ExitStack() as stack,
    ):
        folder = Path(tmp)
        for process in offline.values():
            process.expect("built")
        print("models built; starting the servers ...", file=sys.stderr, flush=True)
        served_port, bare_port = free_port(), free_port()
        paths = write_pipelines(folder, models)
        stack.enter_context(serving(dagserve_command(paths, served_port), served_port))
        bare = [sys.executable, "-m", "benchmarks.rpc_overhead", "--_bare", "thriftpy2-stock",
                str(bare_port)]  # fmt: skip
        stack.enter_context(serving(bare, bare_port))
        for process in offline.values():
            process.expect("loaded")
        clients = {
            "served": stack.enter_context(Client(HOST, served_port, timeout_s=60)),
            "bare": stack.enter_context(Client(HOST, bare_port, timeout_s=60)),
        }
        rng = np.random.default_rng(1)
        inputs = {m.name: rng.random((1, *m.shape), dtype=np.float32) for m in models}

        def block(kind: str, model: Model, calls: int) -> list[float]:
            x = inputs[model.name]
            if kind == "offline":
                return offline[model.framework].run(model.name, x, calls, gap)
            return client_block(clients[kind], f"idle_{model.name}", x, calls, gap)

        kinds = ("offline", "served", "bare")
        for model in models:  # warm every path (TorchScript profiles its first calls)
            for kind in kinds:
                block(kind, model, 3)
        times: dict[str, dict[str, list[float]]] = {
            m.name: {kind: [] for kind in kinds} for m in models
        }
        rounds: dict[str, list[float]] = {m.name: [] for m in models}
        deadline = time.monotonic() + args.budget
        for i in range(args.rounds):
            if i >= 2 and time.monotonic() > deadline:
                print(f"measuring budget spent after {i} rounds", file=sys.stderr, flush=True)
                break
            order = kinds[i % 3 :] + kinds[: i % 3]
            for model in models:
                for kind in order:
                    got = block(kind, model, args.calls)
                    times[model.name][kind] += got
                    if kind == "served":
                        rounds[model.name].append(statistics.median(got) * 1000)
    return [
        table_row(m.name, inputs[m.name].nbytes / 1000, times[m.name], rounds[m.name])
        for m in models
    ]


def _parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (~40 s in all)")
    parser.add_argument("--rounds", type=int, help="rounds of (offline, served, bare) blocks")
    parser.add_argument("--calls", type=int, help="calls per block")
    parser.add_argument("--budget", type=float, help="seconds of measuring at most")
    parser.add_argument("--gap-ms", type=float, default=2.0, help="pause after each call")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (4 if args.quick else 30)
    args.calls = args.calls or (8 if args.quick else 15)
    args.budget = args.budget or (10.0 if args.quick else 70.0)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    started = time.perf_counter()
    rows = measure(args, [MODELS[name] for name in args.models])
    from engine.tools.bench import render_table

    print(
        f"### Idle, batch 1: served against offline and the bare round trip "
        f"({args.gap_ms:g} ms between calls)\n"
    )
    print(render_table(rows))
    print(f"\ntarget: served p50 <= {FACTOR} x offline p50 + bare round trip p50 + "
          f"{SLACK_MS:g} ms; {time.perf_counter() - started:.0f} s in all")  # fmt: skip
    print(f"\nReading: {reading(rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
