"""Models from a registry or an object store: what a node's ``model:`` may name besides a file.

``model:`` is one of

- a local path, relative to the pipeline file (as always);
- ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` in an MLflow model registry, optionally
  followed by a path inside the version (``models:/encoder@champion/encoder.pt``);
- any URI an installed fsspec filesystem handles (``s3://``, ``gs://``, ``https://``,
  ``file://``).

It is resolved once per pipeline object, in the server process, into a local path: plugins
still receive ``LoadContext.model_path`` as a ``Path``.  An alias is resolved to a version
first; a version is downloaded once into ``model_cache_dir`` (``registry/NAME/VERSION``, or
``uri/<hash of the URI and its etag or size>`` for fsspec URIs): into a temporary folder that
is renamed when complete, with a marker (:data:`MARKER`) that records the version, the files and
their total size, so that a cut download never looks complete.  A version in the cache is
used without asking the registry again (versions are immutable); an alias is asked each time a
pipeline object is read (startup, ``reload``), unless the lifecycle state file pinned it
(:attr:`ModelResolver.pins`): a restart serves the versions that served before it.

A version of a single file (``dagserve models register NAME model.pt``), named without a
path inside it, resolves to that file, so a plugin that reads a file keeps working.

The registry is MLflow's (``mlflow-skinny``, the extra ``registry``), imported only when a
``models:/`` URI is resolved.  The tracking URI comes from ``registry_uri`` (server config),
else ``MLFLOW_TRACKING_URI``, else an embedded sqlite store with a local artifact folder
(:func:`default_tracking_uri`): one machine needs no registry server.  MLflow's usage telemetry
is turned off (``MLFLOW_DISABLE_TELEMETRY``, ``DO_NOT_TRACK``) before it is imported.

Every failure (unknown name, version or alias; a registry or bucket that cannot be reached; a
download cut short) raises :class:`~engine.errors.RegistryError` naming the URI and the cause.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.errors import RegistryError

if TYPE_CHECKING:
    from dag.pipeline import Pipeline

logger = logging.getLogger(__name__)

#: ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``, then an optional path inside the version
MODELS_URI = re.compile(
    r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[A-Za-z0-9_\-]+))"
    r"(?:/(?P<inner>.+))?$"
)
#: a URI for fsspec: a scheme, then ``://``
FSSPEC_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://.+")
#: the file in a cache folder that says its download completed (and what it holds)
MARKER = ".dagserve-complete.json"
#: the experiment that holds the logged models registered through ``dagserve models``
EXPERIMENT = "dagserve-models"
#: temporary download folders older than this are removed by :meth:`ModelResolver.clean`
STALE_TMP_S = 3600.0

# MLflow reads these when it is imported: no usage telemetry from a model server.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")


@dataclass(frozen=True)
class ModelUri:
    """A parsed ``models:/`` URI."""

    text: str
    name: str
    version: str | None
    alias: str | None
    inner: str | None


def parse_models_uri(text: str) -> ModelUri:
    """Parse ``models:/NAME/VERSION[/path]`` or ``models:/NAME@ALIAS[/path]``.

    Raises:
        RegistryError: the text starts with ``models:`` but is neither form.
    """
    match = MODELS_URI.match(text)
    if match is None:
        msg = f"{text}: not a registry URI: expected models:/NAME/VERSION or models:/NAME@ALIAS"
        raise RegistryError(msg)
    return ModelUri(text, match["name"], match["version"], match["alias"], match["inner"])


def is_remote(text: str) -> bool:
    """Whether ``model:`` names a registry model or a URI rather than a local path."""
    return text.startswith("models:") or FSSPEC_URI.match(text) is not None


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/dagserve/models``, else ``~/.cache/dagserve/models``."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(root) / "dagserve" / "models"


def default_tracking_uri() -> str:
    """The embedded store: sqlite in ``$XDG_DATA_HOME/dagserve/registry`` (else
    ``~/.local/share/dagserve/registry``), artifacts beside it."""
    root = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return f"sqlite:///{Path(root) / 'dagserve' / 'registry' / 'mlflow.db'}"


@dataclass(frozen=True)
class Resolved:
    """What a ``model:`` became: the local path, and the registry version that it is."""

    uri: str
    path: Path
    #: the registry version (``models:/``), or the etag or size of an fsspec object
    version: str | None = None
    #: the cache folder holding it (None: a local path)
    folder: Path | None = None


@dataclass
class _Entry:
    """The resolutions of one pipeline object (one read of its YAML)."""

    name: str
    version: str
    models: dict[str, Resolved] = field(default_factory=dict)


class ModelResolver:
    """Resolves ``model:`` strings to local paths; one per server process (:func:`resolver`).

    Args:
        tracking_uri: the MLflow tracking (and registry) URI; None: ``MLFLOW_TRACKING_URI``,
            else :func:`default_tracking_uri`.
        cache_dir: where downloads go; None: :func:`default_cache_dir`.
    """

    def __init__(self, tracking_uri: str | None = None, cache_dir: Path | None = None) -> None:
        self._tracking_uri = tracking_uri
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        #: (pipeline, version, uri) -> the registry version its alias resolved to; written to
        #: and read from the lifecycle state file, so that a restart serves the same versions
        self.pins: dict[tuple[str, str, str], str] = {}
        self._pipelines: weakref.WeakKeyDictionary[Pipeline, _Entry] = weakref.WeakKeyDictionary()
        self._lock = threading.RLock()
        self._client_lock = threading.Lock()
        self._client: Any = None
        #: calls made to the registry (tests read it: a pinned version asks nothing)
        self.registry_calls = 0

    @property
    def tracking_uri(self) -> str:
        return self._tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()

    # -- resolving --------------------------------------------------------------------------

    def model_path(self, pipeline: Pipeline, text: str) -> Path:
        """The local path of ``model:`` text ``text`` of one of ``pipeline``'s nodes.

        The first call for a pipeline object resolves (and downloads); later ones, for the
        same object, answer the same path: planning and serving a version see one model.
        """
        base = pipeline.path.parent.resolve() if pipeline.path else Path.cwd()
        if not is_remote(text):
            return (base / text).resolve()
        key = (pipeline.name, pipeline.version, text)
        with self._lock:
            entry = self._pipelines.get(pipeline)
            if entry is None:
                entry = self._pipelines[pipeline] = _Entry(pipeline.name, pipeline.version)
            found = entry.models.get(text)
            pin = self.pins.get(key)
        if found is not None:
            return found.path
        # Downloads run without the lock: health (on the event loop) reads the resolutions.
        resolved = self.resolve(text, pinned=pin)
        with self._lock:
            found = entry.models.setdefault(text, resolved)
            if text.startswith("models:") and found.version is not None:
                self.pins[key] = found.version
        return found.path

    def prepare(self, pipeline: Pipeline) -> None:
        """Resolve (and download) every model of ``pipeline`` now: call it in a thread, so
        that planning on the event loop finds everything in place."""
        from engine.runtime.variants import node_arms

        for _, _, _, node, _ in node_arms(pipeline):
            if node.model is not None:
                self.model_path(pipeline, node.model)

    def resolutions(self, pipeline: Pipeline) -> dict[str, Resolved]:
        """What the remote ``model:`` texts of ``pipeline`` resolved to (none resolved: {})."""
        with self._lock:
            entry = self._pipelines.get(pipeline)
            return dict(entry.models) if entry is not None else {}

    def unpin(self, name: str, version: str) -> dict[tuple[str, str, str], str]:
        """Forget the pins of a pipeline version (a reload asks the aliases again); returns
        them, to put back if the reload fails."""
        with self._lock:
            dropped = {k: v for k, v in self.pins.items() if k[:2] == (name, version)}
            for key in dropped:
                del self.pins[key]
            return dropped

    def resolve(self, text: str, *, pinned: str | None = None) -> Resolved:
        """Resolve one remote ``model:`` (``pinned``: the version an alias stands for).

        Raises:
            RegistryError: unknown name, version or alias; registry or store unreachable;
                download cut short.
        """
        if text.startswith("models:"):
            return self._resolve_registry(parse_models_uri(text), pinned)
        return self._resolve_fsspec(text)

    def alias_version(self, name: str, alias: str, *, uri: str | None = None) -> str:
        """The version an alias points to now (asks the registry)."""
        client = self.client()
        self.registry_calls += 1
        with _mapped(uri or f"models:/{name}@{alias}", self.tracking_uri):
            return str(client.get_model_version_by_alias(name, alias).version)

    def _resolve_registry(self, uri: ModelUri, pinned: str | None) -> Resolved:
        version = uri.version or pinned
        if version is None:
            assert uri.alias is not None
            version = self.alias_version(uri.name, uri.alias, uri=uri.text)
        if not version.isdigit():  # a state file edited by hand: never a path outside the cache
            msg = f"{uri.text}: version {version!r} is not a registry version number"
            raise RegistryError(msg)
        folder = self.cache_dir / "registry" / _safe(uri.name) / version
        if _complete(folder) is None:
            self._download_version(uri, version, folder)
        else:
            logger.debug("%s: version %s from the cache %s", uri.text, version, folder)
        path = _inside(folder, uri.inner, uri.text)
        if uri.alias is not None:
            logger.info("model %s is version %s (%s)", uri.text, version, path)
        return Resolved(uri.text, path, version, folder)

    def _download_version(self, uri: ModelUri, version: str, folder: Path) -> None:
        import mlflow.artifacts

        client = self.client()
        self.registry_calls += 1
        with _mapped(uri.text, self.tracking_uri):
            source = client.get_model_version_download_uri(uri.name, version)
            expected = _artifact_sizes(mlflow.artifacts, source, self.tracking_uri)

            def fetch(into: Path) -> None:
                mlflow.artifacts.download_artifacts(
                    artifact_uri=source, dst_path=str(into), tracking_uri=self.tracking_uri
                )

            self._fill(uri.text, folder, fetch, expected, {"version": version, "source": source})

    def _resolve_fsspec(self, text: str) -> Resolved:
        fs, path = _filesystem(text)
        name = path.rstrip("/").rsplit("/", 1)[-1] or "model"
        # uri/<hash of the URI>-<hash of its etag, size and mtime>: a rewrite is another folder
        prefix = hashlib.sha256(text.encode()).hexdigest()[:16]
        try:
            with _mapped(text, None):
                info = fs.info(path)
        except RegistryError as exc:
            cached = _newest(self.cache_dir / "uri", prefix)
            if cached is None or "unreachable" not in exc.message:
                raise
            # the store is down: the copy a restart had is served (as a pinned version is)
            logger.warning("%s; serving the copy cached in %s", exc.message, cached)
            marker = _complete(cached) or {}
            return Resolved(text, cached / "files" / name, marker.get("version"), cached)
        tag = str(info.get("ETag") or info.get("etag") or info.get("md5") or "")
        stamp = f"{tag}|{info.get('size')}|{info.get('mtime') or info.get('LastModified') or ''}"
        folder = (
            self.cache_dir / "uri" / f"{prefix}-{hashlib.sha256(stamp.encode()).hexdigest()[:16]}"
        )
        if _complete(folder) is None:
            is_dir = info.get("type") == "directory"
            size = info.get("size")
            # a server that sends no length (some https ones) is checked by the marker only
            expected = _fs_sizes(fs, path) if is_dir else None if size is None else {name: size}

            def fetch(into: Path) -> None:
                target = into / name
                with _mapped(text, None):
                    fs.get(path, str(target), recursive=is_dir)

            self._fill(text, folder, fetch, expected, {"version": tag or None, "source": text})
        return Resolved(text, folder / "files" / name, tag or str(info.get("size")), folder)

    def _fill(
        self,
        uri: str,
        folder: Path,
        fetch: Any,
        expected: dict[str, int] | None,
        about: dict[str, Any],
    ) -> None:
        """Download into a temporary folder beside ``folder``; check the files against
        ``expected`` (relative path -> size); write the marker; rename into place."""
        folder.parent.mkdir(parents=True, exist_ok=True)
        temporary = folder.parent / f".tmp-{folder.name}-{uuid.uuid4().hex[:8]}"
        files = temporary / "files"
        try:
            files.mkdir(parents=True)
            started = time.monotonic()
            fetch(files)
            got = _local_sizes(files)
            if expected is not None:
                _check(uri, expected, got)
            marker = {**about, "uri": uri, "files": got, "bytes": sum(got.values())}
            (temporary / MARKER).write_text(json.dumps(marker, indent=1), encoding="utf-8")
            if folder.exists() and _complete(folder) is None:
                shutil.rmtree(folder, ignore_errors=True)  # a cache folder since damaged
            try:
                os.rename(temporary, folder)
            except OSError:
                if _complete(folder) is None:  # not another process that finished first
                    raise
            logger.info(
                "%s: downloaded %d bytes into %s in %.1f s", uri, marker["bytes"], folder,
                time.monotonic() - started,
            )  # fmt: skip
        except RegistryError:
            raise
        except OSError as exc:
            msg = f"{uri}: download failed: {type(exc).__name__}: {exc}"
            raise RegistryError(msg) from exc
        finally:
            shutil.rmtree(temporary, ignore_errors=True)

    # -- the cache ----------------------------------------------------------------------------

    def in_use(self) -> set[Path]:
        """The cache folders of every pipeline object resolved and alive."""
        with self._lock:
            return {
                r.folder
                for entry in list(self._pipelines.values())
                for r in entry.models.values()
                if r.folder is not None
            }

    def clean(self, keep: Iterable[Path] = ()) -> list[Path]:
        """Remove the cache folders that no pipeline in this process uses (nor ``keep``),
        and temporary folders of downloads cut long ago; returns what was removed."""
        keep_set = {Path(p) for p in keep} | self.in_use()
        if not keep_set:  # a server with no remote model leaves the cache to those with some
            return []
        removed: list[Path] = []
        for folder in _cache_folders(self.cache_dir):
            if folder in keep_set:
                continue
            if folder.name.startswith(".tmp-"):
                with contextlib.suppress(OSError):
                    if time.time() - folder.stat().st_mtime < STALE_TMP_S:
                        continue  # maybe another server's download in progress
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
        if removed:
            logger.info(
                "model cache: removed %d unused folder(s) from %s", len(removed), self.cache_dir
            )
        return removed

    # -- the registry -------------------------------------------------------------------------

    def client(self) -> Any:
        """An ``MlflowClient`` on :attr:`tracking_uri` (made once)."""
        with self._client_lock:  # not self._lock: importing MLflow takes seconds
            if self._client is None or self._client.tracking_uri != self.tracking_uri:
                self._client = mlflow_client(self.tracking_uri)
            return self._client

    def details(self, pipelines: Iterable[Pipeline]) -> dict[str, str]:
        """Entries for ``health``: ``registry.NAME:VERSION model:`` -> the version serving."""
        found = {}
        for pipeline in pipelines:
            for text, r in self.resolutions(pipeline).items():
                key = f"registry.{pipeline.name}:{pipeline.version} {text}"
                found[key] = f"version={r.version} path={r.path}"
        return found


def mlflow_client(tracking_uri: str) -> Any:
    """An ``MlflowClient`` for ``tracking_uri`` (registry on the same URI).

    Raises:
        RegistryError: MLflow is not installed (``pip install dagserve[registry]``).
    """
    try:
        from mlflow.tracking import MlflowClient
    except ImportError as exc:
        msg = (
            f"a models:/ URI needs MLflow: pip install 'dagserve[registry]' ({exc}); "
            f"tracking URI {tracking_uri}"
        )
        raise RegistryError(msg) from exc
    if tracking_uri.startswith("sqlite:///"):
        Path(tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    with _mapped(f"registry {tracking_uri}", tracking_uri):
        return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def artifact_root(tracking_uri: str) -> str | None:
    """Where the embedded (sqlite) store keeps artifacts: a folder beside the database."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        return (db.parent / "artifacts").resolve().as_uri()
    return None


# -- what ``dagserve models`` does ----------------------------------------------------------


@dataclass(frozen=True)
class VersionRow:
    """One registered version, as ``dagserve models list`` prints it."""

    name: str
    version: str
    aliases: tuple[str, ...]
    #: total bytes of its files (recorded when registered through dagserve; None: unknown)
    size: int | None
    source: str


def register(tracking_uri: str, name: str, path: Path, *, alias: str | None = None) -> str:
    """Store a file or folder as the artifacts of a logged model and register it as the next
    version of ``name`` (created if new); returns the version.  Any model format works (a
    TorchScript file, a SavedModel folder, a Paddle model): MLflow keeps the files as they are.

    Raises:
        RegistryError: no such path, or the registry refused (the message says why).
    """
    path = Path(path)
    if not path.exists():
        msg = f"{path}: no such file or folder to register as {name!r}"
        raise RegistryError(msg)
    size = sum(_local_sizes(path).values()) if path.is_dir() else path.stat().st_size
    client = mlflow_client(tracking_uri)
    with _mapped(f"models:/{name}", tracking_uri):
        experiment = client.get_experiment_by_name(EXPERIMENT)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            experiment_id = client.create_experiment(
                EXPERIMENT, artifact_location=artifact_root(tracking_uri)
            )
        logged = client.create_logged_model(experiment_id, name=name)
        if path.is_dir():
            client.log_model_artifacts(logged.model_id, str(path))
        else:
            client.log_model_artifact(logged.model_id, str(path))
        client.finalize_logged_model(logged.model_id, "READY")
        try:
            client.get_registered_model(name)
        except Exception:  # not registered yet
            client.create_registered_model(name)
        version = client.create_model_version(
            # model_id is left out: MLflow would look it up through its default tracking
            # URI, not this client's; the tag links the logged model instead
            name, source=logged.artifact_location,
            tags={"dagserve.bytes": str(size), "dagserve.logged_model": logged.model_id},
        )  # fmt: skip
        if alias is not None:
            client.set_registered_model_alias(name, alias, version.version)
    return str(version.version)


def set_alias(tracking_uri: str, name: str, alias: str, version: str) -> None:
    """Point ``alias`` of ``name`` at ``version`` (a server following it reloads on ``reload``
    or ``--watch``).

    Raises:
        RegistryError: unknown name or version.
    """
    client = mlflow_client(tracking_uri)
    with _mapped(f"models:/{name}/{version}", tracking_uri):
        client.get_model_version(name, version)  # refuse an unknown version by name
        client.set_registered_model_alias(name, alias, version)


def list_versions(tracking_uri: str, name: str | None = None) -> list[VersionRow]:
    """Every version of ``name`` (or of every registered model), oldest first."""
    client = mlflow_client(tracking_uri)
    rows = []
    with _mapped(f"models:/{name or ''}", tracking_uri):
        names = [name] if name else [m.name for m in client.search_registered_models()]
        for model_name in sorted(names):
            aliases: dict[str, list[str]] = {}
            for alias, version in client.get_registered_model(model_name).aliases.items():
                aliases.setdefault(str(version), []).append(alias)
            versions = client.search_model_versions(f"name='{model_name}'")
            for v in sorted(versions, key=lambda v: int(v.version)):
                size = (v.tags or {}).get("dagserve.bytes")
                rows.append(
                    VersionRow(
                        model_name, str(v.version), tuple(sorted(aliases.get(str(v.version), []))),
                        int(size) if size is not None else None, v.source,
                    )
                )  # fmt: skip
    return rows


# -- the process's resolver -----------------------------------------------------------------

_resolver = ModelResolver()


def resolver() -> ModelResolver:
    """The resolver of this process (:func:`configure` sets it up from the server config)."""
    return _resolver


def configure(tracking_uri: str | None = None, cache_dir: Path | None = None) -> ModelResolver:
    """Set the process's tracking URI and cache folder (``registry_uri``, ``model_cache_dir``)."""
    global _resolver
    _resolver = ModelResolver(tracking_uri, cache_dir)
    return _resolver


# -- helpers --------------------------------------------------------------------------------


@contextlib.contextmanager
def _mapped(uri: str, tracking_uri: str | None) -> Iterator[None]:
    """Re-raise MLflow's, fsspec's and the network's errors as :class:`RegistryError`."""
    try:
        yield
    except RegistryError:
        raise
    except FileNotFoundError as exc:
        msg = f"{uri}: not found: {exc}"
        raise RegistryError(msg) from exc
    except Exception as exc:
        code = getattr(exc, "error_code", None)
        where = f" (registry {tracking_uri})" if tracking_uri else ""
        text = getattr(exc, "message", None) or str(exc)
        if code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            msg = f"{uri}: not in the registry{where}: {text}"
        elif isinstance(exc, (ConnectionError, TimeoutError, OSError)) or "connect" in text.lower():
            msg = f"{uri}: unreachable{where}: {type(exc).__name__}: {text}"
        else:
            msg = f"{uri}: {type(exc).__name__}{where}: {text}"
        raise RegistryError(msg) from exc


def _filesystem(text: str) -> tuple[Any, str]:
    try:
        import fsspec
    except ImportError as exc:  # pragma: no cover - fsspec comes with the registry extra
        msg = f"{text}: a URI needs fsspec: pip install 'dagserve[registry]'"
        raise RegistryError(msg) from exc
    with _mapped(text, None):
        fs, path = fsspec.core.url_to_fs(text)
    return fs, path


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", name)


def _complete(folder: Path) -> dict[str, Any] | None:
    """The marker of a complete download whose files are all there, else None."""
    try:
        marker: Any = json.loads((folder / MARKER).read_text(encoding="utf-8"))
        files = marker.get("files") if isinstance(marker, dict) else None
        if not isinstance(files, dict) or _local_sizes(folder / "files") != files:
            return None
    except (OSError, ValueError):
        return None
    return dict(marker)


def _newest(folder: Path, prefix: str) -> Path | None:
    """The most recent complete cache folder of one URI (``PREFIX-*``), if any."""
    found = [p for p in folder.glob(f"{prefix}-*") if _complete(p) is not None]
    return max(found, key=lambda p: (p / MARKER).stat().st_mtime, default=None)


def _local_sizes(root: Path) -> dict[str, int]:
    sizes = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = Path(folder) / name
            sizes[path.relative_to(root).as_posix()] = path.stat().st_size
    return sizes


def _check(uri: str, expected: dict[str, int], got: dict[str, int]) -> None:
    missing = sorted(set(expected) - set(got))
    short = sorted(f for f in expected if f in got and got[f] != expected[f])
    if missing or short:
        what = [f"{f} missing" for f in missing[:5]]
        what += [f"{f}: {got[f]} of {expected[f]} bytes" for f in short[:5]]
        msg = f"{uri}: download cut short: {'; '.join(what)}"
        raise RegistryError(msg)


def _inside(folder: Path, inner: str | None, uri: str) -> Path:
    """The path a plugin gets: the path inside the version, or its only file, or its folder."""
    files = folder / "files"
    top = sorted(files.iterdir())
    # download_artifacts puts the artifact folder's contents in a folder named after it
    root = top[0] if len(top) == 1 and top[0].is_dir() else files
    if inner is not None:
        path = (root / inner).resolve()
        if not path.exists() or not path.is_relative_to(root.resolve()):
            names = ", ".join(sorted(_local_sizes(root))[:10])
            msg = f"{uri}: no {inner!r} in the version (it holds: {names})"
            raise RegistryError(msg)
        return path
    inside = list(root.iterdir())
    if len(inside) == 1 and inside[0].is_file():
        return inside[0]
    return root


def _artifact_sizes(artifacts: Any, source: str, tracking_uri: str) -> dict[str, int] | None:
    """Relative path -> size of every artifact under ``source`` (None: sizes unknown)."""
    sizes: dict[str, int] = {}
    base = source.rstrip("/").rsplit("/", 1)[-1]

    def walk(prefix: str) -> None:
        for info in artifacts.list_artifacts(
            artifact_uri=f"{source.rstrip('/')}/{prefix}" if prefix else source,
            tracking_uri=tracking_uri,
        ):
            rel = f"{prefix}/{Path(info.path).name}" if prefix else Path(info.path).name
            if info.is_dir:
                walk(rel)
            elif info.file_size is not None:
                sizes[f"{base}/{rel}"] = int(info.file_size)

    try:
        walk("")
    except Exception:  # a store that cannot list: checked by the marker only
        return None
    return sizes or None


def _fs_sizes(fs: Any, path: str) -> dict[str, int]:
    name = path.rstrip("/").rsplit("/", 1)[-1]
    sizes = {}
    for full, info in fs.find(path, detail=True).items():
        rel = full[len(path.rstrip("/")) :].lstrip("/")
        sizes[f"{name}/{rel}"] = int(info.get("size") or 0)
    return sizes


def _cache_folders(cache_dir: Path) -> list[Path]:
    """The version folders of the cache (``registry/NAME/VERSION``, ``uri/KEY``) and
    temporary download folders."""
    found: list[Path] = []
    registry = cache_dir / "registry"
    for name in registry.iterdir() if registry.is_dir() else ():
        if name.is_dir():
            found.extend(v for v in name.iterdir() if v.is_dir())
    uris = cache_dir / "uri"
    found.extend(v for v in (uris.iterdir() if uris.is_dir() else ()) if v.is_dir())
    return found


__all__ = [
    "MARKER",
    "ModelResolver",
    "ModelUri",
    "Resolved",
    "VersionRow",
    "artifact_root",
    "configure",
    "default_cache_dir",
    "default_tracking_uri",
    "is_remote",
    "list_versions",
    "mlflow_client",
    "parse_models_uri",
    "register",
    "resolver",
    "set_alias",
]
