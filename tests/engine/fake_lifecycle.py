"""A fake of ``engine.lifecycle`` for the admin transport's tests, and an admin server on a
background loop.

``FakeLifecycle`` keeps versions in a dict and records every call; a path or name containing
``broken`` is refused with a ``LifecycleError``-like ``DagserveError``, ``crash`` raises a
``RuntimeError`` (an internal error); ``set_variant_weights`` refuses a node that has no
variants.  It checks nothing else: the real lifecycle's rules are tested with the real one
(tests/engine/test_admin.py's e2e tests, tests/test_admin_cli.py's real servers).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from engine.config import ServerConfig
from engine.runtime.lifecycle import VersionState
from engine.transport.admin import admin_server
from engine.transport.thrift import ThriftServer
from model_plugins.errors import DagserveError
from tests.serving import LoopThread

#: a version as the fake reports it: the real lifecycle's VersionState, ready unless told
FakeState = functools.partial(VersionState, state="ready")


class FakeLifecycle:
    def __init__(self) -> None:
        self.states: dict[tuple[str, str], VersionState] = {
            ("calc", "1"): FakeState(
                "calc", "1", weight=1.0, path="/srv/calc.yaml", models=("calc/double",),
                variants={"double": {"fast": 10.0}}, variant_shadows={"double": "next"},
            ),
        }  # fmt: skip
        self.calls: list[tuple[Any, ...]] = []

    @staticmethod
    def _check(*words: str) -> None:
        if any("broken" in w for w in words):
            raise DagserveError(f"refused: {' '.join(words)} is broken")
        if any("crash" in w for w in words):
            raise RuntimeError("the fake crashed")

    def versions(self) -> list[VersionState]:
        return list(self.states.values())

    async def load(self, path: Path) -> VersionState:
        self.calls.append(("load", path))
        self._check(str(path))
        name, version = path.stem.split("_v")
        first = not any(k[0] == name for k in self.states)
        state = FakeState(name, version, weight=1.0 if first else 0.0, path=str(path))
        self.states[name, version] = state
        return state

    async def set_traffic(
        self, name: str, weights: dict[str, float], *, shadow: str | None = None,
        sticky_header: str | None = None,
    ) -> list[VersionState]:  # fmt: skip
        self.calls.append(("traffic", name, weights, shadow, sticky_header))
        self._check(name, *weights)
        total = sum(weights.values())
        for key, state in list(self.states.items()):
            if key[0] == name:
                self.states[key] = replace(
                    state, weight=weights.get(key[1], 0.0) / total, shadow=key[1] == shadow,
                    sticky_header=sticky_header,
                )  # fmt: skip
        return [s for k, s in self.states.items() if k[0] == name]

    async def set_variant_weights(
        self, name: str, version: str, node: str, weights: dict[str, float]
    ) -> VersionState:
        self.calls.append(("variants", name, version, node, weights))
        self._check(name, version, node, *weights)
        state = self.states.get((name, version))
        if state is None or node not in state.variants:
            raise DagserveError(f"no node {node!r} with variants in {name!r} {version!r}")
        merged = {**state.variants, node: {**state.variants[node], **weights}}
        self.states[name, version] = replace(state, variants=merged)
        return self.states[name, version]

    async def reload(self, name: str, version: str, *, in_place: bool = False) -> VersionState:
        self.calls.append(("reload", name, version, in_place))
        self._check(name, version)
        if (name, version) not in self.states:
            raise DagserveError(f"no version {version!r} of {name!r}")
        return self.states[name, version]

    async def unload(self, name: str, version: str) -> None:
        self.calls.append(("unload", name, version))
        self._check(name, version)
        if self.states.pop((name, version), None) is None:
            raise DagserveError(f"no version {version!r} of {name!r}")


class AdminThread(LoopThread):
    """An admin ``ThriftServer`` (from ``admin_server(config, lifecycle)``) on a background
    loop: sync clients block the calling thread, not the server."""

    timeout_s = 10.0

    def __init__(self, server: ThriftServer) -> None:
        super().__init__()
        self.server = server

    @property
    def port(self) -> int:
        return self.server.port

    async def _start(self) -> None:
        await self.server.start()

    async def _stop(self) -> None:
        await self.server.aclose(grace_s=1.0)


@contextmanager
def admin_serving(lifecycle: FakeLifecycle, **config: Any) -> Iterator[AdminThread]:
    """Serve ``lifecycle`` on an admin port (127.0.0.1, port 0) configured by ``config``."""
    server = admin_server(ServerConfig(admin_port=0, **config), lifecycle)
    thread = AdminThread(server)
    thread.start()
    try:
        yield thread
    finally:
        thread.stop()
