"""The example pipeline against its slowest member served alone: is the DAG the bottleneck?

    .venv/bin/python -m benchmarks.pipeline_vs_members [--quick] [--duration S]

``examples/post_understanding/pipeline.yaml`` (its models built first by its
``build_models.py``, which does nothing when they are up to date) is served with one
**member pipeline per node** but the fusion: a one-node pipeline with the node's very plugin,
model file, params and batching, whose inputs are the node's inputs and whose outputs are every
output of the node the example uses.  All are served by ONE ``dagserve serve`` subprocess (a
member names the same model as the example's node, so they share its loaded model and worker)
and loaded in turn, side by side in one run, by ``engine.tools.bench.run_bench``, closed loop,
concurrency 8.

The load is the example's posts that have an image AND a text (``client.load_posts``).  A
member's inputs are what its upstream produced for those posts, asked of the server first
(``decode`` gives ``image_embed`` its pixels, ``text_embed`` gives ``tags`` and ``spam`` their
embedding).  The pipeline is measured before and after the members; its figure is the mean of
the two windows.  Reported: req/s and p50/p99 of every run, and req/s of the pipeline over
req/s of its slowest member (the member with the least req/s), and over the bound of members
that share the same saturated CPUs, ``1 / sum(1 / rps(member))``: on a 2-core machine every
member alone already fills the cores, so the pipeline cannot reach its slowest member.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from benchmarks._serving import (
    HOST,
    ROOT,
    dagserve_command,
    figures,
    measure,
    ratio,
    serving,
)
from engine.tools.bench import BenchResult, render_table
from engine.tools.ports import free_port
from engine.transport.client import Client

EXAMPLE = ROOT / "examples" / "post_understanding"
PIPELINE_FILE = EXAMPLE / "pipeline.yaml"
CONCURRENCY = 8
#: nodes with no member of their own: the fusion needs both branches, and is measured by
#: benchmarks.dag_overhead
SKIPPED_PLUGINS = {"concat_fusion", "weighted_mean_fusion", "identity"}
Sample = dict[str, Any]


def build_models() -> None:
    """Build the example's models unless they are up to date (the script's own check)."""
    subprocess.run(
        [sys.executable, str(EXAMPLE / "build_models.py")],
        cwd=ROOT, check=True, timeout=900, stdout=sys.stderr,
    )  # fmt: skip


def _used_outputs(pipeline: Mapping[str, Any], node: str) -> list[str]:
    """The outputs of ``node`` that the pipeline references (in its nodes or its outputs)."""
    refs = [*pipeline.get("outputs", {}).values()]
    for spec in pipeline["nodes"].values():
        refs += list(spec.get("inputs", {}).values())
    return sorted({r.split(".", 1)[1] for r in refs if r.startswith(f"{node}.")})


def member_pipeline(pipeline: Mapping[str, Any], node: str) -> dict[str, Any]:
    """A one-node pipeline serving ``node`` alone, with its plugin, model, params, batching.

    Its inputs are named as the node's inputs; their specs come from the example's inputs or,
    for a node's output, are left to the server to check against the plugin's declaration.
    """
    spec = dict(pipeline["nodes"][node])
    inputs: dict[str, Any] = {}
    for name, ref in spec["inputs"].items():
        if ref.startswith("$inputs."):
            declared = dict(pipeline["inputs"][ref.removeprefix("$inputs.")])
            declared.pop("optional", None)
            inputs[name] = declared
        else:
            inputs[name] = _upstream_spec(ref)
    spec["inputs"] = {name: f"$inputs.{name}" for name in spec["inputs"]}
    if "model" in spec:
        spec["model"] = str((EXAMPLE / spec["model"]).resolve())
    return {
        "name": f"member_{node}",
        "version": "1",
        "inputs": inputs,
        "nodes": {node: spec},
        "outputs": {out: f"{node}.{out}" for out in _used_outputs(pipeline, node)},
    }


#: the specs of the example's intermediate tensors (what the pipeline's nodes declare)
UPSTREAM_SPECS = {
    "decode.pixels": {"dtype": "float32", "shape": [3, 224, 224]},
    "text_embed.embedding": {"dtype": "float32", "shape": [384]},
}


def _upstream_spec(ref: str) -> dict[str, Any]:
    if ref not in UPSTREAM_SPECS:
        msg = f"no spec for {ref}: add it to UPSTREAM_SPECS"
        raise KeyError(msg)
    return dict(UPSTREAM_SPECS[ref])


def write_members(pipeline: Mapping[str, Any], folder: Path) -> dict[str, Path]:
    """member_<node>.yaml for every node with a member, in the example's order."""
    paths = {}
    for node, spec in pipeline["nodes"].items():
        if spec["plugin"] in SKIPPED_PLUGINS:
            continue
        path = folder / f"member_{node}.yaml"
        path.write_text(yaml.safe_dump(member_pipeline(pipeline, node), sort_keys=False))
        paths[node] = path
    return paths


def post_samples() -> list[Sample]:
    """The example's posts with both an image and a text, as single-item requests."""
    sys.path.insert(0, str(EXAMPLE))
    from client import load_posts  # examples/post_understanding/client.py

    posts = [p for p in load_posts().posts if p.image is not None and p.text is not None]
    return [
        {"image": np.array([p.image], dtype=object), "text": np.array([p.text], dtype=object)}
        for p in posts
    ]


def member_samples(
    pipeline: Mapping[str, Any], nodes: Sequence[str], posts: Sequence[Sample], port: int
) -> dict[str, list[Sample]]:
    """Each member's inputs for every post: pipeline inputs as sent, node outputs as the
    server's member of that node answers them (members in the example's order)."""
    produced: list[dict[str, Any]] = [
        {f"$inputs.{k}": v for k, v in post.items()} for post in posts
    ]
    samples: dict[str, list[Sample]] = {}
    with Client(HOST, port, timeout_s=60.0) as client:
        for node in nodes:
            refs = pipeline["nodes"][node]["inputs"]
            samples[node] = [{name: got[ref] for name, ref in refs.items()} for got in produced]
            for got, sample in zip(produced, samples[node], strict=True):
                outputs = client.infer(f"member_{node}", sample).outputs
                got.update({f"{node}.{k}": v for k, v in outputs.items()})
    return samples


def run_scenario(duration_s: float, warmup_s: float) -> list[dict[str, Any]]:
    """The pipeline, every member, the pipeline again: one server, one window each."""
    build_models()
    pipeline = yaml.safe_load(PIPELINE_FILE.read_text(encoding="utf-8"))
    posts = post_samples()
    port = free_port()
    rows: list[dict[str, Any]] = []

    def window(label: str, name: str, samples: Sequence[Sample]) -> BenchResult:
        print(f"{label} ...", file=sys.stderr, flush=True)
        result = measure(port, name, samples, concurrency=CONCURRENCY,
                         duration_s=duration_s, warmup_s=warmup_s)  # fmt: skip
        rows.append({"run": label, **figures(result)})
        return result

    with tempfile.TemporaryDirectory(prefix="pipeline-vs-members-") as tmp:
        members = write_members(pipeline, Path(tmp))
        command = dagserve_command([PIPELINE_FILE, *members.values()], port)
        with serving(command, port, ready_timeout_s=300.0, env={"PYTHONPATH": str(EXAMPLE)}):
            inputs = member_samples(pipeline, list(members), posts, port)
            window("pipeline (before)", pipeline["name"], posts)
            for node in members:
                window(f"member {node}", f"member_{node}", inputs[node])
            window("pipeline (after)", pipeline["name"], posts)
    return rows


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Pipeline req/s (mean of its two windows) over its slowest member's req/s."""
    pipeline = [r["req/s"] for r in rows if r["run"].startswith("pipeline")]
    slowest = min((r for r in rows if r["run"].startswith("member")), key=lambda r: r["req/s"])
    mean = sum(pipeline) / len(pipeline)
    return {
        "pipeline req/s (mean)": mean,
        "slowest member": slowest["run"].removeprefix("member "),
        "its req/s": slowest["req/s"],
        "pipeline / slowest": ratio(mean, slowest["req/s"]),
        "shared-CPU bound req/s": shared_cpu_bound(rows),
        "pipeline / bound": ratio(mean, shared_cpu_bound(rows)),
    }


def shared_cpu_bound(rows: list[dict[str, Any]]) -> float:
    """The pipeline's req/s if its members shared one saturated machine: ``1 / sum(1 / rps)``.

    Each member alone saturates the CPUs, so ``1 / rps`` is the machine time one request of it
    takes; a pipeline request costs the sum of its members'.  On a machine with idle cores
    (or one GPU per model) the bound would be the slowest member instead.
    """
    members = [r["req/s"] for r in rows if r["run"].startswith("member")]
    return 1 / sum(1 / rps for rps in members) if all(members) else float("nan")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 s windows (default 15 s)")
    parser.add_argument("--duration", type=float, help="seconds per window")
    args = parser.parse_args(argv)
    duration = args.duration or (4.0 if args.quick else 15.0)
    rows = run_scenario(duration, warmup_s=1.0 if args.quick else 2.0)
    result = summary(rows)
    print(f"### Pipeline against its members: closed loop x{CONCURRENCY}, {duration:g} s windows")
    print("\nLoad: the example's image+text posts; each member gets those posts' upstream.\n")
    print(render_table(rows))
    print()
    print(render_table([result]))
    print(
        f"\nReading: pipeline / slowest member ({result['slowest member']}) = "
        f"{result['pipeline / slowest']:.2f}; pipeline / shared-CPU bound (all members' work "
        f"on the same cores) = {result['pipeline / bound']:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
