"""Telling the call that crashed a worker from its neighbours, on real crashes of a child."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading

import pytest

from model_plugins._host.postmortem import CallTable, FlightRecord, Postmortem
from tests.serving import ROOT

# A child that runs call 1 on one thread and call 2 on another, then dies as told.
CHILD = """
import faulthandler, os, signal, sys, threading, time
from model_plugins._host.postmortem import CallTable
calls_path, crash_path, how = sys.argv[1:]
crash = open(crash_path, "w")
faulthandler.enable(crash, all_threads=True)
table = CallTable(calls_path)
started = threading.Barrier(3)
printing = threading.Lock()

def run(message_id, die):
    slot = table.claim()
    table.begin(slot, message_id)
    with printing:
        print(message_id, threading.get_ident(), flush=True)
    started.wait()
    if die:
        time.sleep(0.1)
        os.abort() if how == "abort" else os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(30)

threading.Thread(target=run, args=(1, False), daemon=True).start()
threading.Thread(target=run, args=(2, True), daemon=True).start()
started.wait()
time.sleep(30)
"""


def die(how: str) -> tuple[Postmortem, dict[int, int]]:
    """Run the child until it dies; what it left, and each call's thread as it printed it."""
    record = FlightRecord("test")
    try:
        child = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(CHILD), *record.paths(), how],
            cwd=ROOT, capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert child.returncode < 0, child.stderr
        threads = dict(map(int, line.split()) for line in child.stdout.split("\n") if line)
        return record.read(), threads
    finally:
        record.remove()


def test_the_call_table_says_which_call_runs_on_which_thread():
    record = FlightRecord("test")
    try:
        table = CallTable(str(record.calls_path))
        slot, other = table.claim(), table.claim()
        table.begin(slot, 7)
        table.begin(other, 8)
        table.end(other)
        assert record.read().running == {7: threading.get_ident()}
        table.release(slot)
        assert record.read().running == {}
    finally:
        record.remove()


def test_after_an_abort_only_the_call_on_the_faulting_thread_is_the_culprit():
    report, threads = die("abort")
    assert report.running == threads  # both calls were running
    assert report.faulting_thread == threads[2]
    assert "Aborted" in report.dump
    assert report.is_culprit(2)
    assert not report.is_culprit(1)  # running on another thread: innocent
    assert not report.is_culprit(3)  # never started: innocent


def test_without_a_dump_every_running_call_is_a_suspect():
    report, threads = die("kill")
    assert report.running == threads
    assert report.faulting_thread is None
    assert report.dump == ""
    assert report.is_culprit(1)
    assert report.is_culprit(2)
    assert not report.is_culprit(3)  # never started: innocent


# A child whose "framework" replaces the fatal-signal handler after the dump was enabled.
REPLACED = """
import os, signal, sys, threading
from model_plugins._host.postmortem import CrashDump
crash = CrashDump(open(sys.argv[1], "w"))
signal.signal(signal.SIGABRT, lambda *args: None)  # as Paddle does at import, in C
if sys.argv[2] == "rearm":
    crash.rearm()
thread = threading.Thread(target=os.abort)
thread.start()
thread.join()
"""


@pytest.mark.parametrize("rearm", [True, False])
def test_rearm_puts_the_dump_back_in_front_of_a_framework_handler(rearm):
    record = FlightRecord("test")
    try:
        child = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(REPLACED), str(record.crash_path),
             "rearm" if rearm else "no"],
            cwd=ROOT, capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert child.returncode == -signal.SIGABRT, child.stderr  # the handler behind it ran
        assert (record.read().faulting_thread is not None) == rearm
    finally:
        record.remove()
