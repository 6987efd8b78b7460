"""The admin service (``idl/admin.thrift``): the model lifecycle on a port of its own.

:class:`AdminHandler` is a thin adapter over ``engine.lifecycle`` (the engine's
:class:`~engine.runtime.lifecycle.Lifecycle`), as the inference handler is over the engine:
check the token, call the lifecycle, convert the answer (``variants``, a node's variant
weights, goes to ``Lifecycle.set_variant_weights``).  Refusals (``LifecycleError``, and
any other of our errors) become the IDL's ``AdminError`` with their message; a wrong or missing
token becomes ``Unauthorized``, without detail.

:func:`admin_server` builds the second :class:`~engine.transport.thrift.ThriftServer` from the
server config and enforces who may reach it (README, "Model lifecycle"):

- with ``admin_token_file``, every call must carry that file's content as its token;
- with ``tls`` configured, the admin port speaks TLS too, and ``admin_require_client_cert``
  accepts only clients holding a certificate from ``admin_client_ca`` (else ``tls.client_ca``);
- without a token and without client certificates, the admin port binds only to a loopback
  host: anyone who reaches it could load, swap and unload models.

The inference port never serves these methods: its ``ThriftServer`` knows only the
``InferenceService``, and answers any other method name ``UNKNOWN_METHOD``.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from thriftpy2.thrift import TException

from dag.schema import ALL_WEIGHT
from engine.config import ServerConfig
from engine.errors import ConfigError
from engine.transport.thrift import ThriftServer
from idl import admin_thrift
from model_plugins.errors import DagserveError

logger = logging.getLogger(__name__)

#: admin calls carry a path, a name and a few weights: a small frame limit is plenty
ADMIN_MAX_FRAME_BYTES = 1024 * 1024


class LifecycleLike(Protocol):
    """What the handler needs of ``engine.lifecycle`` (``engine/runtime/lifecycle.py``)."""

    def versions(self) -> Sequence[Any]: ...

    async def load(self, path: Path) -> Any: ...

    async def set_traffic(
        self,
        name: str,
        weights: dict[str, float],
        *,
        shadow: str | None = None,
        sticky_header: str | None = None,
    ) -> Sequence[Any]: ...

    async def set_variant_weights(
        self, name: str, version: str, node: str, weights: dict[str, float]
    ) -> Any: ...

    async def reload(self, name: str, version: str, *, in_place: bool = False) -> Any: ...

    async def unload(self, name: str, version: str) -> None: ...


def version_to_wire(state: Any) -> Any:
    """The IDL's ``VersionInfo`` of a ``VersionState``."""
    return admin_thrift.VersionInfo(
        pipeline=state.pipeline,
        version=state.version,
        state=state.state,
        why=state.why or None,
        weight=float(state.weight),
        shadow=bool(state.shadow),
        sticky_header=state.sticky_header,
        inflight=int(state.inflight),
        path=str(state.path) if state.path is not None else None,
        models=list(state.models),
        variants={
            node: admin_thrift.NodeVariants(
                weights={v: float(w) for v, w in weights.items()},
                own_weight=max(0.0, ALL_WEIGHT - sum(weights.values())),
                shadow=state.variant_shadows.get(node),
            )
            for node, weights in state.variants.items()
        }
        or None,
    )


class AdminHandler:
    """The ``AdminService`` of ``idl/admin.thrift``, served by ``transport.thrift``.

    Args:
        lifecycle: the engine's lifecycle (``engine.lifecycle``).
        token: what every call must carry; None: any token is accepted (the caller of
            :func:`admin_server` made sure only loopback or certified clients reach it).
    """

    def __init__(self, lifecycle: LifecycleLike, token: str | None = None) -> None:
        self.lifecycle = lifecycle
        self._token = token.encode() if token is not None else None

    def _authorize(self, token: str | None, method: str) -> None:
        if self._token is None:
            return
        given = (token or "").encode()
        # compare_digest: the time taken says nothing about how much of the token matched
        if not hmac.compare_digest(given, self._token):
            logger.warning("admin %s refused: %s token", method, "wrong" if token else "no")
            raise admin_thrift.Unauthorized()

    async def list_versions(self, token: str | None) -> list[Any]:
        self._authorize(token, "list_versions")
        with _refusals("list_versions"):
            return [version_to_wire(s) for s in self.lifecycle.versions()]

    async def load(self, token: str | None, path: str | None) -> Any:
        self._authorize(token, "load")
        with _refusals("load"):
            if not path:
                msg = "load: the path of a pipeline file is missing"
                raise DagserveError(msg)
            state = await self.lifecycle.load(Path(path))
            logger.info("admin: loaded %s version %s from %s", state.pipeline, state.version, path)
            return version_to_wire(state)

    async def traffic(
        self,
        token: str | None,
        pipeline: str | None,
        weights: dict[str, float] | None,
        shadow: str | None,
        sticky_header: str | None,
    ) -> list[Any]:
        self._authorize(token, "traffic")
        with _refusals("traffic"):
            states = await self.lifecycle.set_traffic(
                pipeline or "", dict(weights or {}), shadow=shadow or None,
                sticky_header=sticky_header or None,
            )  # fmt: skip
            logger.info(
                "admin: traffic of %s: %s%s%s", pipeline,
                ", ".join(f"{v}={w:g}" for v, w in (weights or {}).items()) or "none",
                f", shadow {shadow}" if shadow else "",
                f", sticky on {sticky_header}" if sticky_header else "",
            )  # fmt: skip
            return [version_to_wire(s) for s in states]

    async def variants(
        self,
        token: str | None,
        pipeline: str | None,
        version: str | None,
        node: str | None,
        weights: dict[str, float] | None,
    ) -> Any:
        self._authorize(token, "variants")
        with _refusals("variants"):
            state = await self.lifecycle.set_variant_weights(
                pipeline or "", version or "", node or "", dict(weights or {})
            )
            logger.info(
                "admin: variant weights of %s version %s node %s: %s", pipeline, version, node,
                ", ".join(f"{v}={w:g}" for v, w in (weights or {}).items()) or "none",
            )  # fmt: skip
            return version_to_wire(state)

    async def reload(
        self, token: str | None, pipeline: str | None, version: str | None, in_place: bool | None
    ) -> Any:
        self._authorize(token, "reload")
        with _refusals("reload"):
            state = await self.lifecycle.reload(
                pipeline or "", version or "", in_place=bool(in_place)
            )
            logger.info("admin: reloaded %s version %s", pipeline, version)
            return version_to_wire(state)

    async def unload(self, token: str | None, pipeline: str | None, version: str | None) -> None:
        self._authorize(token, "unload")
        with _refusals("unload"):
            await self.lifecycle.unload(pipeline or "", version or "")
            logger.info("admin: unloaded %s version %s", pipeline, version)


@contextmanager
def _refusals(what: str) -> Iterator[None]:
    """Our errors become ``AdminError(message)``; anything else is logged with its traceback
    and becomes ``AdminError("internal error: ...")``: only declared exceptions leave."""
    try:
        yield
    except TException:
        raise
    except DagserveError as exc:
        logger.info("admin %s refused: %s", what, exc)
        raise admin_thrift.AdminError(message=str(exc)) from exc
    except Exception as exc:
        logger.error("internal error in admin %s", what, exc_info=exc)
        message = f"internal error: {type(exc).__name__}: {exc}"
        raise admin_thrift.AdminError(message=message) from exc


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name other than localhost, or "" (every interface)
        return False


def read_token(path: Path) -> str:
    """The token in ``path`` (surrounding whitespace stripped).

    Raises:
        ConfigError: the file cannot be read, or holds no token.
    """
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        msg = f"admin_token_file: cannot read {path}: {exc}"
        raise ConfigError(msg) from exc
    if not token:
        msg = f"admin_token_file: {path} is empty"
        raise ConfigError(msg)
    return token


def admin_server(config: ServerConfig, lifecycle: LifecycleLike) -> ThriftServer:
    """The admin ``ThriftServer`` that ``config`` describes (not started: ``await start()``).

    Raises:
        ConfigError: ``admin_port`` is None, the token file is unreadable or empty, client
            certificates are asked for without TLS, or the host is not loopback and nothing
            (token, client certificate) says who may call.
    """
    if config.admin_port is None:
        msg = "admin_port is not set: the admin service is off"
        raise ConfigError(msg)
    if config.tls is None and (config.admin_require_client_cert or config.admin_client_ca):
        msg = (
            "admin_require_client_cert and admin_client_ca need tls: the admin port speaks "
            "TLS only when the server does"
        )
        raise ConfigError(msg)
    token = read_token(config.admin_token_file) if config.admin_token_file else None
    ssl_context = None
    certified = False
    if config.tls is not None:
        tls = config.tls
        certified = config.admin_require_client_cert or tls.require_client_cert
        admin_tls = tls.model_copy(
            update={
                "client_ca": config.admin_client_ca or tls.client_ca,
                "require_client_cert": certified,
            }
        )
        ssl_context = admin_tls.server_context()
    if token is None and not certified and not _is_loopback(config.host):
        msg = (
            f"admin_port on host {config.host!r}, which is not loopback, needs "
            "admin_token_file or admin_require_client_cert: without either, anyone who "
            "reaches the port could load, swap and unload models"
        )
        raise ConfigError(msg)
    return ThriftServer(
        AdminHandler(lifecycle, token),
        host=config.host,
        port=config.admin_port,
        max_frame_bytes=ADMIN_MAX_FRAME_BYTES,
        idle_timeout_s=config.idle_timeout_s,
        service=admin_thrift.AdminService,
        ssl_context=ssl_context,
    )


__all__ = [
    "ADMIN_MAX_FRAME_BYTES",
    "AdminHandler",
    "LifecycleLike",
    "admin_server",
    "read_token",
    "version_to_wire",
]
