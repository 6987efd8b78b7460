"""The server's own errors (the SDK's tree, ``model_plugins.errors``, holds the rest).

::

    DagserveError (model_plugins.errors)
    ├── ... the SDK's tree (InvalidRequest, PipelineNotFound, Overloaded, ...)
    ├── ConfigError                      the server configuration is unreadable or invalid
    ├── LifecycleError                   a lifecycle change (load, traffic, reload, unload) refused
    ├── RegistryError                    a model: URI (models:/, s3://...) could not be resolved
    ├── ApplicationError                 the server answered with a Thrift TApplicationException
    │                                    (unknown method, undeclared error, undecodable request)
    └── ClientConnectionError (ConnectionError)   a client cannot reach the server or lost it
        └── ClientTimeout (TimeoutError)          no answer within the client's ``timeout_s``

The classes load neither the IDL nor thriftpy2, so configuration, devices and placement can
raise them without parsing the Thrift file; errors are mapped to and from the wire in ONE
place, :mod:`engine.transport.wire_errors`.
"""

from __future__ import annotations

from model_plugins.errors import DagserveError

#: ``TApplicationException.UNKNOWN``, spelled out so that this module needs no thriftpy2
_UNKNOWN = 0


class ConfigError(DagserveError):
    """The server configuration is unreadable or invalid; the message names the file and key."""


class LifecycleError(DagserveError):
    """A lifecycle change was refused (unknown version, a load that failed, invalid weights,
    not enough GPU memory for blue/green); nothing changed, the message says why."""


class RegistryError(DagserveError):
    """A node's ``model:`` URI could not be resolved to a local copy (unknown name, version
    or alias; registry or bucket unreachable; download cut short): the message names the URI
    and the cause (``engine.runtime.registry``)."""


class ApplicationError(DagserveError):
    """The server answered with a Thrift ``TApplicationException``.

    ``kind`` is the Thrift code (``TApplicationException.UNKNOWN_METHOD``, ``INTERNAL_ERROR``,
    ``PROTOCOL_ERROR``, ...); the connection that carried it stays usable.
    """

    def __init__(self, message: str, kind: int = _UNKNOWN) -> None:
        super().__init__(message)
        self.kind = kind


class ClientConnectionError(DagserveError, ConnectionError):
    """A client cannot connect to ``host:port``, or the connection broke during a call.

    ``sent`` is False when no connection could be made: the call never reached a server, so
    a balancing client may give it to another replica as it is.
    """

    def __init__(self, message: str, host: str = "", port: int = 0, *, sent: bool = True) -> None:
        super().__init__(message)
        self.host = host
        self.port = port
        self.sent = sent


class ClientTimeout(ClientConnectionError, TimeoutError):
    """The server did not answer within the client's ``timeout_s`` (the call may still run)."""


__all__ = [
    "ApplicationError",
    "ClientConnectionError",
    "ClientTimeout",
    "ConfigError",
    "LifecycleError",
    "RegistryError",
]
