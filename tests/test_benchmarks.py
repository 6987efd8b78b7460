"""What the benchmarks report about themselves: RESULTS.md's provenance, and the soak's sums.

No scenario runs here: ``run_all`` is driven with a fake run, and the soak's arithmetic with
made-up requests.
"""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from benchmarks import batching, idle, rpc_overhead, run_all, soak
from engine.tools.bench import BenchResult

ROOT = Path(__file__).resolve().parent.parent


# -- run_all: one run, one report, with the code it ran -------------------------------------


def fake_git(commit: str, status: str):
    def git(*args: str) -> str:
        return f"{commit}\n" if args[0] == "rev-parse" else status

    return git


def test_the_code_version_names_the_commit_and_a_dirty_tree(monkeypatch):
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert run_all.code_version().startswith(f"commit {head}")  # the real checkout

    monkeypatch.setattr(run_all, "_git", fake_git("abc123", ""))
    assert run_all.code_version() == "commit abc123, clean tree"
    # the report itself being rewritten does not make the code dirty
    monkeypatch.setattr(run_all, "_git", fake_git("abc123", f" M {run_all.RESULTS}\n"))
    assert run_all.code_version() == "commit abc123, clean tree"
    monkeypatch.setattr(
        run_all, "_git", fake_git("abc123", " M engine/runtime/batcher.py\n?? benchmarks/new.py\n")
    )
    version = run_all.code_version()
    assert version.startswith("commit abc123 with uncommitted changes (dirty tree) in 2 file(s)")
    assert "engine/runtime/batcher.py" in version
    assert "benchmarks/new.py" in version


def test_the_header_says_what_ran_when(monkeypatch):
    monkeypatch.setattr(run_all, "machine", lambda: "a test machine")
    lines = run_all.header(False, 12.0, "commit abc123, clean tree")
    text = "\n".join(lines)
    assert "Code: commit abc123, clean tree." in text
    assert "Date: 20" in text
    assert "from this one run of `.venv/bin/python -m benchmarks.run_all`" in text
    assert "changed during the run" not in text
    changed = "\n".join(run_all.header(False, 1.0, "commit a, clean tree", "commit b, clean tree"))
    assert "**The tree changed during the run**; at its end: commit b" in changed


@pytest.fixture
def fake_runs(monkeypatch, tmp_path):
    """run_all without running anything; RESULTS.md is a file in tmp_path."""
    results = tmp_path / "RESULTS.md"
    results.write_text("the last full run\n")
    monkeypatch.setattr(run_all, "DEFAULT_OUT", results)
    monkeypatch.setattr(run_all, "machine", lambda: "a test machine")
    monkeypatch.setattr(run_all, "code_version", lambda: "commit abc123, clean tree")
    ran: list[list[str]] = []

    def run(scenarios, quick):
        ran.append([s.name for s in scenarios])
        return [
            run_all.Outcome(s, s.command(quick), f"| x |\n|---|\n| {s.name} |\n", 0, 1.0)
            for s in scenarios
        ]

    monkeypatch.setattr(run_all, "run_all", run)
    return results, ran


def test_a_full_run_writes_every_section_under_one_header(fake_runs):
    results, ran = fake_runs
    assert run_all.main([]) == 0
    assert ran == [[s.name for s in run_all.SCENARIOS]]
    text = results.read_text()
    assert text.startswith("# Benchmark results\n\nCode: commit abc123, clean tree.")
    assert text.count("# Benchmark results") == 1
    for scenario in run_all.SCENARIOS:
        assert f"(`{scenario.name}`)" in text


@pytest.mark.parametrize("args", [["--only", "soak"], ["--quick"]])
def test_a_partial_run_never_touches_results_md(fake_runs, capsys, args):
    results, _ = fake_runs
    assert run_all.main(args) == 0
    assert results.read_text() == "the last full run\n"
    printed = capsys.readouterr().out
    assert "Code: commit abc123, clean tree." in printed
    with pytest.raises(SystemExit) as refused:
        run_all.main([*args, "--out", str(results)])
    assert refused.value.code == 2
    assert results.read_text() == "the last full run\n"


def test_a_partial_run_may_write_another_file(fake_runs, tmp_path):
    results, _ = fake_runs
    elsewhere = tmp_path / "soak.md"
    assert run_all.main(["--only", "soak", "--out", str(elsewhere)]) == 0
    assert "run_all --only soak`" in elsewhere.read_text()
    assert results.read_text() == "the last full run\n"


# -- soak: what is counted, and what recovery means -----------------------------------------


def test_recovery_counts_only_requests_sent_after_the_fault():
    stream = soak.Stream("steady", records=[])
    fault = soak.Fault("worker SIGKILL", start=10.0, end=10.0)
    stream.records = [
        (9.0, 9.1, "ok"),
        (9.9, 10.05, "ok"),  # sent before the kill, answered after it: not a recovery
        (9.95, 10.1, "InferenceError"),  # in flight when the worker died
        (10.2, 10.4, "Overloaded"),
        (10.5, 11.5, "ok"),  # the first one sent after the kill that succeeded
        (10.6, 11.6, "ok"),
    ]
    assert soak.recovery(stream, fault) == pytest.approx(1.5)
    assert soak.failures(stream, 10.0, 11.0) == Counter({"InferenceError": 1, "Overloaded": 1})
    assert soak.failures(stream, 0.0, 10.0) == Counter()
    assert soak.recovery(soak.Stream("s", records=[(9.0, 10.5, "ok")]), fault) is None


def test_a_stream_counts_lost_requests_apart_from_typed_refusals():
    from engine.errors import ClientConnectionError, ClientTimeout
    from model_plugins.errors import InvalidRequest, Overloaded

    stream = soak.Stream("s")
    for error in (None, Overloaded("full"), InvalidRequest("bad"), ClientTimeout("slow")):
        stream.done(stream.start(), error)
    stream.done(stream.start(), ClientConnectionError("gone"))
    assert stream.sent == 5
    assert stream.answered == 3
    assert stream.lost == Counter({"ClientTimeout": 1, "ClientConnectionError": 1})
    assert stream.refused == Counter({"Overloaded": 1, "InvalidRequest": 1})

    bench = BenchResult("soak", "open", 1.0, sent=6, answered=4)
    bench.outcomes.update({"ok": 3, "Overloaded": 1, "ClientTimeout": 2})
    heavy = soak.Stream.of_bench("10x", bench)
    assert (heavy.sent, heavy.answered, heavy.outcomes["ok"]) == (6, 4, 3)
    assert heavy.lost == Counter({"ClientTimeout": 2})


def test_the_gpu_section_copies_the_separate_run_and_says_so(tmp_path, monkeypatch):
    gpu = tmp_path / "RESULTS-gpu.md"
    monkeypatch.setattr(run_all, "GPU_RESULTS", gpu)
    assert "Not run: no GPU results yet" in "\n".join(run_all.gpu_section())
    gpu.write_text("# GPU results\n\nCode: abc123.\n\n## The GPU tests\n\n4 passed\n")
    text = "\n".join(run_all.gpu_section())
    assert text.startswith("## On a GPU: a separate run")
    assert "Code: abc123." in text
    assert "### The GPU tests" in text  # its sections sit under ours
    assert "# GPU results" not in text


# -- idle, batching, rpc_overhead: the targets each scenario reports -------------------------


def test_idle_target_is_1_1_offline_plus_the_bare_round_trip_plus_1_ms():
    assert idle.target_ms(10.0, 2.0) == pytest.approx(14.0)
    met = idle.table_row("cnn", 602.0, {"offline": [0.010] * 3, "bare": [0.002] * 3,
                                         "served": [0.014] * 3})  # fmt: skip
    assert met["target ms"] == pytest.approx(14.0)
    assert met["met?"] == "yes"
    missed = idle.table_row("cnn", 602.0, {"offline": [0.010], "bare": [0.002],
                                            "served": [0.0141, 0.0141, 0.001]})  # fmt: skip
    assert missed["served p50 ms"] == pytest.approx(14.1)
    assert missed["met?"] == "NO"
    assert "cnn 14.10 ms against 14.00 (NOT met)" in idle.reading([missed])


def test_idle_writes_one_pipeline_per_model(tmp_path):
    import yaml

    paths = idle.write_pipelines(tmp_path, list(idle.MODELS.values()))
    docs = {path.stem: yaml.safe_load(path.read_text()) for path in paths}
    assert sorted(docs) == ["idle_cnn", "idle_matvec", "idle_paddle", "idle_tf"]
    tf = docs["idle_tf"]
    assert tf["inputs"]["x"] == {"dtype": "float32", "shape": [64, 64, 3]}
    assert tf["nodes"]["model"]["plugin"] == "tensorflow"
    assert tf["nodes"]["model"]["params"] == {"output_map": {"y": "output_0"}}
    assert docs["idle_paddle"]["nodes"]["model"]["model"] == "paddle_model/inference"
    assert all(doc["outputs"] == {"y": "model.y"} for doc in docs.values())


def test_idle_matvec_runs_on_one_blas_thread():
    from threadpoolctl import threadpool_info, threadpool_limits

    from model_plugins import LoadContext

    with threadpool_limits(limits=None, user_api="blas"):  # this process's threads come back
        plugin = idle.MatVec()
        plugin.load(LoadContext(node="model", plugin="benchmarks.idle:MatVec"))
        x = np.random.default_rng(0).random((2, 4096), dtype=np.float32)
        y = plugin.predict({"x": x})["y"]
        np.testing.assert_allclose(y, x @ plugin.w.T, rtol=1e-5)
        blas = {pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"}
        assert blas == {1}


def test_batching_targets_heavy_against_offline_light_against_the_lesser_ceiling():
    def window(items_s: float) -> tuple[BenchResult, float, int]:
        result = BenchResult("m", "closed", 10.0, concurrency=64)
        result.items = int(items_s * 10)
        return result, 8.0, 10

    offline = {
        "heavy": {"items/s@1": 10.0, "items/s@8": 40.0, "items/s@32": 30.0},
        "light": {"items/s@1": 500.0, "items/s@32": 20000.0},
    }
    rows = batching.target_rows(offline, {"heavy": window(36.0), "light": window(500.0)}, 1000.0)
    heavy, light = rows
    assert heavy["offline best batch (size, items/s)"] == "8, 40"
    assert heavy["ratio"] == pytest.approx(0.9)
    assert heavy["met?"] == "yes"
    assert light["ratio"] == pytest.approx(0.5)  # against the echo ceiling, the lesser
    assert light["met?"] == "yes"
    rows = batching.target_rows(offline, {"heavy": window(35.0), "light": window(400.0)}, 1000.0)
    assert [r["met?"] for r in rows] == ["NO", "NO"]


def test_rpc_overhead_target_compares_the_pipeline_with_the_stock_echo_at_16():
    rows = [
        {"payload": payload, "concurrency": c, "server": server, "req/s": rps, "p50 ms": 1.0}
        for payload in rpc_overhead.PAYLOADS
        for c in rpc_overhead.CONCURRENCIES
        for server, rps in (("dagserve", 590.0 if c == 16 else 1.0),
                            ("bare (same stack)", 2000.0), ("bare (thriftpy2 stock)", 1000.0))
    ]  # fmt: skip
    targets = rpc_overhead.target_rows(rows)
    assert [t["ratio"] for t in targets] == [pytest.approx(0.59)] * 2
    assert {t["met?"] for t in targets} == {"NO"}
    assert "(target >= 0.6): tiny 1x4 0.59 (NOT met)" in rpc_overhead.reading(
        rpc_overhead.with_ratios(rows), targets
    )


# -- flink_stream: run only where its venv is, on the example's valid records ---------------


def test_a_scenario_whose_venv_is_missing_is_not_run_and_says_why(tmp_path):
    registered = next(s for s in run_all.SCENARIOS if s.name == "flink_stream")
    assert registered.optional
    assert registered.needs == ".venv-flink/bin/python"
    missing = run_all.Scenario(
        "flink_stream", "t", (), ("--quick",), 10, 10, optional=True, needs="no/such/venv"
    )
    assert not run_all.available(missing)
    assert run_all.available(run_all.Scenario("flink_stream", "t", (), (), 10, 10))
    (outcome,) = run_all.run_all([missing], quick=True)  # returns at once: nothing starts
    assert outcome.returncode is None
    assert outcome.seconds == 0
    assert outcome.errors.endswith("(it needs no/such/venv)")


def test_flink_stream_sends_the_valid_records_of_the_example_stream(tmp_path):
    from benchmarks import flink_stream

    records = flink_stream.stream_records()
    ids = [json.loads(line)["id"] for line in records]
    assert len(ids) == len(set(ids)) > 300  # the samples and the random posts, each once
    assert not {"bad-json", "bad-text-type", "bad-image-bytes"} & set(ids)
    path = flink_stream.write_records(tmp_path / "r.jsonl", records, len(records) * 2 + 1)
    written = [json.loads(line) for line in path.read_text().splitlines()]
    assert len({r["id"] for r in written}) == len(written) == len(records) * 2 + 1
    assert written[len(records)]["id"] == f"{ids[0]}#1"
    assert written[len(records)]["text"] == json.loads(records[0])["text"]


def test_flink_stream_rates_the_middle_of_the_job():
    from benchmarks.flink_stream import window_rate

    # (seconds, sink lines): 20 s of start, then 10 lines a second, a slow tail of 5 lines
    polls = [(t / 10, 0) for t in range(200)]
    polls += [(20 + t / 10, t) for t in range(1, 951)]
    polls += [(115.0 + t, 950 + t) for t in range(1, 6)]
    assert window_rate(polls, 955) == pytest.approx(10, rel=0.02)
    assert np.isnan(window_rate(polls[:300], 955))  # never reached 90%


def test_ray_workers_pins_the_examples_frameworks_to_the_two_zones(tmp_path):
    import yaml

    from benchmarks import ray_workers
    from dag.schema import PipelineSpec

    path = ray_workers.pinned_pipeline(tmp_path)
    spec = PipelineSpec.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))
    pinned = {name: node.ray_resources for name, node in spec.nodes.items()}
    assert pinned["image_embed"] == pinned["text_embed"] == {"zone_a": 1.0}  # PyTorch
    assert pinned["tags"] == pinned["spam"] == {"zone_b": 1.0}  # TensorFlow, Paddle
    assert pinned["decode"] == pinned["fuse"] == {}  # built-ins: where Ray likes
    assert Path(spec.nodes["image_embed"].model).is_absolute()  # the copy lives elsewhere


def test_ray_workers_merges_the_two_windows_of_a_side():
    from benchmarks.ray_workers import _merged

    first = BenchResult("p", "closed", 2.0, ok=3, latencies_s=[0.001, 0.002, 0.003])
    second = BenchResult("p", "closed", 2.0, ok=1, latencies_s=[0.100], errors=Counter(E=2))
    merged = _merged([first, second])
    assert merged == {"req/s": 1.0, "p50 ms": 2.0, "p99 ms": 100.0, "errors": 2}
