"""The balancing client: ``Client(targets=...)`` and ``AsyncClient(targets=...)`` over real
servers (fake engines behind the real Thrift server, real pipelines, and one server in its own
process so that it can be SIGKILLed under load)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.config import TlsConfig
from engine.errors import ClientConnectionError
from engine.runtime.types import InferenceRequest, InferenceResult
from engine.tools.ports import free_port, wait_ready
from engine.transport.balancer import Balancer, Targets, parse_address
from engine.transport.client import AsyncClient, Client, tls_context
from model_plugins.errors import InferenceError, Overloaded
from tests.engine.fake_engine import FakeEngine, ServerThread
from tests.engine.fake_engine import serving as serving_fake
from tests.serving import PIPELINES, ROOT, serving, wait_until

X = {"x": np.array([[1.0, 2.0, 3.0]], np.float32)}


class Refusing(FakeEngine):
    """Answers every request with ``Overloaded`` (its queue is always full)."""

    async def infer(self, request: InferenceRequest) -> InferenceResult:
        self.requests.append(request)
        raise Overloaded("queue of 'echo' is full", retry_after_ms=400)


@pytest.fixture
def fakes() -> Iterator[list[ServerThread]]:
    with ExitStack() as stack:
        yield [stack.enter_context(serving_fake()) for _ in range(3)]


def call(client: Client) -> bool:
    return client.infer("echo", X).version == "1"


def target(server: ServerThread) -> str:
    return f"127.0.0.1:{server.port}"


# --- without a server ------------------------------------------------------------------------


def test_targets_are_parsed_and_bad_ones_named() -> None:
    assert parse_address("[::1]:9090") == ("::1", 9090)
    assert Targets.parse("dns:///dagserve.ml.svc:9090").dns == ("dagserve.ml.svc", 9090)
    assert Targets.parse(["a:1", "b:2", "a:1"]).addresses == (("a", 1), ("b", 2))
    for bad in ("nohost", "h:0", "h:http", ":9090", "dns:///name"):
        with pytest.raises(ValueError, match="must be 'host:port'"):
            Targets.parse(bad)
    with pytest.raises(ValueError, match="at least one"):
        Client(targets=[])


def test_two_choices_prefer_the_replica_with_fewer_calls_in_flight() -> None:
    balancer: Balancer[str] = Balancer(Targets.parse(["a:1", "b:1"]), lambda h, p: h, print)
    busy = balancer._pick(set())
    assert busy is not None
    # with two replicas both are always drawn: the idle one wins every time
    for _ in range(20):
        chosen = balancer._pick(set())
        assert chosen is not None
        assert chosen is not busy
        balancer._done(chosen)


def test_a_dns_answer_that_changes_is_followed_and_a_leaving_replica_closed_when_idle() -> None:
    closed: list[str] = []
    now = [0.0]
    balancer: Balancer[str] = Balancer(
        Targets.parse("dns:///svc:9"),
        lambda h, p: h,
        closed.append,
        resolve_interval_s=5,
        clock=lambda: now[0],
    )
    assert balancer.resolution_due()
    balancer.update([("a", 9), ("b", 9)])
    assert not balancer.resolution_due()  # not before the interval
    in_flight = balancer._pick({("b", 9)})
    assert in_flight is not None
    assert in_flight.client == "a"
    now[0] = 5.0
    assert balancer.resolution_due()
    balancer.update([("b", 9), ("c", 9)])
    assert set(balancer.replica_stats()) == {"a:9", "b:9", "c:9"}
    assert not balancer.replica_stats()["a:9"].listed
    assert balancer._pick({("b", 9), ("c", 9)}) is None  # a takes no new call
    balancer._done(in_flight)
    assert closed == ["a"]
    assert set(balancer.replica_stats()) == {"b:9", "c:9"}
    now[0] = 10.0
    assert balancer.resolution_due()
    balancer.update([])  # an empty answer keeps the last set
    assert set(balancer.replica_stats()) == {"b:9", "c:9"}


def test_an_ejection_backs_off_once_per_failure_not_once_per_call_in_flight() -> None:
    now = [0.0]
    balancer: Balancer[str] = Balancer(
        Targets.parse(["a:1", "b:1"]), lambda h, p: h, print, clock=lambda: now[0]
    )
    a = balancer._replicas[("a", 1)]
    for _ in range(6):  # six calls in flight lost together
        balancer.eject(a)
    assert a.ejected_until == 0.5
    assert balancer._pick(set()) is not a  # ejected: b takes the calls
    now[0] = 0.6
    assert balancer.needs_check(a)
    balancer.eject(a)  # its health check failed: twice as long
    assert a.ejected_until == 0.6 + 1.0
    balancer.checked(a)
    assert not balancer.needs_check(a)


# --- over fake engines behind real Thrift servers ----------------------------------------------


def test_load_is_spread_and_a_typed_error_is_not_retried(fakes: list[ServerThread]) -> None:
    with Client(targets=[target(s) for s in fakes], timeout_s=10) as client:
        for _ in range(60):
            client.infer("echo", X)
        counts = [len(s.engine.requests) for s in fakes]
        assert sum(counts) == 60
        assert min(counts) >= 10, counts
        stats = client.replica_stats()
        assert sorted(s.answered for s in stats.values()) == sorted(counts)
        with pytest.raises(InferenceError):
            client.infer("echo", X, headers={"raise": "inference"})
        # a typed error is an answer: counted, never retried
        assert sum(s.answered for s in client.replica_stats().values()) == 61
    assert sum(len(s.engine.requests) for s in fakes) == 61


class Dying:
    """A replica that dies during every call: reads the request, closes without an answer."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.calls = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return  # closed
            with connection:
                if connection.recv(65536):
                    self.calls += 1

    def close(self) -> None:
        self.listener.close()


def test_a_call_whose_replica_died_is_retried_once_with_what_is_left_of_its_deadline() -> None:
    first, second = Dying(), Dying()
    try:
        with serving_fake() as good:
            with Client(targets=[f"127.0.0.1:{first.port}", target(good)], timeout_s=10) as c:
                while first.calls == 0:  # until a call meets the dying replica first
                    c.infer("echo", X, timeout_ms=5000)
            retried = good.engine.requests[-1]
            assert retried.timeout_ms is not None
            assert retried.timeout_ms < 5000  # the rest of its deadline, not all of it again
            assert first.calls == 1

            async def answered_despite_the_death() -> None:
                targets = [f"127.0.0.1:{second.port}", target(good)]
                async with AsyncClient(targets=targets, timeout_s=10) as client:
                    while second.calls == 0:
                        await client.infer("echo", X)

            asyncio.run(answered_despite_the_death())
            assert second.calls == 1
        # died twice: the one retry is spent, the loss is raised
        dying = [f"127.0.0.1:{first.port}", f"127.0.0.1:{second.port}"]
        with (
            Client(targets=dying, timeout_s=10) as client,
            pytest.raises(ClientConnectionError, match="connection closed by the server"),
        ):
            client.infer("echo", X)
        assert first.calls + second.calls == 4

        async def main() -> None:  # the asyncio client alike
            async with AsyncClient(targets=dying, timeout_s=10) as client:
                with pytest.raises(ClientConnectionError):
                    await client.infer("echo", X)

        asyncio.run(main())
        assert first.calls + second.calls == 6
    finally:
        first.close()
        second.close()


def test_overloaded_moves_to_a_replica_with_room_else_is_raised() -> None:
    with serving_fake(Refusing()) as full, serving_fake() as free:
        with Client(targets=[target(full), target(free)], timeout_s=10) as client:
            for _ in range(20):
                assert client.infer("echo", X).version == "1"
            assert len(free.engine.requests) == 20
            stats = client.replica_stats()[target(full)]
            # the first refusal marks it busy for its retry_after_ms: then it is skipped
            assert stats.overloaded >= 1
            assert stats.overloaded == len(full.engine.requests)
        with Client(targets=[target(full)], timeout_s=10) as alone:
            with pytest.raises(Overloaded) as refused:
                alone.infer("echo", X)
            assert refused.value.retry_after_ms == 400


def test_a_replica_that_fails_is_ejected_and_comes_back_once_healthy(
    fakes: list[ServerThread],
) -> None:
    first, second = fakes[:2]
    with Client(targets=[target(first), target(second)], timeout_s=10) as client:
        assert client._balancer is not None
        ejected = client._balancer._replicas[("127.0.0.1", first.port)]
        first.engine.health_error = RuntimeError("not ready")
        client._balancer.eject(ejected)  # as a failed connection does
        assert client.replica_stats()[target(first)].ejected
        before = len(first.engine.requests)
        for _ in range(10):
            client.infer("echo", X)
        assert len(first.engine.requests) == before  # ejected: no call
        # due again after its backoff, it fails its health check: ejected for longer
        wait_until(lambda: not client.replica_stats()[target(first)].ejected, "backoff", 5)
        wait_until(
            lambda: call(client) and client.replica_stats()[target(first)].ejected,
            "the failed health check ejecting it again",
            5,
        )
        assert len(first.engine.requests) == before
        first.engine.health_error = None
        wait_until(
            lambda: call(client) and len(first.engine.requests) > before,
            "the replica taking calls again once healthy",
            5,
        )


def test_dns_targets_follow_the_answer_with_the_async_client(fakes: list[ServerThread]) -> None:
    answer = [("127.0.0.1", fakes[0].port)]

    def resolver(name: str, port: int) -> list[tuple[str, int]]:
        assert (name, port) == ("dagserve.ml.svc", 9090)
        return list(answer)

    async def main() -> None:
        async with AsyncClient(
            targets="dns:///dagserve.ml.svc:9090",
            resolve_interval_s=0.05,
            resolver=resolver,
            timeout_s=10,
        ) as client:
            for _ in range(5):
                await client.infer("echo", X)
            assert [len(s.engine.requests) for s in fakes] == [5, 0, 0]
            # the Service's pods change: the old one leaves, two new ones come
            answer[:] = [("127.0.0.1", fakes[1].port), ("127.0.0.1", fakes[2].port)]
            deadline = time.monotonic() + 5
            while set(client.replica_stats()) != {target(fakes[1]), target(fakes[2])}:
                assert time.monotonic() < deadline, client.replica_stats()
                await client.infer("echo", X)
            sent = [len(s.engine.requests) for s in fakes]
            await asyncio.gather(*(client.infer("echo", X) for _ in range(30)))
            after = [len(s.engine.requests) for s in fakes]
            assert after[0] == sent[0]  # no call to the pod that left
            assert after[1] > sent[1]
            assert after[2] > sent[2]

    asyncio.run(main())


def test_a_dns_name_that_resolves_to_nothing_is_a_connection_error() -> None:
    def resolver(name: str, port: int) -> list[tuple[str, int]]:
        raise UnicodeError("Name or service not known")

    with (
        Client(targets="dns:///nowhere:9090", resolver=resolver) as client,
        pytest.raises(ClientConnectionError, match="Name or service not known"),
    ):
        client.health()


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.mark.e2e
@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls_checks_a_dns_targets_replicas_against_the_name(tmp_path: Path) -> None:
    # the certificate names the Service, never a pod's address (pods come and go)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=ca",
            "-keyout", "ca.key", "-out", "ca.pem", cwd=tmp_path)  # fmt: skip
    (tmp_path / "ext").write_text("subjectAltName=DNS:dagserve.ml.svc\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=dagserve",
            "-keyout", "server.key", "-out", "server.csr", cwd=tmp_path)  # fmt: skip
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-out", "server.pem", "-extfile", "ext",
            cwd=tmp_path)  # fmt: skip
    tls = TlsConfig(certfile=tmp_path / "server.pem", keyfile=tmp_path / "server.key")
    context = tls_context(cafile=str(tmp_path / "ca.pem"))
    with serving([PIPELINES / "calc.yaml"], tls=tls) as server:

        def resolver(name: str, port: int) -> list[tuple[str, int]]:
            return [("127.0.0.1", server.port)]

        options: dict[str, Any] = {"resolver": resolver, "ssl_context": context, "timeout_s": 10}
        with Client(targets="dns:///dagserve.ml.svc:9090", **options) as client:
            assert client.infer("calc", X).outputs["doubled"][0, 0] == 2

        async def main() -> None:
            async with AsyncClient(targets="dns:///dagserve.ml.svc:9090", **options) as aclient:
                assert (await aclient.infer("calc", X)).outputs["doubled"][0, 0] == 2

        asyncio.run(main())
        # the pod's address is not in the certificate: a client of it directly is refused
        with (
            Client("127.0.0.1", server.port, ssl_context=context, timeout_s=10) as direct,
            pytest.raises(ClientConnectionError, match="IP address mismatch"),
        ):
            direct.infer("calc", X)


# --- three real servers, one SIGKILLed under load ---------------------------------------------


def serve_in_process(port: int) -> subprocess.Popen[bytes]:
    # its own process: a SIGKILL of a server in this one would end the test
    return subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "serve", str(PIPELINES / "calc.yaml"),
         "--port", str(port), "--log-level", "warning"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


@pytest.mark.e2e
@pytest.mark.timeout(60)
def test_a_replica_sigkilled_under_load_fails_no_request() -> None:
    port = free_port()
    process = serve_in_process(port)
    try:
        with serving([PIPELINES / "calc.yaml"]) as one, serving([PIPELINES / "calc.yaml"]) as two:
            wait_ready(port, process, timeout_s=45)
            victim = f"127.0.0.1:{port}"
            targets = [f"127.0.0.1:{one.port}", f"127.0.0.1:{two.port}", victim]
            answered: list[int] = []
            failures: list[BaseException] = []
            stop = threading.Event()

            def load(client: Client) -> None:
                count = 0
                while not stop.is_set():
                    try:
                        reply = client.infer("calc", X, outputs=["doubled"], timeout_ms=5000)
                        np.testing.assert_array_equal(reply.outputs["doubled"], X["x"] * 2)
                        count += 1
                    except BaseException as exc:
                        failures.append(exc)
                answered.append(count)

            with Client(targets=targets, timeout_s=10, pool_size=8) as client:
                threads = [threading.Thread(target=load, args=(client,)) for _ in range(6)]
                for thread in threads:
                    thread.start()
                wait_until(
                    lambda: min(s.answered for s in client.replica_stats().values()) >= 50,
                    f"50 answers from every replica ({failures[:1]})",
                    20,
                )
                before = client.replica_stats()
                process.send_signal(signal.SIGKILL)
                process.wait(10)
                killed_at = sum(s.answered for s in client.replica_stats().values())
                wait_until(
                    lambda: (
                        sum(s.answered for s in client.replica_stats().values()) > killed_at + 300
                    ),
                    "300 more answers after the kill",
                    20,
                )
                stop.set()
                for thread in threads:
                    thread.join(15)
                after = client.replica_stats()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert not failures, f"{len(failures)} failed: {failures[:3]}"
    total = sum(answered)
    # the load was spread over all three before the kill (power of two choices: none starved)
    shares = [before[t].answered / sum(s.answered for s in before.values()) for t in targets]
    assert min(shares) > 0.15, shares
    assert after[victim].connection_failures >= 1
    assert sum(s.answered for s in after.values()) == total
    print(f"answered {total}, shares before the kill {[round(s, 2) for s in shares]}")
