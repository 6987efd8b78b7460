"""``plugin: remote``: a pipeline of another dagserve service, run as one node of this one.

A pipeline too large for one pod is split across Deployments: each part is served on its
own, and the front's pipeline names the parts as nodes::

    nodes:
      encode:
        plugin: remote
        params: {target: "encoder.models.svc:9090", pipeline: encode}
        inputs: {text: text}

The node's inputs and outputs are the remote pipeline's, learned with ``describe``: at
validation (:meth:`RemotePlugin.signature`, so the edges are checked against them, in
``dagserve serve`` and in ``dagserve validate`` alike), and again when the node starts
(:meth:`RemoteRunner.start`), so a remote that changed since stops startup rather than
failing requests.  A target that cannot be reached makes both say so: nothing is assumed.

Each call carries what the request carries: the time left before its deadline
(``timeout_ms``), its request id and its trace context (a ``traceparent`` header).  The
remote's typed errors come back as the same classes, their message naming this node and
the remote pipeline; a connection that fails is an ``InferenceError`` naming them too.

``target`` is ``host:port`` (one server, or a ClusterIP Service that balances) or
``dns:///name:port`` (a headless Service): then the client balances over every address the
name resolves to, follows them as they change, steps around a replica that died and retries
a call lost with its replica once on another, within the deadline
(``engine.transport.balancer``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from dag.pipeline import PipelineDescription
from engine.errors import ClientConnectionError
from engine.observability import logs
from engine.observability.tracing import outgoing_traceparent, start_node_span
from engine.runtime.local import LocalRunner, NodeBinding
from engine.runtime.naming import reworded
from engine.transport.balancer import DNS_PREFIX, Targets
from engine.transport.client import AsyncClient, Client
from model_plugins.errors import (
    DagserveError,
    DeadlineExceeded,
    InferenceError,
    InvalidRequest,
    PipelineNotFound,
    PluginLoadError,
)
from model_plugins.params import Params
from model_plugins.plugin import Batch, ModelPlugin, Signature
from model_plugins.specs import TensorSpec
from model_plugins.wiring import wiring_problems

logger = logging.getLogger(__name__)

#: the keys ``params:`` of a remote node may hold
PARAMS = ("target", "pipeline", "version")
#: how long ``describe`` may take, at validation and at start
DESCRIBE_TIMEOUT_S = 5.0
#: the bound of a call whose request has no deadline
CALL_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class RemoteTarget:
    """Where a remote node's pipeline is served, read from its ``params:``."""

    host: str
    port: int
    pipeline: str
    version: str | None = None
    #: as written, for messages
    target: str = ""

    @classmethod
    def of(cls, params: Mapping[str, Any], *, node: str | None = None) -> RemoteTarget:
        """Read ``target``, ``pipeline`` and ``version``.

        Raises:
            PluginLoadError: a key missing, unknown or malformed.
        """
        read = Params(params, PARAMS, node=node, plugin="remote")
        target = read.string("target")
        pipeline = read.string("pipeline")
        if target is None or pipeline is None:
            read.fail('needs params.target ("host:port" or "dns:///name:port") and params.pipeline')
        try:
            parsed = Targets.parse(target)
        except ValueError:
            read.fail(f'params.target must be "host:port" or "dns:///name:port" (got {target!r})')
        host, port = parsed.dns or parsed.addresses[0]
        return cls(host, port, pipeline, read.string("version"), target)

    @property
    def balanced(self) -> bool:
        """A ``dns:///`` target: every address the name resolves to is a replica."""
        return self.target.startswith(DNS_PREFIX)

    def client_args(self) -> dict[str, Any]:
        """The address arguments of ``Client`` / ``AsyncClient`` for this target."""
        if self.balanced:
            return {"targets": self.target}
        return {"host": self.host, "port": self.port}

    def __str__(self) -> str:
        version = f" version {self.version!r}" if self.version else ""
        return f"remote pipeline {self.pipeline!r}{version} at {self.target}"


def describe(target: RemoteTarget) -> PipelineDescription:
    """The remote pipeline's description; blocks up to :data:`DESCRIBE_TIMEOUT_S`.

    Raises:
        PluginLoadError: it cannot be reached, or does not serve the pipeline; the message
            says its specs could not be checked.
    """
    try:
        with Client(**target.client_args(), timeout_s=DESCRIBE_TIMEOUT_S) as client:
            return client.describe(target.pipeline)
    except (ClientConnectionError, PipelineNotFound) as exc:
        msg = f"{target}: cannot describe it, so its inputs and outputs are not checked: {exc}"
        raise PluginLoadError(msg) from exc


def remote_signature(
    target: RemoteTarget,
    description: PipelineDescription,
    upstream: Mapping[str, TensorSpec | None],
) -> Signature:
    """The node's specs, the remote pipeline's; raises where the wiring disagrees with them.

    Raises:
        PluginLoadError: what the node wires differs from what the remote pipeline takes (an
            input it does not have, a required one missing, another dtype or shape).
    """
    inputs = dict(description.inputs)
    problems = wiring_problems(inputs, upstream, plugin="remote")
    if problems:
        differs = "; ".join(message for _, message in problems)
        msg = f"{target} does not take what the node wires: {differs}"
        raise PluginLoadError(msg)
    # an output the remote declares no spec for is left out: the node's outputs: may give it
    outputs = {name: spec for name, spec in description.outputs.items() if spec is not None}
    return inputs, outputs


class RemotePlugin(ModelPlugin):
    """Runs a pipeline of another dagserve service as this node (``params: {target,
    pipeline, version}``); its specs are the remote pipeline's, learned with ``describe``.

    It is the node's declaration only: the engine runs the node with a :class:`RemoteRunner`
    in the front process (asynchronously, no worker, no batching).
    """

    _inline: ClassVar[bool] = True

    @classmethod
    def signature(
        cls, params: Mapping[str, Any], upstream: Mapping[str, TensorSpec | None]
    ) -> Signature:
        """Describe the remote pipeline (a blocking call, at validation) and check the
        node's wiring against its inputs."""
        target = RemoteTarget.of(params)
        return remote_signature(target, describe(target), upstream)

    def predict(self, batch: Batch) -> Batch:
        msg = "a remote node runs through the engine's RemoteRunner, not predict()"
        raise NotImplementedError(msg)


class RemoteRunner(LocalRunner):
    """Runs a remote node: one ``infer`` call to the remote per request, in the event loop.

    A :class:`LocalRunner` for the engine (it runs in the front process, starts and closes
    with the node), but it loads no plugin: the remote pipeline is its model.
    """

    kind = "remote"

    def __init__(self, binding: NodeBinding, params: Mapping[str, Any]) -> None:
        super().__init__(binding)
        self.target = RemoteTarget.of(params, node=binding.node)
        self._client: AsyncClient | None = None

    def __str__(self) -> str:
        return f"node {self.binding.node!r} ({self.target})"

    async def start(self) -> None:
        """Describe the remote again: it must still give every output the pipeline reads.

        Raises:
            PluginLoadError: it cannot be reached, or its outputs differ from those the
                pipeline was validated with; the message names the node, the remote
                pipeline and what differs.
        """
        target = self.target
        self._client = AsyncClient(**target.client_args(), timeout_s=CALL_TIMEOUT_S)
        try:
            async with asyncio.timeout(DESCRIBE_TIMEOUT_S):
                description = await self._client.describe(target.pipeline)
        except (ClientConnectionError, PipelineNotFound, TimeoutError) as exc:
            await self.aclose()
            msg = f"{target}: cannot describe it: {exc}"
            raise PluginLoadError(msg) from exc
        differs = []
        for name, want in self.binding.outputs.items():
            if name not in description.outputs:
                differs.append(f"it has no output {name!r} (validated: {want.describe()})")
                continue
            got = description.outputs[name]
            if got is not None and got != want:
                was = want.describe()
                differs.append(f"its output {name!r} is {got.describe()} (validated: {was})")
        if differs:
            await self.aclose()
            msg = f"{target} changed since validation: {'; '.join(differs)}"
            raise PluginLoadError(msg)

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def run(self, inputs: Batch, *, deadline: float | None) -> Batch:
        assert self._client is not None, "runner used before start()"
        b = self.binding
        timeout_ms = None
        if deadline is not None:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                msg = f"node {b.node!r}: deadline exceeded before calling {self.target}"
                raise DeadlineExceeded(msg)
            timeout_ms = max(1, int(left * 1000))
        try:
            with start_node_span(b.pipeline, b.node, model=str(self.target)):
                traceparent = outgoing_traceparent()
                headers = {"traceparent": traceparent} if traceparent else None
                # the remote bounds its own work by timeout_ms; this bounds the wait for it
                # (a remote that does not answer in time, a slow network)
                async with asyncio.timeout_at(deadline):
                    result = await self._client.infer(
                        self.target.pipeline,
                        inputs,
                        version=self.target.version,
                        timeout_ms=timeout_ms,
                        outputs=list(b.outputs) or None,
                        request_id=logs.request_id.get(),
                        headers=headers,
                    )
        except ClientConnectionError as exc:  # ClientTimeout too: the call's own bound
            raise self._failed(exc) from exc
        except DagserveError as exc:  # the remote's typed error (its DeadlineExceeded too)
            raise self._named(exc) from exc
        except TimeoutError as exc:  # asyncio.timeout_at: this request's deadline
            msg = f"node {b.node!r}: deadline exceeded waiting for {self.target}"
            raise DeadlineExceeded(msg) from exc
        return {name: result.outputs[name] for name in b.outputs if name in result.outputs}

    def _failed(self, exc: ClientConnectionError) -> InferenceError:
        msg = f"node {self.binding.node!r}: {self.target}: {exc}"
        return InferenceError(msg, node=self.binding.node, plugin="remote")

    def _named(self, exc: DagserveError) -> DagserveError:
        """The remote's error, same class, naming this node and the remote pipeline."""
        message = f"node {self.binding.node!r}: {self.target}: {exc.message}"
        if isinstance(exc, InferenceError):
            return reworded(exc, message, node=self.binding.node, plugin="remote")
        if isinstance(exc, InvalidRequest):
            return reworded(exc, message, field=exc.field or self.binding.node)
        if isinstance(exc, PipelineNotFound):
            # the remote stopped serving it: for this server's caller, the node failed
            return InferenceError(message, node=self.binding.node, plugin="remote")
        return reworded(exc, message)


__all__ = ["RemotePlugin", "RemoteRunner", "RemoteTarget", "describe", "remote_signature"]
