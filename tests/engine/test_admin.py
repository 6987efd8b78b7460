"""The admin service: tokens, who may reach the port, TLS, error mapping, the inference port's
refusal of admin methods, and ``--watch``.

Transport, auth and watcher rules are tested against ``FakeLifecycle``
(tests/engine/fake_lifecycle.py); the ``real`` tests serve a real engine and its lifecycle.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
from thriftpy2.thrift import TApplicationException

from engine.config import ServerConfig, TlsConfig
from engine.errors import ApplicationError, ClientConnectionError, ConfigError
from engine.runtime.watch import Watcher, changed_files, fingerprint, model_paths
from engine.tools.ports import free_port
from engine.transport.admin import AdminHandler, admin_server
from engine.transport.admin_client import AdminClient, AdminRefused, AdminUnauthorized
from engine.transport.client import tls_context
from idl import admin_thrift
from model_plugins.errors import DagserveError
from tests.engine.fake_lifecycle import FakeLifecycle, FakeState, admin_serving
from tests.engine.test_tls import pki  # noqa: F401 (a fixture)
from tests.serving import PIPELINES, serving

TOKEN = "s3cret-token"


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "admin.token"
    path.write_text(TOKEN + "\n")
    return path


# --- the handler, without a socket ---------------------------------------------------------


async def test_a_wrong_or_missing_token_is_unauthorized_and_not_logged(caplog):
    handler = AdminHandler(FakeLifecycle(), TOKEN)
    caplog.set_level(logging.WARNING, logger="engine.transport.admin")
    for token in (None, "", "s3cret-tokeX", TOKEN + "x"):
        with pytest.raises(admin_thrift.Unauthorized) as caught:
            await handler.list_versions(token)
        assert (vars(caught.value), caught.value.args) == ({}, ())  # no detail
    assert len(caplog.records) == 4
    assert "s3cret" not in caplog.text
    assert [v.version for v in await handler.list_versions(TOKEN)] == ["1"]


async def test_without_a_token_file_any_token_is_accepted():
    handler = AdminHandler(FakeLifecycle())
    assert len(await handler.list_versions("")) == 1
    assert len(await handler.list_versions("whatever")) == 1


async def test_refusals_become_admin_errors_with_their_message():
    handler = AdminHandler(FakeLifecycle())
    with pytest.raises(admin_thrift.AdminError, match="refused: broken 1 is broken"):
        await handler.reload("", "broken", "1", False)
    with pytest.raises(admin_thrift.AdminError, match="internal error: RuntimeError"):
        await handler.unload("", "crash", "1")
    with pytest.raises(admin_thrift.AdminError, match="path of a pipeline file is missing"):
        await handler.load("", "")


async def test_version_info_carries_every_field():
    handler = AdminHandler(FakeLifecycle())
    info = (await handler.list_versions(""))[0]
    assert (info.pipeline, info.version, info.state, info.weight) == ("calc", "1", "ready", 1.0)
    assert (info.shadow, info.sticky_header, info.inflight) == (False, None, 0)
    assert (info.path, info.models, info.why) == ("/srv/calc.yaml", ["calc/double"], None)
    assert info.variants == {
        "double": admin_thrift.NodeVariants(weights={"fast": 10.0}, own_weight=90.0, shadow="next")
    }


async def test_variants_checks_the_token_and_refusals_become_admin_errors():
    lifecycle = FakeLifecycle()
    handler = AdminHandler(lifecycle, TOKEN)
    with pytest.raises(admin_thrift.Unauthorized):
        await handler.variants("", "calc", "1", "double", {"fast": 50.0})
    assert lifecycle.calls == []
    info = await handler.variants(TOKEN, "calc", "1", "double", {"fast": 50.0})
    assert (info.variants["double"].weights, info.variants["double"].own_weight) == (
        {"fast": 50.0}, 50.0,
    )  # fmt: skip
    assert lifecycle.calls == [("variants", "calc", "1", "double", {"fast": 50.0})]
    with pytest.raises(admin_thrift.AdminError, match="no node 'post' with variants"):
        await handler.variants(TOKEN, "calc", "1", "post", {"fast": 1.0})
    # a version without variants sends none (the field is optional, not an empty map)
    lifecycle.states["calc", "2"] = FakeState("calc", "2")
    assert (await handler.list_versions(TOKEN))[1].variants is None


# --- who may reach the port (config) -------------------------------------------------------


def test_a_non_loopback_admin_port_needs_a_token_or_client_certificates(token_file: Path):
    open_config = ServerConfig(host="0.0.0.0", admin_port=0)
    with pytest.raises(ConfigError, match="not loopback, needs admin_token_file"):
        admin_server(open_config, FakeLifecycle())
    guarded = ServerConfig(host="0.0.0.0", admin_port=0, admin_token_file=token_file)
    assert admin_server(guarded, FakeLifecycle()).port == 0  # built, not started
    for host in ("127.0.0.1", "localhost", "::1"):
        assert admin_server(ServerConfig(host=host, admin_port=0), FakeLifecycle()) is not None


def test_bad_admin_settings_are_config_errors(tmp_path: Path):
    with pytest.raises(ConfigError, match="need tls"):
        admin_server(ServerConfig(admin_port=0, admin_require_client_cert=True), FakeLifecycle())
    empty = tmp_path / "empty.token"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        admin_server(ServerConfig(admin_port=0, admin_token_file=empty), FakeLifecycle())
    with pytest.raises(ConfigError, match="cannot read"):
        admin_server(
            ServerConfig(admin_port=0, admin_token_file=tmp_path / "missing"), FakeLifecycle()
        )


def test_admin_paths_are_relative_to_the_config_file(tmp_path: Path):
    from engine.config import load_config

    (tmp_path / "server.yaml").write_text(
        "pipelines: []\nadmin_port: 0\nadmin_token_file: secrets/admin.token\nwatch: true\n"
    )
    config = load_config(tmp_path / "server.yaml")
    assert config.admin_token_file == tmp_path / "secrets" / "admin.token"
    assert (config.admin_port, config.watch, config.watch_interval_s) == (0, True, 2.0)


# --- over a socket (a real admin ThriftServer, a fake lifecycle) -----------------------------


@pytest.mark.e2e
def test_no_token_wrong_token_right_token_over_the_wire(token_file: Path):
    lifecycle = FakeLifecycle()
    with admin_serving(lifecycle, admin_token_file=token_file) as admin:
        for token in ("", "wrong"):
            client = AdminClient("127.0.0.1", admin.port, token=token, timeout_s=5)
            with pytest.raises(AdminUnauthorized):
                client.list_versions()
            with pytest.raises(AdminUnauthorized):
                client.unload("calc", "1")
            with pytest.raises(AdminUnauthorized):
                client.variants("calc", "1", "double", {"fast": 1})
        assert lifecycle.calls == []  # nothing reached the lifecycle
        client = AdminClient("127.0.0.1", admin.port, token=TOKEN, timeout_s=5)
        assert [v.version for v in client.list_versions()] == ["1"]
        loaded = client.load("/srv/calc_v2.yaml")
        assert (loaded.pipeline, loaded.version, loaded.weight) == ("calc", "2", 0.0)
        split = client.traffic("calc", {"1": 9, "2": 1}, shadow="2", sticky_header="x-user")
        assert {v.version: round(v.weight, 3) for v in split} == {"1": 0.9, "2": 0.1}
        assert [v.shadow for v in split] == [False, True]
        double = client.variants("calc", "1", "double", {"fast": 25}).variants["double"]
        assert (double.weights, double.own_weight, double.shadow) == ({"fast": 25.0}, 75.0, "next")
        assert client.reload("calc", "2", in_place=True).version == "2"
        client.unload("calc", "1")
        assert lifecycle.calls[-2:] == [("reload", "calc", "2", True), ("unload", "calc", "1")]
        with pytest.raises(AdminRefused, match="no version '1'"):
            client.unload("calc", "1")
        # a refusal leaves the server answering
        assert [v.version for v in client.list_versions()] == ["2"]


@pytest.mark.e2e
def test_inference_port_refuses_admin_methods_and_a_disabled_admin_port_is_closed():
    with serving([PIPELINES / "calc.yaml"]) as server:
        assert server.server.admin_port is None
        on_inference = AdminClient("127.0.0.1", server.port, timeout_s=5)
        with pytest.raises(ApplicationError, match="unknown method 'list_versions'") as caught:
            on_inference.list_versions()
        assert caught.value.kind == TApplicationException.UNKNOWN_METHOD
        with pytest.raises(ApplicationError, match="unknown method 'unload'"):
            on_inference.unload("calc", "1")
        nowhere = AdminClient("127.0.0.1", free_port(), timeout_s=5)
        with pytest.raises(ClientConnectionError, match="connect failed"):
            nowhere.list_versions()
        # and the inference port still serves
        assert server.engine.find("calc").pipeline.name == "calc"


@pytest.mark.e2e
@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_admin_port_speaks_tls_and_can_require_a_client_certificate(pki: Path):  # noqa: F811
    tls = TlsConfig(certfile=pki / "server.pem", keyfile=pki / "server.key")
    lifecycle = FakeLifecycle()
    with admin_serving(
        lifecycle, tls=tls, admin_require_client_cert=True, admin_client_ca=pki / "ca.pem"
    ) as admin:
        certified = tls_context(
            str(pki / "ca.pem"), str(pki / "client.pem"), str(pki / "client.key")
        )
        client = AdminClient("127.0.0.1", admin.port, ssl_context=certified, timeout_s=5)
        assert [v.version for v in client.list_versions()] == ["1"]
        anonymous = tls_context(str(pki / "ca.pem"))
        for context in (anonymous, None):  # TLS without a certificate; plain TCP
            refused = AdminClient("127.0.0.1", admin.port, ssl_context=context, timeout_s=5)
            with pytest.raises(ClientConnectionError):
                refused.list_versions()
        assert [v.version for v in client.list_versions()] == ["1"]


# --- the watcher (a fake lifecycle, real files) ----------------------------------------------


class _Watched(FakeLifecycle):
    """Serves the versions of real files; a reload re-reads the file and fails on 'broken'."""

    def __init__(self, files: dict[tuple[str, str], Path]) -> None:
        super().__init__()
        self.states = {key: FakeState(*key, path=str(path)) for key, path in files.items()}

    async def reload(self, name, version, *, in_place=False):
        self.calls.append(("reload", name, version, in_place))
        if "broken" in Path(self.states[name, version].path).read_text():  # noqa: ASYNC240
            raise DagserveError(f"{self.states[name, version].path}: line 1: broken")
        return self.states[name, version]


def _touch(path: Path, text: str) -> None:
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    import os

    os.utime(path, ns=(before + 10**9, before + 10**9))  # a new mtime even on coarse clocks


async def test_watch_reloads_a_changed_file_once_it_held_still(tmp_path: Path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "w.npy").write_bytes(b"1")
    a = tmp_path / "a.yaml"
    a.write_text("name: a\nnodes:\n  n: {plugin: p, model: models/w.npy}\n")
    b = tmp_path / "b.yaml"
    b.write_text("name: b\nnodes:\n  n: {plugin: p, model: models}\n")
    lifecycle = _Watched({("a", "1"): a, ("b", "1"): b})
    watcher = Watcher(lifecycle, interval_s=0.01)
    assert model_paths(a) == [tmp_path / "models" / "w.npy"]
    assert await watcher.poll() == []  # first sight: what is serving
    _touch(a, a.read_text() + "# edited\n")
    assert await watcher.poll() == []  # changed: wait one interval
    _touch(a, a.read_text() + "# edited again\n")
    assert await watcher.poll() == []  # still moving
    assert await watcher.poll() == [("a", "1")]  # held still: reloaded
    assert await watcher.poll() == []
    # a model file shared by both versions (b names its folder): both reload
    _touch(tmp_path / "models" / "w.npy", "22")
    await watcher.poll()
    assert sorted(await watcher.poll()) == [("a", "1"), ("b", "1")]
    assert watcher.reloads == 3


async def test_watch_logs_a_broken_file_and_keeps_the_old_version(tmp_path: Path, caplog):
    a = tmp_path / "a.yaml"
    a.write_text("name: a\n")
    lifecycle = _Watched({("a", "1"): a})
    watcher = Watcher(lifecycle, interval_s=0.01)
    await watcher.poll()
    _touch(a, "name: a\nbroken: [\n")
    caplog.set_level(logging.ERROR, logger="engine.runtime.watch")
    await watcher.poll()
    assert await watcher.poll() == []
    assert watcher.failures == 1
    assert f"a version 1 not reloaded after a change to {a}" in caplog.text
    assert "line 1: broken" in caplog.text
    for _ in range(3):  # not retried while the file stays as it is
        await watcher.poll()
    assert [c[0] for c in lifecycle.calls] == ["reload"]
    _touch(a, "name: a\n# fixed\n")
    await watcher.poll()
    assert await watcher.poll() == [("a", "1")]


def test_fingerprint_sees_size_mtime_and_missing_files(tmp_path: Path):
    a = tmp_path / "a.yaml"
    a.write_text("nodes:\n  n: {plugin: p, model: gone.pt, variants: {c: {model: v.pt}}}\n")
    (tmp_path / "v.pt").write_bytes(b"x")
    before = fingerprint(a)
    assert before[str(tmp_path / "gone.pt")] is None
    (tmp_path / "gone.pt").write_bytes(b"now here")
    assert changed_files(before, fingerprint(a)) == [str(tmp_path / "gone.pt")]


@pytest.mark.e2e
def test_serve_watch_reloads_a_changed_model_file_and_ignores_a_broken_yaml(tmp_path: Path):
    import os

    import numpy as np

    from engine.transport.client import Client
    from tests.serving import wait_until

    np.save(tmp_path / "w.npy", np.array([1, 1], np.float32))
    pipeline = tmp_path / "scale.yaml"
    good = (
        'name: scale\nversion: "1"\ninputs:\n  x: {dtype: float32, shape: [2]}\n'
        "nodes:\n  scale:\n    plugin: tests.plugins:Weights\n    runner: thread\n"
        "    model: w.npy\n    inputs: {x: $inputs.x}\noutputs:\n  y: scale.y\n"
    )
    pipeline.write_text(good)
    x = {"x": np.ones((1, 2), np.float32)}
    with (
        serving([pipeline], watch=True, watch_interval_s=0.05) as server,
        Client("127.0.0.1", server.port) as client,
    ):
        watcher = server.server.watcher

        def served() -> float:
            return float(client.infer("scale", x).outputs["y"][0, 0])

        assert served() == 1.0
        np.save(tmp_path / "w.npy", np.array([2, 2], np.float32))
        os.utime(tmp_path / "w.npy", ns=(10**18, 10**18))  # a new mtime even on coarse clocks
        wait_until(lambda: served() == 2.0, "the changed model file served", timeout_s=20)
        wait_until(lambda: watcher.reloads == 1, "the reload counted", timeout_s=20)
        pipeline.write_text(good.replace("nodes:", "nodes: [broken"))
        wait_until(lambda: watcher.failures == 1, "the broken file refused", timeout_s=20)
        assert served() == 2.0  # the old version keeps serving
        assert [v.state for v in server.engine.lifecycle.versions()] == ["ready"]
