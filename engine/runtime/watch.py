"""``dagserve serve --watch``: reload a pipeline version when its files (or aliases) change.

Every ``interval_s`` the :class:`Watcher` takes a fingerprint (modification time and size) of
each served version's YAML file and of the model files and folders its nodes name (``model:``,
and a variant's ``model:``), relative to the YAML as the loader reads them.  A version whose
fingerprint changed, and then stayed the same for one more interval (an editor or a copy that
writes in several steps is not caught halfway), is reloaded through the engine's lifecycle
(``engine.lifecycle.reload``: blue/green, so requests keep being answered).  A node whose
``model:`` is ``models:/NAME@ALIAS`` adds the version the alias points to: moving the alias in
the registry rolls the version out (``engine.runtime.registry``).

A reload that fails (a broken YAML, a model file that does not load) is logged with the files
that changed and the error, and not retried until the files change again: the old version
keeps serving.  Polling, not inotify: it works the same on every file system (NFS and
container volumes included), and a few hundred ``stat`` calls per interval cost nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import yaml

from engine.runtime.registry import MODELS_URI, is_remote, resolver
from model_plugins.errors import DagserveError

logger = logging.getLogger(__name__)

#: file -> (mtime_ns, size), or None where the file is missing
Fingerprint = Mapping[str, tuple[int, int] | None]


class Reloadable(Protocol):
    """What the watcher needs of ``engine.lifecycle`` (``engine/runtime/lifecycle.py``)."""

    def versions(self) -> Sequence[Any]: ...

    async def reload(self, name: str, version: str, *, in_place: bool = False) -> Any: ...


def model_paths(pipeline_file: Path) -> list[Path]:
    """The model files and folders that the nodes of ``pipeline_file`` name (none if the
    file cannot be read or parsed: the reload will say what is wrong with it)."""
    try:
        data: Any = yaml.safe_load(pipeline_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return []
    nodes = data.get("nodes") if isinstance(data, dict) else None
    if not isinstance(nodes, dict):
        return []
    return [pipeline_file.parent / m for m in _models(nodes) if not is_remote(m)]


def _models(nodes: dict[Any, Any]) -> list[str]:
    """The ``model:`` texts of the nodes and their variants."""
    found: list[str] = []
    for node in nodes.values():
        if not isinstance(node, dict):
            continue
        variants = node.get("variants")
        entries = [node, *(variants.values() if isinstance(variants, dict) else [])]
        for entry in entries:
            model = entry.get("model") if isinstance(entry, dict) else None
            if isinstance(model, str) and model:
                found.append(model)
    return found


def alias_versions(pipeline_file: Path) -> dict[str, tuple[int, int] | None]:
    """``models:/NAME@ALIAS`` -> (the version it points to now, 0), for each alias the file
    names (asked of the registry: a moved alias changes the fingerprint); None where the
    registry cannot say (the reload would fail the same way)."""
    try:
        data: Any = yaml.safe_load(pipeline_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    nodes = data.get("nodes") if isinstance(data, dict) else None
    found: dict[str, tuple[int, int] | None] = {}
    for model in _models(nodes) if isinstance(nodes, dict) else []:
        match = MODELS_URI.match(model)
        if match is None or match["alias"] is None:
            continue
        try:
            version = resolver().alias_version(match["name"], match["alias"], uri=model)
            found[model] = (int(version), 0)
        except (DagserveError, ValueError):
            found[model] = None
    return found


def fingerprint(pipeline_file: Path) -> dict[str, tuple[int, int] | None]:
    """The fingerprint of a pipeline file and of every model file (or folder's file) it names."""
    result: dict[str, tuple[int, int] | None] = {}
    for path in [pipeline_file, *model_paths(pipeline_file)]:
        if path.is_dir():
            for folder, _, names in os.walk(path):
                for name in names:
                    _stat_into(result, Path(folder) / name)
        else:
            _stat_into(result, path)
    result.update(alias_versions(pipeline_file))
    return result


def _stat_into(result: dict[str, tuple[int, int] | None], path: Path) -> None:
    try:
        stat = path.stat()
    except OSError:
        result[str(path)] = None
        return
    result[str(path)] = (stat.st_mtime_ns, stat.st_size)


def changed_files(before: Fingerprint, after: Fingerprint) -> list[str]:
    """The files whose fingerprint differs (added, removed or modified), sorted."""
    return sorted(f for f in set(before) | set(after) if before.get(f) != after.get(f))


class Watcher:
    """Polls the files of every served version and reloads a version whose files changed.

    Args:
        lifecycle: the engine's lifecycle (``versions()`` and ``reload()``).
        interval_s: the polling period; a change is acted on once it has been stable for
            one period, so between one and two periods after it ends.
    """

    def __init__(self, lifecycle: Reloadable, interval_s: float = 2.0) -> None:
        if interval_s <= 0:
            msg = f"interval_s must be > 0 (got {interval_s})"
            raise ValueError(msg)
        self.lifecycle = lifecycle
        self.interval_s = interval_s
        #: (pipeline, version) -> the fingerprint its serving version was (re)loaded from
        self._applied: dict[tuple[str, str], Fingerprint] = {}
        #: (pipeline, version) -> a changed fingerprint seen at the last poll, not yet acted on
        self._pending: dict[tuple[str, str], Fingerprint] = {}
        self._task: asyncio.Task[None] | None = None
        #: reloads done and failed since start (tests and the log read them)
        self.reloads = 0
        self.failures = 0

    async def start(self) -> None:
        """Take the first fingerprints now, then poll in a task of its own."""
        if self._task is not None:
            return
        await self.poll()
        self._task = asyncio.create_task(self._run(), name="dagserve-watch")
        logger.info("watching the pipeline and model files every %.3g s", self.interval_s)

    async def aclose(self) -> None:
        """Stop polling (a reload in progress is cancelled with the task)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.poll()
            except Exception:  # the watcher must outlive any one bad poll
                logger.exception("watch: a poll failed")

    async def poll(self) -> list[tuple[str, str]]:
        """One round: reload the versions whose files changed and then held still; returns
        the (pipeline, version) pairs it reloaded."""
        versions = self.lifecycle.versions()
        # A version loading, draining or failed is left alone (and keeps its fingerprint).
        watched = {
            (s.pipeline, s.version): Path(s.path)
            for s in versions
            if s.path is not None and s.state == "ready"
        }
        for gone in set(self._applied) - {(s.pipeline, s.version) for s in versions}:
            self._applied.pop(gone, None)
            self._pending.pop(gone, None)
        prints = await asyncio.to_thread(_fingerprints, watched.items())
        reloaded: list[tuple[str, str]] = []
        for key, now in prints.items():
            # first sight: what is serving; its aliases as the serving version resolved them
            # (a reload by the admin API moves them without telling the watcher)
            applied = _as_pinned(self._applied.setdefault(key, now), key)
            if now == applied:
                self._pending.pop(key, None)
            elif self._pending.get(key) != now:
                self._pending[key] = now  # changed: act once it holds still for an interval
            else:
                del self._pending[key]
                # Remembered even if the reload fails: a broken file is not retried until it
                # changes again.
                self._applied[key] = now
                if await self._reload(key, watched[key], changed_files(applied, now)):
                    reloaded.append(key)
        return reloaded

    async def _reload(self, key: tuple[str, str], path: Path, files: list[str]) -> bool:
        name, version = key
        try:
            await self.lifecycle.reload(name, version)
        except DagserveError as exc:
            self.failures += 1
            logger.error(
                "watch: %s version %s not reloaded after a change to %s (the old version keeps "
                "serving): %s", name, version, ", ".join(files), exc,
            )  # fmt: skip
            return False
        except Exception:
            self.failures += 1
            logger.exception(
                "watch: %s version %s not reloaded after a change to %s", name, version,
                ", ".join(files),
            )  # fmt: skip
            return False
        self.reloads += 1
        logger.info(
            "watch: reloaded %s version %s (%s changed; from %s)",
            name, version, ", ".join(files), path,
        )  # fmt: skip
        return True


def _as_pinned(applied: Fingerprint, key: tuple[str, str]) -> Fingerprint:
    """``applied`` with each ``models:/NAME@ALIAS`` at the registry version the serving
    version of ``key`` was loaded with (the resolver's pins), where one is known."""
    pins = resolver().pins
    pinned = {
        uri: (int(pins[(*key, uri)]), 0)
        for uri in applied
        if (*key, uri) in pins and str(pins[(*key, uri)]).isdigit()
    }
    return {**applied, **pinned} if pinned else applied


def _fingerprints(
    watched: Iterable[tuple[tuple[str, str], Path]],
) -> dict[tuple[str, str], Fingerprint]:
    return {key: fingerprint(path) for key, path in watched}


__all__ = ["Fingerprint", "Reloadable", "Watcher", "changed_files", "fingerprint", "model_paths"]
