"""What a worker was doing when it died, and so which of its calls killed it.

Several calls run in one worker at once (each model instance has its own thread), so when the
worker dies the parent must tell the call that crashed it from its neighbours.  Two records,
both in files the parent creates before it spawns the worker, survive the death:

* **the call table**: a small file that the worker maps (``mmap``) with one slot per thread
  that runs plugin code.  A slot holds the ident of that thread and the correlation id of the
  call it runs, 0 when idle: two stores into shared memory per call, no message.
* **the crash dump**: ``faulthandler`` writes, on SIGSEGV, SIGABRT, SIGBUS, SIGFPE or SIGILL,
  the Python stack of every thread, naming the faulting one ``Current thread 0x...``
  (:class:`CrashDump` keeps it in front of the handlers a framework installs).

After the death the parent reads both (:meth:`FlightRecord.read`) and judges each call that was
in flight (:meth:`Postmortem.is_culprit`):

* a dump names the faulting thread: the call running on that thread is the culprit; every
  other call (running elsewhere, or only queued) is innocent;
* no dump, or one that names no thread of ours (SIGKILL, the OOM killer, the supervisor's
  memory limit, a crash on a framework's own thread): every call that was running is a
  suspect and fails; calls that had not started are innocent.
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import mmap
import os
import re
import shutil
import signal
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

#: slots in the call table: threads that may run plugin code in one worker at once
SLOTS = 1024
#: a slot is two unsigned 64-bit words: thread ident, correlation id (0: idle)
_SLOT_WORDS = 2
_TABLE_BYTES = SLOTS * _SLOT_WORDS * 8
#: how faulthandler names the thread that received the fatal signal
_CURRENT_THREAD = re.compile(rb"^Current thread 0x([0-9a-fA-F]+)", re.MULTILINE)
#: the signals faulthandler dumps on
_FATAL = (signal.SIGSEGV, signal.SIGFPE, signal.SIGABRT, signal.SIGBUS, signal.SIGILL)
#: room for a C ``struct sigaction``, handled as opaque bytes (152 bytes on x86-64 glibc)
_SIGACTION_BYTES = 1024


class CallTable:
    """The worker's side of the call table: which call each thread runs now.

    ``claim`` a slot for a thread that will run plugin code (an instance's thread, or the
    thread that loads a model); ``begin``/``end`` around each call on it.
    """

    def __init__(self, path: str) -> None:
        fd = os.open(path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, _TABLE_BYTES)
        finally:
            os.close(fd)
        self._words = memoryview(self._map).cast("Q")
        self._free = list(range(SLOTS - 1, -1, -1))
        self._lock = threading.Lock()

    def claim(self) -> int:
        """A free slot.

        Raises:
            RuntimeError: every slot is taken (more than ``SLOTS`` instances in one worker).
        """
        with self._lock:
            if not self._free:
                msg = f"a worker runs at most {SLOTS} model instances"
                raise RuntimeError(msg)
            return self._free.pop()

    def release(self, slot: int) -> None:
        self.end(slot)
        with self._lock:
            self._free.append(slot)

    def begin(self, slot: int, message_id: int) -> None:
        """The calling thread starts running call ``message_id``."""
        self._words[slot * _SLOT_WORDS] = threading.get_ident()
        self._words[slot * _SLOT_WORDS + 1] = message_id

    def end(self, slot: int) -> None:
        self._words[slot * _SLOT_WORDS + 1] = 0


class CrashDump:
    """The worker's side of the crash dump: ``faulthandler`` on the crash file, first in line.

    A framework may install fatal-signal handlers of its own when it is imported (Paddle does,
    to print its C++ stack): call :meth:`rearm` after each model load.  It puts faulthandler
    back in front and keeps the framework's handler behind it, so that a crash writes both.
    """

    def __init__(self, file: IO[str]) -> None:
        self.file = file
        faulthandler.enable(file, all_threads=True)
        self._libc: ctypes.CDLL | None = None
        with contextlib.suppress(OSError):
            self._libc = ctypes.CDLL(None, use_errno=True)
        self._ours = {sig: self._handler(sig) for sig in _FATAL}

    def rearm(self) -> None:
        """Put faulthandler in front again if a handler replaced it (chaining to that one)."""
        replaced = {
            sig: action
            for sig in _FATAL
            if (action := self._action(sig)) is None or self._handler(sig) != self._ours[sig]
        }
        if not replaced:
            return
        # disable() restores what was there before the first enable(); reinstall the
        # framework's handlers so that enable() records them as the ones to call next.
        faulthandler.disable()
        for sig, action in replaced.items():
            if action is not None and self._libc is not None:
                self._libc.sigaction(int(sig), action, None)
        faulthandler.enable(self.file, all_threads=True)

    def _action(self, sig: int) -> ctypes.Array[ctypes.c_char] | None:
        if self._libc is None:
            return None
        action = ctypes.create_string_buffer(_SIGACTION_BYTES)
        if self._libc.sigaction(int(sig), None, action) != 0:
            return None
        return action

    def _handler(self, sig: int) -> bytes | None:
        # the handler's address leads a struct sigaction
        action = self._action(sig)
        return action.raw[: ctypes.sizeof(ctypes.c_void_p)] if action is not None else None


@dataclass(frozen=True)
class Postmortem:
    """What one dead worker left behind."""

    running: dict[int, int] = field(default_factory=dict)
    """Correlation id -> ident of the thread that was running it at the death."""
    faulting_thread: int | None = None
    """The thread the crash dump names as current; None without a dump naming one."""
    dump: str = ""
    """The crash dump as written (empty without one)."""

    def head(self) -> str:
        """The dump's error line and the faulting thread's stack (the dump lists every thread,
        in any order); empty without a dump."""
        blocks = self.dump.strip().split("\n\n")
        current = [b for b in blocks[1:] if b.startswith("Current thread")]
        return "\n\n".join(blocks[:1] + (current or blocks[1:2])).strip()

    def is_culprit(self, message_id: int) -> bool:
        """Whether call ``message_id`` may have killed the worker (it then must not be retried)."""
        thread = self.running.get(message_id)
        if thread is None:
            return False  # it never started: it cannot have crashed anything
        if self.faulting_thread is None:
            return True  # nothing says which thread faulted: every running call is a suspect
        return thread == self.faulting_thread


class FlightRecord:
    """The parent's side: the two files of one worker process, and reading them after its death."""

    def __init__(self, name: str) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix=f"dagserve-{name.replace('/', '_')}-"))
        self.calls_path = self.directory / "calls"
        self.crash_path = self.directory / "crash"
        self.calls_path.write_bytes(bytes(_TABLE_BYTES))
        self.crash_path.write_bytes(b"")

    def paths(self) -> tuple[str, str]:
        """The call table's and the crash file's paths, as the worker takes them."""
        return str(self.calls_path), str(self.crash_path)

    def read(self) -> Postmortem:
        """Read both records (once the worker is dead; reading earlier gives a snapshot)."""
        try:
            table = memoryview(self.calls_path.read_bytes()).cast("Q")
            dump = self.crash_path.read_bytes()
        except (OSError, TypeError):
            return Postmortem()
        running = {
            table[i + 1]: table[i] for i in range(0, len(table), _SLOT_WORDS) if table[i + 1]
        }
        match = _CURRENT_THREAD.search(dump)
        thread = int(match.group(1), 16) if match else None
        return Postmortem(running, thread, dump.decode("utf-8", "replace"))

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def discard(calls_path: str, crash_path: str) -> None:
    """The worker's side of :meth:`FlightRecord.remove`, for an orderly end: after a shutdown,
    or when the parent is gone (killed, it could not remove them), nobody will read them."""
    shutil.rmtree(Path(calls_path).parent, ignore_errors=True)


__all__ = ["SLOTS", "CallTable", "CrashDump", "FlightRecord", "Postmortem", "discard"]
