"""Models from a registry (issue 13): ``models:/NAME@ALIAS`` against a real MLflow registry
(a sqlite store and a local artifact folder in tmp), and ``s3://`` against a real S3 endpoint
(moto's server, started on 127.0.0.1 port 0 as a process of its own).

The model is tests/pipelines/lifecycle's Factor (y = x * the number in its file): each version
registered holds another number, so every answer says which version served it.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from engine.errors import LifecycleError, RegistryError
from engine.runtime import registry
from engine.runtime.registry import MARKER, ModelResolver, parse_models_uri
from engine.transport.client import Client
from tests.engine.test_lifecycle import LIFECYCLE, Load, X
from tests.serving import serving, wait_until

needs_mlflow = pytest.mark.skipif(
    importlib.util.find_spec("mlflow") is None, reason="the registry extra is not installed"
)
needs_moto = pytest.mark.skipif(
    importlib.util.find_spec("moto") is None or importlib.util.find_spec("s3fs") is None,
    reason="moto[server] and s3fs are not installed",
)

#: a port nothing listens on: a registry or endpoint that cannot be reached
CLOSED = "http://127.0.0.1:9"


@pytest.fixture(autouse=True)
def _no_retries(monkeypatch):
    # an unreachable registry fails at once (MLflow retries HTTP for minutes by default)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")


def pipeline_file(folder: Path, model: str, name: str = "scale.yaml") -> Path:
    """Pipeline ``scale`` (version 1) whose node's ``model:`` is ``model``."""
    shutil.copy(LIFECYCLE / "factor.py", folder / "factor.py")
    text = (LIFECYCLE / "scale_v1.yaml").read_text().replace("factor_v1.txt", model)
    path = folder / name
    path.write_text(text)
    return path


def registry_info(server) -> set[tuple[str, ...]]:
    """The dagserve_model_registry_info series a scrape of ``server`` shows."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    text = generate_latest(server.engine.metrics.registry).decode()
    return {
        (s.labels["pipeline"], s.labels["version"], s.labels["model_uri"],
         s.labels["registry_version"])
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "dagserve_model_registry_info" and s.value == 1
    }  # fmt: skip


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """A registry with model ``factor``: version 1 holds 2, version 2 holds 3; champion -> 1."""
    folder = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    for version, factor in (("1", 2), ("2", 3)):
        model = folder / f"factor_{version}.txt"
        model.write_text(f"{factor}\n")
        alias = "champion" if version == "1" else None
        assert registry.register(uri, "factor", model, alias=alias) == version
    return uri


# -- what model: accepts --------------------------------------------------------------------


def test_models_uris_parse_and_validate_without_the_registry(tmp_path):
    uri = parse_models_uri("models:/encoder@champion/encoder.pt")
    assert (uri.name, uri.version, uri.alias, uri.inner) == (
        "encoder",
        None,
        "champion",
        "encoder.pt",
    )
    assert parse_models_uri("models:/encoder/3").version == "3"
    assert registry.is_remote("s3://bucket/model.pt")
    assert not registry.is_remote("model.pt")
    from engine.cli import main

    # validate checks the syntax only: no registry behind it (none is configured here)
    assert main(["validate", str(pipeline_file(tmp_path, "models:/factor@champion"))]) == 0
    bad = pipeline_file(tmp_path, "models:/factor", "bad.yaml")
    from dag.pipeline import load_pipelines

    _, errors = load_pipelines([bad])
    assert any("models:/NAME/VERSION or models:/NAME@ALIAS" in str(e) for e in errors), errors
    with pytest.raises(RegistryError, match="models:/factor: not a registry URI"):
        parse_models_uri("models:/factor")


def test_a_cut_download_never_looks_complete(tmp_path):
    resolver = ModelResolver(CLOSED, tmp_path / "cache")
    folder = tmp_path / "cache" / "uri" / "k"

    def half(into: Path) -> None:
        (into / "model.pt").write_bytes(b"x" * 50)  # the connection dropped half way

    with pytest.raises(RegistryError, match=r"s3://b/model.pt: download cut short: .*50 of 100"):
        resolver._fill("s3://b/model.pt", folder, half, {"model.pt": 100}, {})
    assert not folder.exists()
    assert list((tmp_path / "cache" / "uri").iterdir()) == []  # no temporary folder left

    def broken(into: Path) -> None:
        (into / "model.pt").write_bytes(b"x" * 10)
        raise ConnectionResetError("reset by peer")

    with pytest.raises(RegistryError, match=r"s3://b/model\.pt: download failed: ConnectionReset"):
        resolver._fill("s3://b/model.pt", folder, broken, None, {})
    assert not folder.exists()


def test_a_file_uri_is_copied_once_and_a_rewrite_is_another_copy(tmp_path):
    model = tmp_path / "m.txt"
    model.write_text("5\n")
    resolver = ModelResolver(CLOSED, tmp_path / "cache")
    first = resolver.resolve(model.as_uri())
    assert first.path.read_text() == "5\n"
    assert first.path != model
    assert resolver.resolve(model.as_uri()).folder == first.folder  # reused, not copied again
    model.write_text("6\n\n")
    second = resolver.resolve(model.as_uri())
    assert second.folder != first.folder
    assert second.path.read_text() == "6\n\n"
    assert resolver.clean(keep=[second.folder]) == [first.folder]


# -- the registry -----------------------------------------------------------------------------


@needs_mlflow
@pytest.mark.slow
def test_aliases_versions_and_failures_resolve_with_their_messages(store, tmp_path):
    resolver = ModelResolver(store, tmp_path / "cache")
    champion = resolver.resolve("models:/factor@champion")
    assert champion.version == "1"
    assert champion.path.read_text() == "2\n"
    assert resolver.resolve("models:/factor/2").path.read_text() == "3\n"
    inner = resolver.resolve("models:/factor/2/factor_2.txt")
    assert inner.path == resolver.resolve("models:/factor/2").path
    marker = json.loads((champion.folder / MARKER).read_text())
    assert marker["version"] == "1"
    assert marker["bytes"] == 2
    failures = {
        "models:/nope@champion": "models:/nope@champion: not in the registry .*nope",
        "models:/factor/9": r"models:/factor/9: not in the registry .*version=9",
        "models:/factor@nope": "models:/factor@nope: not in the registry .*alias nope",
        "models:/factor/1/missing.pt": "models:/factor/1/missing.pt: no 'missing.pt' in",
    }
    for uri, message in failures.items():
        with pytest.raises(RegistryError, match=message):
            resolver.resolve(uri)
    with pytest.raises(RegistryError, match=f"models:/factor@champion: unreachable .*{CLOSED}"):
        ModelResolver(CLOSED, tmp_path / "cache").resolve("models:/factor@champion")
    # a version in the cache is served without asking the registry (here: none reachable)
    offline = ModelResolver(CLOSED, tmp_path / "cache")
    assert offline.resolve("models:/factor/2").path.read_text() == "3\n"
    assert offline.resolve("models:/factor@champion", pinned="1").path.read_text() == "2\n"
    assert offline.registry_calls == 0


@needs_mlflow
@pytest.mark.slow
def test_models_cli_registers_moves_aliases_and_lists(store, tmp_path, capsys):
    from engine.cli import main

    model = tmp_path / "saved_model"
    (model / "variables").mkdir(parents=True)
    (model / "saved_model.pb").write_bytes(b"p" * 10)
    (model / "variables" / "data").write_bytes(b"d" * 5)
    assert main(["models", "--registry-uri", store, "register", "folder", str(model)]) == 0
    assert capsys.readouterr().out.strip() == "1"
    assert main(["models", "--registry-uri", store, "alias", "folder", "prod", "1"]) == 0
    assert main(["models", "--registry-uri", store, "list", "folder"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert re.match(r"folder\s+1\s+prod\s+15\s", rows[-1]), rows
    assert main(["models", "--registry-uri", store, "alias", "folder", "prod", "7"]) == 1
    assert "models:/folder/7: not in the registry" in capsys.readouterr().err
    folder = ModelResolver(store, tmp_path / "cache").resolve("models:/folder@prod").path
    assert (folder / "variables" / "data").read_bytes() == b"d" * 5


@needs_mlflow
@pytest.mark.e2e
def test_the_watcher_rolls_back_an_alias_moved_back_right_after_an_admin_reload(store, tmp_path):
    # The admin API reloads onto version 2 and the alias goes back to 1 before the watcher
    # polls: the watcher must compare with what serves (2), not with what it last saw (1).
    path = pipeline_file(tmp_path, "models:/factor@champion")
    registry.set_alias(store, "factor", "champion", "1")
    config = {"registry_uri": store, "model_cache_dir": tmp_path / "cache"}
    with serving([path], watch=True, watch_interval_s=1.0, **config) as server:
        key = "registry.scale:1 models:/factor@champion"
        registry.set_alias(store, "factor", "champion", "2")
        server.run(server.engine.lifecycle.reload("scale", "1"))
        assert server.engine.health().details[key].startswith("version=2 ")
        registry.set_alias(store, "factor", "champion", "1")
        wait_until(
            lambda: server.engine.health().details[key].startswith("version=1 "),
            "the watcher's rollback after an admin reload", 30,
        )  # fmt: skip


@needs_mlflow
@pytest.mark.e2e
def test_moving_an_alias_rolls_out_under_load_and_a_restart_keeps_the_version(store, tmp_path):
    path = pipeline_file(tmp_path, "models:/factor@champion")
    cache, state = tmp_path / "cache", tmp_path / "state.json"
    registry.set_alias(store, "factor", "champion", "1")
    config = {"registry_uri": store, "model_cache_dir": cache, "state_file": state}
    with serving([path], watch=True, watch_interval_s=0.3, **config) as server:
        health = server.engine.health().details
        assert health["registry.scale:1 models:/factor@champion"].startswith("version=1 ")
        with Load(server.port) as load:
            load.phase = "v1"
            load.wait("v1", 100)
            load.phase = "changing"
            registry.set_alias(store, "factor", "champion", "2")  # promote
            server.run(server.engine.lifecycle.reload("scale", "1"))
            load.phase = "promoted"
            load.wait("promoted", 100)
            assert registry_info(server) == {("scale", "1", "models:/factor@champion", "2")}
            load.phase = "changing"
            registry.set_alias(store, "factor", "champion", "1")  # roll back: --watch sees it
            wait_until(lambda: load.answers[-1][2] == 2.0, "the watcher's rollback", 60)
            load.phase = "rolled back"
            load.wait("rolled back", 100)
        assert load.failures == []
        assert load.wrong == []
        assert set(load.at("v1")) == set(load.at("rolled back")) == {("1", 2.0)}
        assert set(load.at("promoted")) == {("1", 3.0)}
        assert load.at("changing")
        pins = json.loads(state.read_text())["pipelines"]["scale"]["models"]
        assert pins == {"1": {"models:/factor@champion": "1"}}
    # The alias moves while the server is down; the registry is then out of reach: the
    # restart serves the pinned version from the cache and asks the registry nothing.
    registry.set_alias(store, "factor", "champion", "2")
    offline = {**config, "registry_uri": CLOSED}
    with serving([path], **offline) as server:
        assert registry.resolver().registry_calls == 0
        with Client("127.0.0.1", server.port) as client:
            assert float(client.infer("scale", {"x": X}).outputs["y"][0, 0]) == 2.0
        # the unused version's folder was cleaned at startup, the one serving kept
        assert sorted(p.name for p in (cache / "registry" / "factor").iterdir()) == ["1"]
        # an operator's reload asks the alias: unreachable, and the old version keeps serving
        with pytest.raises(
            LifecycleError, match=f"models:/factor@champion: unreachable .*{CLOSED}"
        ):
            server.run(server.engine.lifecycle.reload("scale", "1"))
        with Client("127.0.0.1", server.port) as client:
            assert float(client.infer("scale", {"x": X}).outputs["y"][0, 0]) == 2.0


@needs_mlflow
@pytest.mark.e2e
def test_a_variant_names_the_challenger_while_the_node_names_the_champion(store, tmp_path):
    registry.set_alias(store, "factor", "champion", "1")
    registry.set_alias(store, "factor", "challenger", "2")
    path = pipeline_file(tmp_path, "models:/factor@champion")
    text = path.read_text().replace(
        "    inputs: {x: $inputs.x}",
        "    inputs: {x: $inputs.x}\n    variants:\n"
        '      challenger: {model: "models:/factor@challenger", weight: 100}',
    )
    path.write_text(text)
    with serving([path], registry_uri=store, model_cache_dir=tmp_path / "cache") as server:
        with Client("127.0.0.1", server.port) as client:
            assert float(client.infer("scale", {"x": X}).outputs["y"][0, 0]) == 3.0
        details = server.engine.health().details
        assert details["registry.scale:1 models:/factor@champion"].startswith("version=1 ")
        assert details["registry.scale:1 models:/factor@challenger"].startswith("version=2 ")


# -- object storage ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A real S3 endpoint (moto's server process) on 127.0.0.1, port 0; yields its URL."""
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while (match := re.search(r"http://127\.0\.0\.1:(\d+)", log.read_text())) is None:
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        yield f"http://127.0.0.1:{match[1]}"
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture
def bucket(s3, monkeypatch):
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": s3,
    }.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    import boto3
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # no s3fs made for another endpoint
    client = boto3.client("s3", endpoint_url=s3)
    client.create_bucket(Bucket="models")
    client.put_object(Bucket="models", Key="factor/factor.txt", Body=b"4\n")
    client.put_object(Bucket="models", Key="enc/a.bin", Body=b"a" * 7)
    client.put_object(Bucket="models", Key="enc/sub/b.bin", Body=b"b" * 3)
    return client


@needs_moto
@pytest.mark.e2e
def test_s3_model_files_load_and_failures_name_the_uri(bucket, tmp_path, monkeypatch):
    import s3fs

    path = pipeline_file(tmp_path, "s3://models/factor/factor.txt")
    with serving([path], model_cache_dir=tmp_path / "cache") as server:
        with Client("127.0.0.1", server.port) as client:
            y = client.infer("scale", {"x": X}).outputs["y"]
        assert np.array_equal(y, X * np.float32(4))
        details = server.engine.health().details
        assert "registry.scale:1 s3://models/factor/factor.txt" in details
    resolver = ModelResolver(CLOSED, tmp_path / "cache")
    folder = resolver.resolve("s3://models/enc").path
    assert Counter(p.relative_to(folder).as_posix() for p in folder.rglob("*.bin")) == {
        "a.bin": 1, "sub/b.bin": 1,
    }  # fmt: skip
    with pytest.raises(RegistryError, match=r"s3://models/nope\.pt: not found"):
        resolver.resolve("s3://models/nope.pt")
    with pytest.raises(RegistryError, match=r"s3://no-such-bucket/m\.pt: not found"):
        resolver.resolve("s3://no-such-bucket/m.pt")
    # an endpoint that does not answer (one attempt: botocore would retry for seconds)
    monkeypatch.setenv("AWS_ENDPOINT_URL", CLOSED)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(RegistryError, match=r"s3://models/factor/factor\.txt: unreachable: "):
        ModelResolver(CLOSED, tmp_path / "other").resolve("s3://models/factor/factor.txt")
    # with a copy in the cache (a restart), the copy serves while the store is down
    cached = ModelResolver(CLOSED, tmp_path / "cache").resolve("s3://models/factor/factor.txt")
    assert cached.path.read_text() == "4\n"
