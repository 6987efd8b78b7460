"""Run every benchmark scenario and write ``benchmarks/RESULTS.md`` from what they print.

    .venv/bin/python -m benchmarks.run_all [--quick] [--out FILE] [--only NAME ...]

RESULTS.md is only ever written whole, by one full run (``make bench``): its header names the
commit of the code that ran (and whether the tree had changes the commit lacks) and the date,
and every section below it comes from that run.  A ``--quick`` run or an ``--only`` run prints
its report (or writes it to ``--out``, never to RESULTS.md), so no section of another run can
be pasted in.

Each scenario runs as ``python -m benchmarks.<name> [ARGS]`` in a subprocess with a time bound
(and within the whole run's bound: 34 min, 15 min with ``--quick``); its stdout is pasted into
its section as it printed it (tables, in Markdown).  A line of its output starting with
``Reading:`` becomes the section's one-line reading; for scenarios that print none, a reader
here derives it from the table, or says there is none.  A scenario that fails, or runs past
its bound, gets the tail of its output instead of numbers.  ``benchmarks.batching`` and
``benchmarks.ray_serve`` run only where they import, ``benchmarks.flink_stream`` only where
``.venv-flink`` exists (their sections say so otherwise).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: the report of the last full run, relative to ROOT
RESULTS = "benchmarks/RESULTS.md"
DEFAULT_OUT = ROOT / RESULTS
#: the whole run's bound, seconds (full, --quick)
TOTAL_S = {False: 25 * 60 + 300 + 240, True: 8 * 60 + 240 + 180}  # + flink_stream's, ray_workers'


@dataclass(frozen=True)
class Scenario:
    """One benchmark module, its arguments and its time bound (full / quick)."""

    name: str
    title: str
    args: tuple[str, ...]
    quick_args: tuple[str, ...]
    bound_s: float
    quick_bound_s: float
    optional: bool = False
    #: a path under ROOT it runs from (a venv of its own): without it, it is not run
    needs: str | None = None

    def command(self, quick: bool) -> list[str]:
        return [sys.executable, "-m", f"benchmarks.{self.name}",
                *(self.quick_args if quick else self.args)]  # fmt: skip


SCENARIOS = (
    Scenario("worker_crossing", "Handing a tensor to a worker process and back",
             ("--repeat", "30"), ("--repeat", "5"), 120, 40),
    Scenario("worker_speed", "A model's compute time inside a worker against the same call offline",
             (), ("--quick",), 240, 90),
    Scenario("idle", "Idle latency at batch 1: served against offline and the bare round trip",
             (), ("--quick",), 180, 100),
    Scenario("rpc_overhead", "The RPC ceiling: identity pipeline against a bare echo server",
             (), ("--quick",), 180, 50),
    Scenario("dag_overhead", "What one more node costs: chains and fan-outs of identity nodes",
             (), ("--quick",), 150, 35),
    Scenario("pipeline_vs_members", "The example pipeline against its slowest member",
             (), ("--quick",), 240, 75),
    Scenario("batching", "Dynamic batching against the model run offline",
             (), ("--quick",), 240, 100, optional=True),
    Scenario("fronts", "Two front processes against one", (), ("--quick",), 150, 75),
    Scenario("replicas", "Replicas behind one balancing client, one SIGKILLed",
             (), ("--quick",), 120, 75),
    Scenario("ray_serve", "Ray Serve against dagserve", (), ("--quick",), 420, 150, optional=True),
    Scenario("ray_workers", "Workers as Ray actors on a two-node cluster against local workers",
             (), ("--quick",), 240, 180),
    Scenario("flink_stream", "Records through Flink against the direct load", (), ("--quick",),
             300, 240, optional=True, needs=".venv-flink/bin/python"),
    Scenario("soak", "Faults under load: bad input, overload, 10x the rate, a worker SIGKILL",
             (), ("--quick",), 150, 60),
    Scenario("lifecycle", "Versions swapped under load", (), ("--quick",), 150, 90),
)  # fmt: skip


@dataclass
class Outcome:
    """What one scenario did: its output, its exit status, how long it ran."""

    scenario: Scenario
    command: list[str]
    output: str
    returncode: int | None  # None: killed at its bound
    seconds: float
    errors: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0


# --- running ------------------------------------------------------------------------------


def available(scenario: Scenario) -> bool:
    """Whether ``benchmarks.<name>`` exists (optional scenarios may be missing), and what it
    ``needs`` (``.venv-flink`` for ``flink_stream``)."""
    if scenario.needs is not None and not (ROOT / scenario.needs).exists():
        return False
    return importlib.util.find_spec(f"benchmarks.{scenario.name}") is not None


def run_scenario(scenario: Scenario, quick: bool, bound_s: float) -> Outcome:
    """Run one scenario in its own process group; kill the group at ``bound_s``."""
    command = scenario.command(quick)
    print(f"== {scenario.name} (bound {bound_s:.0f} s): {shlex.join(command)}", flush=True)
    started = time.monotonic()
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True, text=True, errors="replace",
    )  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=max(bound_s, 1.0))
        returncode: int | None = process.returncode
    except subprocess.TimeoutExpired:
        _kill_group(process)
        stdout, stderr = process.communicate()
        returncode = None
    seconds = time.monotonic() - started
    print(f"   {'ok' if returncode == 0 else 'FAILED'} in {seconds:.0f} s", flush=True)
    return Outcome(scenario, command, stdout, returncode, seconds, stderr)


def _kill_group(process: subprocess.Popen[str]) -> None:
    """SIGTERM the scenario's process group (its servers stop too), then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(15)
            return
        except subprocess.TimeoutExpired:
            continue


def run_all(scenarios: Sequence[Scenario], quick: bool) -> list[Outcome]:
    """Every scenario in turn, each within its bound and the time the whole run has left."""
    deadline = time.monotonic() + TOTAL_S[quick]
    outcomes = []
    for scenario in scenarios:
        if scenario.optional and not available(scenario):
            missing = f"not run: benchmarks.{scenario.name} is not available here" + (
                f" (it needs {scenario.needs})" if scenario.needs else ""
            )
            outcomes.append(Outcome(scenario, scenario.command(quick), "", None, 0.0, missing))
            continue
        left = deadline - time.monotonic()
        bound = min(scenario.quick_bound_s if quick else scenario.bound_s, left)
        if bound < 5:
            skipped = f"not run: the whole run's {TOTAL_S[quick]} s bound was spent"
            outcomes.append(Outcome(scenario, scenario.command(quick), "", None, 0.0, skipped))
            continue
        outcomes.append(run_scenario(scenario, quick, bound))
    return outcomes


# --- the report ---------------------------------------------------------------------------


def code_version() -> str:
    """The commit of the checkout, and the files in which the tree differs from it."""
    try:
        commit = _git("rev-parse", "HEAD").strip()
        status = _git("status", "--porcelain")
    except (subprocess.SubprocessError, OSError):
        return "not a git checkout (commit unknown)"
    changed = sorted(line[3:] for line in status.splitlines() if line[3:] not in ("", RESULTS))
    if not changed:
        return f"commit {commit}, clean tree"
    shown = ", ".join(changed[:10]) + (
        f" and {len(changed) - 10} more" if len(changed) > 10 else ""
    )
    return (
        f"commit {commit} with uncommitted changes (dirty tree) in {len(changed)} file(s): {shown}"
    )


def _git(*args: str) -> str:
    done = subprocess.run(
        ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30, check=True
    )
    return done.stdout


def machine() -> str:
    """CPU model, cores, memory, Python and torch versions."""
    cpu = "unknown CPU"
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo", encoding="utf-8") as f:
        kib = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    return (
        f"{os.cpu_count()} cores of {cpu}, {kib / 2**20:.1f} GiB, "
        f"Python {platform.python_version()}, torch {_torch_version()}, "
        f"{platform.system()} {platform.release()}"
    )


def _torch_version() -> str:
    probe = [sys.executable, "-c", "import torch; print(torch.__version__)"]
    try:
        done = subprocess.run(probe, capture_output=True, text=True, timeout=60, check=True)
    except (subprocess.SubprocessError, OSError):
        return "not installed"
    return done.stdout.strip()


def _reading_worker_crossing(output: str) -> str | None:
    """The crossing as a fraction of a ResNet-18 forward, per batch (its table's last column)."""
    rows = [line.split("|")[1:-1] for line in output.splitlines() if re.match(r"\|\s*\d", line)]
    if not rows or len(rows[0]) < 7:
        return None
    parts = [f"batch {r[0].strip()}: {float(r[-1]):.1%}" for r in rows]
    return "worker round trip / ResNet-18 forward: " + ", ".join(parts)


def table_after(output: str, heading: str) -> list[dict[str, str]]:
    """The rows of the first Markdown table after the line that starts with ``heading``."""
    lines = output.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(heading)), None)
    if start is None:
        return []
    block = []
    for line in lines[start + 1 :]:
        if line.startswith("|"):
            block.append(line)
        elif block:
            break
    table = block
    if len(table) < 3:
        return []
    keys = [cell.strip() for cell in table[0].strip("|").split("|")]
    return [
        dict(zip(keys, (cell.strip() for cell in row.strip("|").split("|")), strict=False))
        for row in table[2:]
    ]


def _reading_batching(output: str) -> str | None:
    """Served / offline-best items/s at concurrency 64, and the batched speed-up at 32."""
    efficiency = table_after(output, "### 1-2.")
    speedup = table_after(output, "### 4.")
    if not efficiency:
        return None
    parts = [f"{r.get('model')}: served / offline best {r.get('ratio')} (met? {r.get('met?')})"
             for r in efficiency]  # fmt: skip
    parts += [f"{r.get('model')}: batched / not batched at x32 {r.get('speed-up')}"
              for r in speedup]  # fmt: skip
    return "; ".join(parts)


READERS: dict[str, Callable[[str], str | None]] = {
    "worker_crossing": _reading_worker_crossing,
    "batching": _reading_batching,
}


def reading(outcome: Outcome) -> str:
    """The scenario's one-line reading: its ``Reading:`` lines, else a reader's, else none."""
    lines = [
        line.removeprefix("Reading:").strip()
        for line in outcome.output.splitlines()
        if line.startswith("Reading:")
    ]
    if lines:
        return " ".join(lines)
    reader = READERS.get(outcome.scenario.name)
    found = reader(outcome.output) if reader else None
    return found or "(the scenario prints no reading line: see its tables)"


def _body(outcome: Outcome) -> str:
    kept = [line for line in outcome.output.splitlines() if not line.startswith("Reading:")]
    return "\n".join(kept).strip()


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def section(outcome: Outcome) -> str:
    """One scenario's Markdown section: command, tables and reading, or its error tail."""
    title = f"## {outcome.scenario.title} (`{outcome.scenario.name}`)"
    command = shlex.join([".venv/bin/python", *outcome.command[1:]])
    head = [title, "", f"Command: `{command}` ({outcome.seconds:.0f} s)", ""]
    if outcome.ok:
        return "\n".join([*head, _body(outcome), "", f"**Reading:** {reading(outcome)}", ""])
    if outcome.returncode is None:
        status = outcome.errors if outcome.seconds == 0 else (
            f"TIMED OUT after {outcome.seconds:.0f} s (killed)")  # fmt: skip
    else:
        status = f"FAILED with exit status {outcome.returncode}"
    tail = _tail(outcome.output + "\n" + outcome.errors)
    return "\n".join([*head, f"**{status}.** Last lines of its output:", "", "```", tail,
                      "```", ""])  # fmt: skip


def header(
    quick: bool,
    total_s: float,
    code: str,
    code_after: str | None = None,
    only: Sequence[str] = (),
) -> list[str]:
    """The report's header: what ran (the code's commit, dirty or not), when, where, how."""
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    flags = (" --quick" if quick else "") + (f" --only {' '.join(only)}" if only else "")
    lines = [
        "# Benchmark results",
        "",
        f"Code: {code}.",
    ]
    if code_after is not None and code_after != code:
        lines.append(f"**The tree changed during the run**; at its end: {code_after}.")
    return [
        *lines,
        f"Machine: {machine()}.",
        f"Date: {when}. Every section below comes from this one run of "
        f"`.venv/bin/python -m benchmarks.run_all{flags}`, in {total_s:.0f} s.",
        "",
    ]


def report(
    outcomes: Sequence[Outcome],
    quick: bool,
    total_s: float,
    code: str,
    code_after: str | None = None,
    only: Sequence[str] = (),
) -> str:
    """The whole report (RESULTS.md for a full run)."""
    header_lines = [
        *header(quick, total_s, code, code_after, only),
        "The machine is shared and noisy: read the ratios of figures measured side by side in "
        "one run, not the absolute numbers. Every section says how its figures were measured "
        "in its module's docstring.",
        "",
    ]
    return "\n".join(header_lines + [section(o) for o in outcomes] + gpu_section())


#: written on a machine with a GPU by ``python -m benchmarks.gpu --report`` (a separate run)
GPU_RESULTS = ROOT / "benchmarks" / "RESULTS-gpu.md"


def gpu_section() -> list[str]:
    """The last GPU run's report, marked as the separate run it is (none: say so)."""
    title = "## On a GPU: a separate run (`benchmarks/RESULTS-gpu.md`)"
    if not GPU_RESULTS.exists():
        return [title, "", "Not run: no GPU results yet (`python -m benchmarks.gpu --report`).", ""]
    body = GPU_RESULTS.read_text(encoding="utf-8").strip().splitlines()
    if body and body[0].startswith("# "):
        body = body[1:]  # its own title
    demoted = ["#" + line if line.startswith("## ") else line for line in body]
    note = (
        "This machine has no GPU: the figures below come from the file's own run on another "
        "machine, of the code its header names, and are copied here as they are."
    )
    return [title, "", note, *demoted, ""]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short windows, <= 5 min in all")
    parser.add_argument(
        "--out", type=Path,
        help=f"the Markdown to write (default: {RESULTS} for a full run; "
        "a --quick or --only run prints its report)",
    )  # fmt: skip
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these scenarios")
    args = parser.parse_args(argv)
    known = {s.name for s in SCENARIOS}
    if args.only and not set(args.only) <= known:
        parser.error(
            f"unknown scenario(s): {sorted(set(args.only) - known)}; known: {sorted(known)}"
        )
    partial = bool(args.only) or args.quick
    out = args.out if args.out is not None or partial else DEFAULT_OUT
    if partial and out is not None and out.resolve() == DEFAULT_OUT.resolve():
        parser.error(
            f"{RESULTS} is written only by a full run of every scenario "
            "(make bench); give --out another file"
        )
    chosen = [s for s in SCENARIOS if not args.only or s.name in args.only]
    code = code_version()
    started = time.monotonic()
    outcomes = run_all(chosen, args.quick)
    text = report(
        outcomes, args.quick, time.monotonic() - started, code, code_version(), args.only or ()
    )
    if out is None:
        print(text)
    else:
        out.write_text(text, encoding="utf-8")
        print(f"wrote {out}")
    missing = {
        o.scenario.name for o in outcomes if o.scenario.optional and not available(o.scenario)
    }
    return 0 if all(o.ok or o.scenario.name in missing for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
