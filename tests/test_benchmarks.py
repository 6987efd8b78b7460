"""What the benchmarks report about themselves: RESULTS.md's provenance, and the soak's sums.

No scenario runs here: ``run_all`` is driven with a fake run, and the soak's arithmetic with
made-up requests.
"""

from __future__ import annotations

import subprocess
from collections import Counter
from pathlib import Path

import pytest

from benchmarks import run_all, soak
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
