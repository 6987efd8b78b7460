"""TLS on the Thrift port, and mutual TLS, with certificates the test makes (openssl)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from engine.config import TlsConfig
from engine.transport.client import AsyncClient, Client, tls_context
from tests.serving import PIPELINES, serving

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command"),
]

X = {"x": np.ones((1, 3), np.float32)}


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by it."""
    d = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
            "-keyout", "ca.key", "-out", "ca.pem", cwd=d)  # fmt: skip
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, ext in (("server", ["-extfile", "server.ext"]), ("client", [])):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)  # fmt: skip
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "2", "-out", f"{name}.pem", *ext, cwd=d)  # fmt: skip
    return d


def test_tls_round_trip_and_a_plain_client_is_refused(pki: Path):
    tls = TlsConfig(certfile=pki / "server.pem", keyfile=pki / "server.key")
    with serving([PIPELINES / "calc.yaml"], tls=tls) as server:
        context = tls_context(cafile=str(pki / "ca.pem"))
        with Client("127.0.0.1", server.port, ssl_context=context) as client:
            assert client.infer("calc", X).outputs["doubled"][0, 0] == 2
        with Client("127.0.0.1", server.port, timeout_s=5) as plain, pytest.raises(ConnectionError):
            plain.infer("calc", X)
        # a client that does not trust the server's CA refuses it
        wary = Client("127.0.0.1", server.port, ssl_context=tls_context())
        with wary, pytest.raises(ConnectionError):
            wary.infer("calc", X)
        # and the server keeps serving good clients
        with Client("127.0.0.1", server.port, ssl_context=context) as client:
            assert client.infer("calc", X).outputs["doubled"][0, 0] == 2


async def test_mutual_tls_requires_a_client_certificate(pki: Path):
    tls = TlsConfig(
        certfile=pki / "server.pem", keyfile=pki / "server.key",
        client_ca=pki / "ca.pem", require_client_cert=True,
    )  # fmt: skip
    with serving([PIPELINES / "calc.yaml"], tls=tls) as server:
        with_cert = tls_context(
            str(pki / "ca.pem"), str(pki / "client.pem"), str(pki / "client.key")
        )
        async with AsyncClient("127.0.0.1", server.port, ssl_context=with_cert) as client:
            result = await client.infer("calc", X)
        assert result.outputs["doubled"][0, 0] == 2
        without = tls_context(str(pki / "ca.pem"))
        anonymous = Client("127.0.0.1", server.port, ssl_context=without, timeout_s=5)
        with anonymous, pytest.raises(ConnectionError):  # ssl errors are mapped: one type
            anonymous.infer("calc", X)


def test_require_client_cert_without_a_ca_is_a_config_error(pki: Path):
    from engine.errors import ConfigError

    tls = TlsConfig(certfile=pki / "server.pem", keyfile=pki / "server.key",
                    require_client_cert=True)  # fmt: skip
    with pytest.raises(ConfigError, match="needs client_ca"):
        tls.server_context()
