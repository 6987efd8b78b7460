"""dagserve's server: serve DAG pipelines of models over Thrift.

The front door, as in uvicorn's: what a program that embeds or calls the server needs::

    from engine import AsyncClient, Client, Engine, Server, ServerConfig

The rooms behind it: ``transport/`` (Thrift server, frame guard, codec, handler, client),
``runtime/`` (engine, assembly, models and their batchers, workers, placement, devices,
inspector), ``observability/`` (metrics and their HTTP endpoints, logs, tracing), ``tools/``
(bench, scaffold), and here the process (``server``), its ``config``, the ``cli`` and the
``errors`` of the server's own.  The names load on first use, so importing one room does not
import the others.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.config import ServerConfig
    from engine.runtime.engine import Engine
    from engine.server import Server
    from engine.transport.client import AsyncClient, Client

_WHERE = {
    "Server": "engine.server",
    "ServerConfig": "engine.config",
    "Engine": "engine.runtime.engine",
    "Client": "engine.transport.client",
    "AsyncClient": "engine.transport.client",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        msg = f"module 'engine' has no attribute {name!r}"
        raise AttributeError(msg)
    return getattr(importlib.import_module(_WHERE[name]), name)


__all__ = ["Server", "ServerConfig", "Engine", "Client", "AsyncClient"]
