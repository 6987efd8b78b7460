"""`make stream-demo`: the stream of posts through the example pipeline on Flink, summarised.

Builds the models if needed and writes ``data/posts.jsonl`` (``make_stream.py``), serves the
pipeline (``demo.serve``), runs the real ``dagserve stream`` job from the Flink venv
(``.venv-flink``: PyFlink pins its own numpy, so it is kept out of ``.venv``) into
``models/stream/sink.jsonl`` and ``models/stream/dead-letter.jsonl``, then prints a summary of
them and stops the server.

It fails (exit status 1) when the job fails or runs past ``--timeout`` seconds, when a valid
post is missing from the sink, answered twice or dead-lettered, or when an invalid line of
``make_stream.INVALID_LINES`` is not in the dead-letter output.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from build_models import build
from client import PIPELINE, load_topics
from demo import serve
from make_stream import INVALID_LINES, write_stream

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
FLINK_PYTHON = ROOT / ".venv-flink" / "bin" / "python"
OUT = HERE / "models" / "stream"
#: spam_probability at or above which a post counts as spam
SPAM_THRESHOLD = 0.5


def stream_command(port: int, source: Path, sink: Path, dead: Path, args: Any) -> list[str]:
    """The ``dagserve stream`` command line, run by the Flink venv's interpreter."""
    return [
        str(FLINK_PYTHON), "-m", "engine.cli", "stream",
        "--target", f"127.0.0.1:{port}", "--pipeline", PIPELINE,
        "--source", f"jsonl:{source}", "--sink", f"jsonl:{sink}",
        "--dead-letter", f"jsonl:{dead}",
        "--parallelism", str(args.parallelism), "--capacity", str(args.capacity),
        "--timeout-ms", str(args.timeout_ms),
    ]  # fmt: skip


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL output (a missing file: none)."""
    if not path.exists():
        return []
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def valid_ids(source: Path) -> list[str]:
    """The ``id`` of every line of the source that is not one of the invalid lines."""
    invalid = {bad.line for bad in INVALID_LINES}
    with source.open(encoding="utf-8") as f:
        return [
            json.loads(line)["id"] for line in f if line.strip() and line.strip() not in invalid
        ]


def dead_reason(dead: dict[str, Any]) -> str:
    """A dead letter's reason, for grouping: its error's type, node (when one is named) and
    the head of its message (``{"error": {"type", "message", "node"}, ...}``)."""
    error = dead.get("error")
    if not isinstance(error, dict):
        return f"(no error field) {json.dumps(dead)[:60]}"
    node = f" in node {error['node']}" if error.get("node") else ""
    message = str(error.get("message", ""))
    return f"{error.get('type', '?')}{node}: {message[:70]}{'...' if len(message) > 70 else ''}"


def dead_id(dead: dict[str, Any]) -> str | None:
    """The ``id`` of the record a dead letter holds, when its line was an object with one."""
    record = dead.get("record")
    if isinstance(record, dict):
        return record.get("id")
    line = dead.get("line")
    if isinstance(line, str):
        try:
            parsed = json.loads(line)
        except json.JSONDecodeError:
            return None
        return parsed.get("id") if isinstance(parsed, dict) else None
    return None


def top_topic(answer: dict[str, Any], topics: Sequence[str]) -> str | None:
    """The topic of the highest of ``tag_probabilities`` (None for an image-only post)."""
    if "tag_probabilities" not in answer:
        return None
    return topics[int(np.argmax(np.asarray(answer["tag_probabilities"]).reshape(-1)))]


def spam(answer: dict[str, Any]) -> float | None:
    if "spam_probability" not in answer:
        return None
    return float(np.asarray(answer["spam_probability"]).reshape(-1)[0])


def examples(sink: Sequence[dict[str, Any]], each: int = 2) -> list[dict[str, Any]]:
    """A few rows of the sink, by id: ``each`` of the random posts with an image and a text,
    a text only, an image only, and a spam score >= :data:`SPAM_THRESHOLD`."""
    kinds = (
        lambda r: "image_embedding" in r and "text_embedding" in r,
        lambda r: "text_embedding" in r and "image_embedding" not in r,
        lambda r: "image_embedding" in r and "text_embedding" not in r,
        lambda r: (spam(r) or 0.0) >= SPAM_THRESHOLD,
    )
    randoms = [r for r in sink if str(r.get("id")).startswith("post-")] or list(sink)
    picked: dict[str, dict[str, Any]] = {}
    for kind in kinds:
        for r in [r for r in randoms if kind(r) and str(r.get("id")) not in picked][:each]:
            picked[str(r.get("id"))] = r
    return [picked[key] for key in sorted(picked)]


def summarise(
    sink: list[dict[str, Any]], dead: list[dict[str, Any]], expected: Sequence[str]
) -> list[str]:
    """Print the summary of the sink and the dead letters; return what went wrong (if any)."""
    topics = load_topics()
    problems = []
    answered = Counter(str(r.get("id")) for r in sink)
    twice = sorted(i for i, n in answered.items() if n > 1)
    missing = sorted(set(expected) - set(answered))
    print(f"\nsink: {len(sink)} records answered ({len(set(answered))} distinct ids) "
          f"of {len(expected)} valid posts")  # fmt: skip
    if twice:
        problems.append(f"answered more than once: {', '.join(twice[:10])}")
    if missing:
        problems.append(f"{len(missing)} valid posts not in the sink: {', '.join(missing[:10])}")

    reasons = Counter(dead_reason(d) for d in dead)
    print(f"dead letters: {len(dead)} (expected {len(INVALID_LINES)}, the invalid lines)")
    for reason, count in reasons.most_common():
        print(f"  {count:>4}  {reason}")
    dead_valid = sorted({i for i in map(dead_id, dead) if i in set(expected)})
    if dead_valid:
        problems.append(f"valid posts dead-lettered: {', '.join(dead_valid[:10])}")
    if len(dead) != len(INVALID_LINES):
        problems.append(f"{len(dead)} dead letters, expected {len(INVALID_LINES)}")

    tags = Counter(t for t in (top_topic(r, topics) for r in sink) if t is not None)
    print(
        "top tag of each post with a text: " + ", ".join(f"{t} {n}" for t, n in tags.most_common())
    )
    labelled = [(r["labelled_topic"], top_topic(r, topics)) for r in sink if "labelled_topic" in r]
    if labelled:
        agree = sum(a == b for a, b in labelled)
        print(f"  same as the labelled topic: {agree} of {len(labelled)} "
              "(labelled texts are the heads' training data: expect most)")  # fmt: skip
    scores = [s for s in map(spam, sink) if s is not None]
    flagged = sum(s >= SPAM_THRESHOLD for s in scores)
    print(f"spam (p >= {SPAM_THRESHOLD}): {flagged} of {len(scores)} posts with a text")
    marked = [(bool(r["labelled_spam"]), (spam(r) or 0.0) >= SPAM_THRESHOLD)
              for r in sink if "labelled_spam" in r]  # fmt: skip
    if marked:
        print(f"  labelled spam: {sum(m for m, _ in marked)}; flagged and labelled spam: "
              f"{sum(m and f for m, f in marked)}")  # fmt: skip
    if not all(len(np.asarray(r.get("embedding", [])).reshape(-1)) == 896 for r in sink):
        problems.append("a sink record without the 896-wide fused embedding")

    print(f"\n{'id':<10} {'inputs':<11} {'top tag':<8} {'spam':>5}  labelled / drawn")
    for r in examples(sink):
        inputs = "+".join(k for k in ("image", "text") if f"{k}_embedding" in r)
        score = spam(r)
        about = [r["scene"]] if "scene" in r else []
        if "labelled_topic" in r:
            about.insert(0, r["labelled_topic"] + (" spam" if r.get("labelled_spam") else ""))
        print(f"{r.get('id')!s:<10} {inputs:<11} {top_topic(r, topics) or '-':<8} "
              f"{'-' if score is None else f'{score:.2f}':>5}  {' / '.join(about)}")  # fmt: skip
    for d in dead[:4]:
        print(f"dead letter: {json.dumps(d)[:160]}")
    return problems


def run_stream(command: list[str], timeout_s: float) -> int | None:
    """Run the job (its output on this terminal); None when it ran past ``timeout_s``."""
    print("\n$ dagserve", " ".join(command[3:]))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    # in this process group: Ctrl-C reaches it too; its JVM exits with it (PyFlink's gateway)
    process = subprocess.Popen(command, cwd=ROOT, env=env)
    try:
        return process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None
    finally:  # past the bound, or this demo interrupted: the job stops too
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--parallelism", type=int, default=1, help="the job's subtasks")
    parser.add_argument("--capacity", type=int, default=8, help="records in flight per task")
    parser.add_argument("--timeout-ms", type=int, default=30_000, help="each record's deadline")
    parser.add_argument("--timeout", type=float, default=600, help="the job's bound, seconds")
    args = parser.parse_args(argv)
    if not FLINK_PYTHON.exists():
        sys.exit(f"{FLINK_PYTHON} does not exist: `make stream-demo` installs it")
    build()
    source = write_stream()
    print(f"stream: {source} ({sum(1 for _ in source.open(encoding='utf-8'))} lines)")
    OUT.mkdir(parents=True, exist_ok=True)
    sink, dead = OUT / "sink.jsonl", OUT / "dead-letter.jsonl"
    for path in (sink, dead):
        path.unlink(missing_ok=True)
    with serve() as served:
        started = time.perf_counter()
        code = run_stream(stream_command(served.port, source, sink, dead, args), args.timeout)
        print(f"job ended in {time.perf_counter() - started:.1f} s "
              f"({'TIMED OUT' if code is None else f'exit status {code}'})")  # fmt: skip
    print(f"server stopped (exit code {served.exit_code})")
    problems = summarise(read_jsonl(sink), read_jsonl(dead), valid_ids(source))
    if code != 0:
        problems.append("the job failed" if code is not None else "the job timed out")
    if served.exit_code != 0:
        problems.append(f"the server exited with {served.exit_code}")
    for problem in problems:
        print(f"FAILED: {problem}")
    print(f"\n(sink: {sink}; dead letters: {dead})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
