"""The ``dagserve`` command line.

::

    dagserve serve CONFIG.yaml | PIPELINE.yaml...  [--host --port --metrics-port --admin-port]
                                                   [--watch [--watch-interval S]]
    dagserve admin --port N [--host H] [--token-file F] VERB ...   (engine/tools/admin_cli.py)
    dagserve models [--registry-uri URI] register|alias|list ...  (engine/tools/models_cli.py)
    dagserve validate PIPELINE.yaml...
    dagserve graph PIPELINE.yaml -o FILE.svg|png
    dagserve infer --pipeline NAME --input NAME=VALUE|@FILE ...  [--host --port]
    dagserve bench --pipeline NAME [--concurrency N | --rate R] [--duration S] [--samples F]
    dagserve new-plugin NAME [--dir DIR]
    dagserve stream --target HOST:PORT --pipeline NAME --source jsonl:PATH --sink jsonl:PATH
                    [--dead-letter jsonl:PATH] [--parallelism N] [--capacity N] [--ordered]
                    [--timeout-ms T]       (a PyFlink job, engine/stream; the flink extra)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dag.errors import PipelineError
from engine.config import ServerConfig, is_server_config, load_config
from engine.observability.logs import configure as configure_logging
from engine.runtime.loading import load_for_serving
from model_plugins.errors import DagserveError
from model_plugins.specs import TensorSpec, as_array


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dagserve", description="Serve DAG pipelines of models over Thrift."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="serve pipelines over Thrift")
    serve.add_argument("files", nargs="+", type=Path, metavar="CONFIG.yaml|PIPELINE.yaml")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="Thrift port (default 9090; 0 = any free port)")
    serve.add_argument("--metrics-port", type=int, help="Prometheus /metrics port")
    serve.add_argument("--admin-port", type=int, help="admin (lifecycle) port; 0 = any free")
    serve.add_argument(
        "--front-processes", type=_front_processes, metavar="N|auto",
        help="processes serving the port (default 1; auto = one per core, at most 8)",
    )  # fmt: skip
    serve.add_argument(
        "--watch", action="store_true", default=None,
        help="reload a pipeline version when its YAML or model files change",
    )  # fmt: skip
    serve.add_argument("--watch-interval", type=float, metavar="S", help="poll period (2 s)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--log-format", choices=["auto", "text", "json"])

    validate = commands.add_parser("validate", help="check pipeline files; exit 1 with every error")
    validate.add_argument("files", nargs="+", type=Path, metavar="PIPELINE.yaml")

    graph = commands.add_parser("graph", help="draw a pipeline's DAG as SVG or PNG")
    graph.add_argument("file", type=Path, metavar="PIPELINE.yaml")
    graph.add_argument("-o", "--output", type=Path, required=True, metavar="FILE.svg|png")

    infer = commands.add_parser("infer", help="call a pipeline on a running server (one item)")
    infer.add_argument("--pipeline", required=True)
    infer.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="NAME=VALUE|NAME=@FILE",
        help="VALUE is JSON (a number or a nested list) or text for string inputs; "
        "@FILE reads bytes for bytes inputs, text for string inputs, or a .npy array",
    )
    infer.add_argument("--version")
    infer.add_argument("--output", action="append", dest="outputs", metavar="NAME")
    infer.add_argument("--timeout-ms", type=int)
    infer.add_argument("--host", default="127.0.0.1")
    infer.add_argument("--port", type=int, default=9090)
    infer.add_argument("--json", action="store_true", help="print the whole answer as JSON")
    bench = commands.add_parser("bench", help="load a pipeline on a running server; latency table")
    bench.add_argument("--pipeline", required=True)
    bench.add_argument("--host", default="127.0.0.1")
    bench.add_argument("--port", type=int, default=9090)
    load = bench.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=int, default=8, help="closed loop (default 8)")
    load.add_argument("--rate", type=float, help="open loop: requests/s, Poisson arrivals")
    bench.add_argument("--max-inflight", type=int, default=1000, help="open-loop cap")
    bench.add_argument("--duration", type=float, default=10.0, help="seconds measured")
    bench.add_argument("--warmup", type=float, default=1.0, help="seconds not counted first")
    bench.add_argument(
        "--samples", type=Path, help=".npz (a row per request), .json (an object per "
        "request) or .jsonl (dagserve stream records); default: made up from the pipeline's "
        "declared inputs",
    )  # fmt: skip
    bench.add_argument("--skip-optional", action="store_true", help="leave optional inputs out")
    bench.add_argument("--timeout-ms", type=int)
    bench.add_argument("--json", type=Path, metavar="FILE", help="also write the result as JSON")

    _stream_parser(commands)

    # Its own parser (engine/tools/admin_cli.py) reads the rest of the line, --help included.
    admin = commands.add_parser(
        "admin", help="load, route, reload, unload pipeline versions", add_help=False
    )
    admin.add_argument("rest", nargs=argparse.REMAINDER)

    # Its own parser too (engine/tools/models_cli.py).
    models = commands.add_parser(
        "models", help="register models, move aliases, list versions (registry)", add_help=False
    )
    models.add_argument("rest", nargs=argparse.REMAINDER)

    scaffold = commands.add_parser("new-plugin", help="write a plugin skeleton with its test")
    scaffold.add_argument("name", help="a lower-case identifier, e.g. my_scorer")
    scaffold.add_argument("--dir", type=Path, default=Path.cwd(), help="where (default: here)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["admin"]:
        from engine.tools.admin_cli import main as admin_main

        return admin_main(argv[1:])
    if argv[:1] == ["models"]:
        from engine.tools.models_cli import main as models_main

        return models_main(argv[1:])
    args = _parser().parse_args(argv)
    handler = {
        "serve": _serve,
        "validate": _validate,
        "graph": _graph,
        "infer": _infer,
        "new-plugin": _new_plugin,
        "bench": _bench,
        "stream": _stream,
    }
    try:
        return handler[args.command](args)
    except DagserveError as exc:
        print(f"dagserve {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _print_errors(errors: Sequence[PipelineError]) -> None:
    for error in errors:
        print(error, file=sys.stderr)


def _validate(args: argparse.Namespace) -> int:
    pipelines, errors = load_for_serving(args.files)
    for pipeline in pipelines:
        for warning in pipeline.warnings:
            print(warning, file=sys.stderr)
    if errors:
        _print_errors(errors)
        print(f"{len(errors)} error(s) in {len(args.files)} file(s)", file=sys.stderr)
        return 1
    for pipeline in pipelines:
        print(
            f"ok: {pipeline.path}: {pipeline.name} version {pipeline.version}, "
            f"{len(pipeline.spec.nodes)} nodes"
        )
    return 0


def _graph(args: argparse.Namespace) -> int:
    from dag.picture import render

    pipelines, errors = load_for_serving([args.file])
    if errors:
        _print_errors(errors)
        return 1
    try:
        render(pipelines[0], args.output)
    except ValueError as exc:
        print(f"dagserve graph: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    import asyncio

    from engine.tools.bench import (
        BenchSpec,
        generated_samples,
        progress_bar,
        render_table,
        run_bench,
        samples_from_file,
    )
    from engine.transport.client import Client

    if args.samples is not None and args.samples.suffix != ".jsonl":
        samples = samples_from_file(args.samples)
    else:  # made-up samples and stream records are read with the pipeline's input specs
        with Client(args.host, args.port) as client:
            specs = client.describe(args.pipeline).inputs
        samples = (
            samples_from_file(args.samples, specs)
            if args.samples is not None
            else generated_samples(specs, optional=not args.skip_optional)
        )
    spec = BenchSpec(
        args.host,
        args.port,
        args.pipeline,
        samples,
        concurrency=args.max_inflight if args.rate else args.concurrency,
        rate=args.rate,
        duration_s=args.duration,
        warmup_s=args.warmup,
        timeout_ms=args.timeout_ms,
    )
    result = asyncio.run(run_bench(spec, progress=progress_bar(args.duration)))
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    print(render_table([result.summary()]))
    outcomes = ", ".join(f"{k}={v}" for k, v in sorted(result.outcomes.items()))
    print(
        f"all requests, warm-up and drain included: sent {result.sent}, answered "
        f"{result.answered} ({outcomes or 'none'})"
    )
    for name, example in sorted(result.error_examples.items()):
        print(f"  {name}: {example}")
    if args.json is not None:
        args.json.write_text(json.dumps(result.to_json(), indent=2, default=str))
        print(f"wrote {args.json}")
    return 0


def _stream_parser(commands: Any) -> None:
    stream = commands.add_parser(
        "stream", help="run a Flink job: JSONL records through a pipeline into a JSONL sink"
    )
    stream.add_argument(
        "--target", action="append", required=True, metavar="HOST:PORT",
        help="the server; repeat for replicas (a balancing client)",
    )  # fmt: skip
    stream.add_argument("--pipeline", required=True)
    stream.add_argument(
        "--source", required=True, metavar="jsonl:PATH", help="a JSON object a line"
    )
    stream.add_argument("--sink", required=True, metavar="jsonl:PATH", help="answers, a line each")
    stream.add_argument(
        "--dead-letter", metavar="jsonl:PATH",
        help="records that failed, with why (default: the sink's name with .dead.jsonl)",
    )  # fmt: skip
    stream.add_argument("--parallelism", type=int, default=1, help="operator subtasks (1)")
    stream.add_argument("--capacity", type=int, default=100, help="records in flight a subtask")
    stream.add_argument(
        "--ordered", action="store_true", help="answers in source order (--parallelism 1)"
    )
    stream.add_argument(
        "--timeout-ms", type=int, default=30_000, help="each record's deadline, retries included"
    )
    stream.add_argument(
        "--input-map", action="append", default=[], metavar="FIELD=INPUT",
        help="the record field that carries a pipeline input (default: its own name)",
    )  # fmt: skip
    stream.add_argument(
        "--output-map", action="append", default=[], metavar="OUTPUT=FIELD",
        help="the sink field of a pipeline output (default: its own name)",
    )  # fmt: skip
    stream.add_argument("--json", type=Path, metavar="FILE", help="also write the summary as JSON")


def _pairs(texts: Sequence[str], option: str) -> dict[str, str]:
    pairs = {}
    for text in texts:
        key, sep, value = text.partition("=")
        if not sep or not key or not value:
            msg = f"{option} must be A=B (got {text!r})"
            raise ValueError(msg)
        pairs[key] = value
    return pairs


def _stream(args: argparse.Namespace) -> int:
    import importlib.util

    if importlib.util.find_spec("pyflink") is None:
        print(
            "dagserve stream: PyFlink is not installed here: pip install 'dagserve[flink]' "
            f"(make test installs it in .venv-flink); this is {sys.executable}",
            file=sys.stderr,
        )
        return 2
    from engine.stream.job import (
        StreamSpec,
        default_dead_letters,
        jsonl_path,
        run_stream,
    )

    try:
        sink = jsonl_path(args.sink, "sink")
        spec = StreamSpec(
            targets=args.target,
            pipeline=args.pipeline,
            source=jsonl_path(args.source, "source"),
            sink=sink,
            dead_letters=(
                jsonl_path(args.dead_letter, "dead-letter")
                if args.dead_letter
                else default_dead_letters(sink)
            ),
            parallelism=args.parallelism,
            capacity=args.capacity,
            ordered=args.ordered,
            timeout_ms=args.timeout_ms,
            input_map=_pairs(args.input_map, "--input-map"),
            output_map=_pairs(args.output_map, "--output-map"),
        )
    except ValueError as exc:
        print(f"dagserve stream: {exc}", file=sys.stderr)
        return 2
    summary = run_stream(spec, progress=sys.stderr)
    print(summary.render())
    if args.json is not None:
        args.json.write_text(json.dumps(summary.to_json(), indent=2))
        print(f"wrote {args.json}")
    return 0


def _new_plugin(args: argparse.Namespace) -> int:
    from engine.tools.scaffold import new_plugin

    try:
        folder = new_plugin(args.name, args.dir)
    except ValueError as exc:
        print(f"dagserve new-plugin: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {folder}/: {args.name}.py, pipeline.yaml, test_{args.name}.py")
    print(f"next: pytest {folder}    then: dagserve serve {folder}/pipeline.yaml")
    return 0


def _front_processes(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        msg = f"expected a count >= 1 or auto (got {text!r})"
        raise argparse.ArgumentTypeError(msg)
    return count


def _serve(args: argparse.Namespace) -> int:
    from engine.observability.otel import exporting_traces
    from engine.server import Server
    from engine.transport.thrift import run

    config = ServerConfig()
    pipeline_files: list[Path] = []
    for path in args.files:
        if is_server_config(path):
            config = load_config(path)
            pipeline_files.extend(config.pipelines)
        else:
            pipeline_files.append(path)
    overrides = {
        key: value
        for key, value in {
            "host": args.host,
            "port": args.port,
            "metrics_port": args.metrics_port,
            "admin_port": args.admin_port,
            "watch": args.watch,
            "watch_interval_s": args.watch_interval,
            "log_level": args.log_level,
            "log_format": args.log_format,
            "front_processes": args.front_processes,
        }.items()
        if value is not None
    }
    config = ServerConfig.model_validate(
        {**config.model_dump(), **overrides, "pipelines": pipeline_files}
    )
    configure_logging(config.log_level, config.log_format)
    if not pipeline_files:
        print("dagserve serve: no pipeline files given", file=sys.stderr)
        return 2
    pipelines, errors = load_for_serving(pipeline_files)
    if errors:
        _print_errors(errors)
        return 1
    # OTLP export when the config's tracing: or the OTEL_* variables ask; off, no import
    with exporting_traces(config.tracing):
        run(Server(config, pipelines).serve())
    return 0


def parse_input(text: str, spec: TensorSpec | None) -> tuple[str, np.ndarray]:
    """Turn ``NAME=VALUE`` or ``NAME=@FILE`` into one item (a batch of one) of ``spec``."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        msg = f"--input must be NAME=VALUE or NAME=@FILE (got {text!r})"
        raise SystemExit(msg)
    dtype = spec.dtype if spec else None
    item: Any
    if value.startswith("@"):
        path = Path(value[1:])
        if path.suffix == ".npy":
            return name, np.load(path, allow_pickle=False)[None]
        item = path.read_bytes() if dtype != "string" else path.read_text(encoding="utf-8")
    elif dtype == "string":
        item = value
    elif dtype == "bytes":
        item = value.encode()
    else:
        try:
            item = json.loads(value)
        except json.JSONDecodeError as exc:
            msg = f"--input {name}: {value!r} is not JSON ({exc})"
            raise SystemExit(msg) from exc
    try:
        return name, as_array([item], spec)
    except ValueError as exc:
        msg = f"--input {name}: {exc}"
        raise SystemExit(msg) from exc


def _infer(args: argparse.Namespace) -> int:
    from engine.transport.client import Client

    with Client(args.host, args.port) as client:
        info = client.describe(args.pipeline)
        specs = info.inputs
        inputs = dict(parse_input(text, specs.get(text.partition("=")[0])) for text in args.input)
        result = client.infer(
            args.pipeline,
            inputs,
            version=args.version,
            outputs=args.outputs,
            timeout_ms=args.timeout_ms,
        )
    if args.json:
        print(
            json.dumps(
                {
                    "request_id": result.request_id,
                    "version": result.version,
                    "outputs": {k: _jsonable(v) for k, v in result.outputs.items()},
                    "node_latency_us": result.node_latency_us,
                },
                indent=2,
            )
        )
        return 0
    with np.printoptions(precision=4, threshold=20, edgeitems=4, suppress=True):
        for name, array in result.outputs.items():
            print(f"{name}: {array.dtype} {list(array.shape)}\n  {array}")
    latencies = ", ".join(f"{n} {us / 1000:.2f} ms" for n, us in result.node_latency_us.items())
    print(f"nodes: {latencies}")
    return 0


def _jsonable(array: np.ndarray) -> Any:
    if array.dtype == object:
        return [x.decode("latin-1") if isinstance(x, bytes) else x for x in array.ravel()]
    return array.tolist()


if __name__ == "__main__":
    sys.exit(main())
