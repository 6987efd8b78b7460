"""Client-side balancing over replicas: what ``Client(targets=...)`` and
``AsyncClient(targets=...)`` share.

A server is a stateless replica (Kubernetes runs many behind a headless Service), so a client
that knows every replica can spread its calls, step around a dead one and follow the set as it
changes, with no proxy in between (gRPC's client-side balancing; Envoy's outlier detection).

- **Targets**: a list of ``"host:port"``, or ``"dns:///name:port"``, resolved again every
  ``resolve_interval_s`` (and sooner after a connection failure), so a headless Service's pods
  are followed as they come and go.  A failed or empty resolution keeps the last set.
- **Choice**: power of two choices on outstanding requests: two replicas drawn at random, the
  one with fewer calls in flight from this client wins (near least-outstanding, no herd on
  the replica that was idle a moment ago).
- **Ejection**: a replica whose connection fails is ejected for a backoff (0.5 s, doubling up to
  30 s); when it is due again its ``health()`` is checked (ready) before it takes a call.
  When every replica is ejected the ejected ones are tried anyway (a client never refuses to
  call while some replica may be up).
- **Retries**: all of the service's methods are side-effect free, so:
  a call that could not connect (nothing sent) goes to another replica;
  a call whose connection was lost before its answer is retried ONCE on another replica,
  within the request's deadline (``timeout_ms``, else the client's ``timeout_s``);
  ``Overloaded`` moves the call to a replica that has not said it is overloaded in the last
  ``retry_after_ms``, and is raised when none has room.
  Every other answer (``InvalidRequest``, ``DeadlineExceeded``, ``InferenceError``, ...) is an
  answer: raised, never retried.  A ``ClientTimeout`` is not retried either (the call may
  still run, and its time is spent).

This module does no I/O: the clients connect, call and resolve; the balancer keeps the state
(under a lock, so one instance serves threads or one event loop alike).
"""

from __future__ import annotations

import random
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from engine.errors import ClientConnectionError, ClientTimeout
from model_plugins.errors import DagserveError, Overloaded

#: the prefix of a DNS target, as gRPC spells it (no authority: the system resolver)
DNS_PREFIX = "dns:///"
#: first ejection of a replica whose connection failed; doubled on each failure in a row
BACKOFF_S = 0.5
#: the longest ejection
MAX_BACKOFF_S = 30.0
#: after a connection failure, a DNS target is resolved again at most this soon
RESOLVE_SOON_S = 1.0

#: ``resolver(name, port)`` -> the replicas' addresses, as ``(host, port)``
Resolver = Callable[[str, int], Sequence[tuple[str, int]]]

T = TypeVar("T")


def getaddrinfo_resolver(name: str, port: int) -> list[tuple[str, int]]:
    """Every TCP address of ``name`` (a headless Service answers one per ready pod)."""
    found: list[tuple[str, int]] = []
    for *_, sockaddr in socket.getaddrinfo(name, port, type=socket.SOCK_STREAM):
        address = (str(sockaddr[0]), int(sockaddr[1]))
        if address not in found:
            found.append(address)
    return found


def parse_address(text: str) -> tuple[str, int]:
    """``"host:port"`` (``"[::1]:9090"`` for IPv6) as ``(host, port)``; ValueError naming it."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        msg = f"target {text!r}: must be 'host:port' or '{DNS_PREFIX}name:port'"
        raise ValueError(msg)
    return host, int(port)


@dataclass(frozen=True)
class Targets:
    """Parsed ``targets``: fixed addresses, or a name to resolve."""

    #: the fixed replicas (empty for a DNS target)
    addresses: tuple[tuple[str, int], ...] = ()
    #: the DNS name and port (None for fixed addresses)
    dns: tuple[str, int] | None = None

    @classmethod
    def parse(cls, targets: str | Sequence[str]) -> Targets:
        if isinstance(targets, str):
            if targets.startswith(DNS_PREFIX):
                return cls(dns=parse_address(targets[len(DNS_PREFIX) :]))
            targets = [targets]
        addresses = tuple(dict.fromkeys(parse_address(t) for t in targets))
        if not addresses:
            msg = "targets: at least one 'host:port' is needed (got none)"
            raise ValueError(msg)
        return cls(addresses=addresses)

    def __str__(self) -> str:
        if self.dns is not None:
            return f"{DNS_PREFIX}{self.dns[0]}:{self.dns[1]}"
        return ",".join(f"{h}:{p}" for h, p in self.addresses)


@dataclass(frozen=True)
class ReplicaStats:
    """What this client saw of one replica (``Client.replica_stats()``)."""

    #: calls it answered (a typed error is an answer)
    answered: int
    #: calls in flight to it now
    outstanding: int
    #: calls that failed on it for want of a connection (then sent elsewhere, or raised)
    connection_failures: int
    #: calls it refused with ``Overloaded``
    overloaded: int
    #: whether it is ejected now
    ejected: bool
    #: whether the last resolution still lists it (False: leaving once its calls end)
    listed: bool


class Replica(Generic[T]):
    """One server: its single-target client (``T``) and what the balancer knows of it."""

    def __init__(self, address: tuple[str, int], client: T) -> None:
        self.address = address
        self.client = client
        self.outstanding = 0
        self.answered = 0
        self.connection_failures = 0
        self.overloaded = 0
        self.listed = True
        #: ejected until this ``time.monotonic()``; 0: not ejected
        self.ejected_until = 0.0
        #: the next ejection's length
        self.backoff_s = BACKOFF_S
        #: it said ``Overloaded`` and asked for calls to wait until this time
        self.busy_until = 0.0
        #: ejected once: its health is checked before it takes a call again
        self.needs_check = False

    @property
    def name(self) -> str:
        host, port = self.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def stats(self, now: float) -> ReplicaStats:
        return ReplicaStats(
            answered=self.answered,
            outstanding=self.outstanding,
            connection_failures=self.connection_failures,
            overloaded=self.overloaded,
            ejected=self.ejected_until > now,
            listed=self.listed,
        )


class Balancer(Generic[T]):
    """The replicas of one client and the choice among them.

    ``make(host, port)`` builds a replica's single-target client (with its own pool of
    connections); ``close(client)`` closes one whose replica left the resolution and has no
    call in flight.
    """

    def __init__(
        self,
        targets: Targets,
        make: Callable[[str, int], T],
        close: Callable[[T], None],
        *,
        resolve_interval_s: float = 10.0,
        resolver: Resolver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if resolve_interval_s <= 0:
            msg = f"resolve_interval_s must be > 0 (got {resolve_interval_s})"
            raise ValueError(msg)
        self.targets = targets
        self.resolve_interval_s = resolve_interval_s
        self.resolver: Resolver = resolver or getaddrinfo_resolver
        self._make = make
        self._close = close
        self._clock = clock
        self._lock = threading.Lock()
        self._random = random.Random()
        self._replicas: dict[tuple[str, int], Replica[T]] = {}
        #: the next resolution's time; None: fixed addresses, never resolved
        self._resolve_at: float | None = None if targets.dns is None else 0.0
        self._resolving = False
        #: why the last resolution failed, for the error of a call that finds no replica
        self._resolve_error = ""
        self._closed = False
        for address in targets.addresses:
            self._replicas[address] = Replica(address, make(*address))

    # --- resolution (the clients call the resolver, sync or in an executor) ---------------

    def resolution_due(self) -> bool:
        """Whether a DNS target is due to be resolved; True claims the resolution: the
        caller resolves and calls :meth:`update` (or :meth:`resolve_failed`)."""
        with self._lock:
            if self._resolve_at is None:
                return False
            if not any(r.listed for r in self._replicas.values()):
                return True  # nothing to call yet: every caller resolves (harmless twice)
            if self._resolving or self._clock() < self._resolve_at:
                return False
            self._resolving = True
            return True

    def update(self, addresses: Sequence[tuple[str, int]]) -> None:
        """The resolver's answer: new addresses join, missing ones leave once idle."""
        to_close: list[T] = []
        with self._lock:
            self._resolving = False
            self._resolve_at = self._clock() + self.resolve_interval_s
            self._resolve_error = ""
            if not addresses or self._closed:
                # an empty answer keeps the last set: a resolver's hiccup must not drop
                # every replica, and replicas that are really gone get ejected on their own
                return
            wanted = set(addresses)
            for address in addresses:
                replica = self._replicas.get(address)
                if replica is None:
                    self._replicas[address] = Replica(address, self._make(*address))
                else:
                    replica.listed = True
            for address, replica in list(self._replicas.items()):
                if address not in wanted:
                    replica.listed = False
                    if replica.outstanding == 0:
                        del self._replicas[address]
                        to_close.append(replica.client)
        for client in to_close:
            self._close(client)

    def resolve_failed(self, exc: BaseException) -> None:
        """The resolver raised: keep the last set, try again after the interval."""
        with self._lock:
            self._resolve_error = f"{type(exc).__name__}: {exc}"
            self._resolving = False
            self._resolve_at = self._clock() + self.resolve_interval_s

    # --- one call --------------------------------------------------------------------------

    def start(self, deadline_s: float) -> Attempts[T]:
        """The attempts of one call that must end within ``deadline_s`` seconds."""
        return Attempts(self, self._clock() + deadline_s)

    def _pick(self, excluded: set[tuple[str, int]]) -> Replica[T] | None:
        with self._lock:
            if self._closed:
                msg = f"the client of {self.targets} is closed"
                raise RuntimeError(msg)
            now = self._clock()
            open_ = [
                r for a, r in self._replicas.items()
                if r.listed and a not in excluded and r.busy_until <= now
            ]  # fmt: skip
            if not open_:
                return None
            healthy = [r for r in open_ if r.ejected_until <= now]
            if healthy:
                pair = self._random.sample(healthy, min(2, len(healthy)))
                chosen = min(pair, key=lambda r: r.outstanding)
            else:
                # all ejected: the one whose ejection ends first, rather than no call at all
                chosen = min(open_, key=lambda r: r.ejected_until)
            chosen.outstanding += 1
            return chosen

    def _done(self, replica: Replica[T]) -> None:
        to_close = None
        with self._lock:
            replica.outstanding -= 1
            if not replica.listed and replica.outstanding == 0:
                if self._replicas.get(replica.address) is replica:
                    del self._replicas[replica.address]
                to_close = replica.client
        if to_close is not None:
            self._close(to_close)

    def _answered(self, replica: Replica[T]) -> None:
        with self._lock:
            replica.answered += 1
            replica.backoff_s = BACKOFF_S

    def checked(self, replica: Replica[T]) -> None:
        """The replica back from ejection said it is ready: it takes calls again."""
        with self._lock:
            replica.needs_check = False

    def eject(self, replica: Replica[T]) -> None:
        """Take ``replica`` out for its backoff; a DNS target is resolved again soon."""
        with self._lock:
            now = self._clock()
            replica.needs_check = True
            # the calls in flight when a replica dies all fail at once: one failure, one step
            # of backoff (a replica ejected now is not ejected for longer)
            if replica.ejected_until <= now:
                replica.ejected_until = now + replica.backoff_s
                replica.backoff_s = min(replica.backoff_s * 2, MAX_BACKOFF_S)
            if self._resolve_at is not None:
                self._resolve_at = min(self._resolve_at, now + RESOLVE_SOON_S)

    def needs_check(self, replica: Replica[T]) -> bool:
        """Whether ``replica`` is back from an ejection and its health not yet checked
        (the caller checks it; two callers may both check, harmlessly)."""
        with self._lock:
            return replica.needs_check and replica.ejected_until <= self._clock()

    def replica_stats(self) -> dict[str, ReplicaStats]:
        with self._lock:
            now = self._clock()
            return {r.name: r.stats(now) for r in self._replicas.values()}

    def close(self) -> list[T]:
        """Mark the balancer closed and hand back every replica's client to close."""
        with self._lock:
            self._closed = True
            clients = [r.client for r in self._replicas.values()]
            self._replicas.clear()
            return clients


class Attempts(Generic[T]):
    """The attempts of one call: which replica next, and whether a failure is tried again.

    The client's loop::

        attempts = balancer.start(deadline_s)
        while True:
            replica = attempts.pick()          # raises when nothing is left to try
            try:
                return call(replica.client)
            except BaseException as exc:
                attempts.failed(replica, exc)  # re-raises what is not tried again
            finally:
                attempts.done(replica)
    """

    def __init__(self, balancer: Balancer[T], deadline: float) -> None:
        self.balancer = balancer
        self.deadline = deadline
        self.tried: set[tuple[str, int]] = set()
        #: the one retry of a call whose connection was lost mid-call is spent
        self.retried = False
        #: the error to raise when no replica is left to try
        self.last_error: BaseException | None = None

    def remaining_s(self) -> float:
        return self.deadline - self.balancer._clock()

    def pick(self) -> Replica[T]:
        if self.last_error is not None and self.remaining_s() <= 0:
            raise self.last_error
        replica = self.balancer._pick(self.tried)
        if replica is None:
            if self.last_error is not None:
                raise self.last_error
            why = self.balancer._resolve_error or "resolved to no address"
            msg = f"{self.balancer.targets}: no replica to call ({why})"
            raise ClientConnectionError(msg)
        self.tried.add(replica.address)
        return replica

    def answered(self, replica: Replica[T]) -> None:
        self.balancer._answered(replica)

    def done(self, replica: Replica[T]) -> None:
        self.balancer._done(replica)

    def failed(self, replica: Replica[T], exc: BaseException, *, sent: bool) -> None:
        """Record why ``replica`` failed the call; return to try another, else re-raise.

        ``sent``: whether the request may have reached the replica (False: no connection).
        """
        if isinstance(exc, Overloaded):
            with self.balancer._lock:
                replica.overloaded += 1
                replica.answered += 1
                replica.busy_until = self.balancer._clock() + exc.retry_after_ms / 1000
            self.last_error = exc
            return  # pick() raises it if no other replica has room
        if isinstance(exc, ClientConnectionError) and not isinstance(exc, ClientTimeout):
            with self.balancer._lock:
                replica.connection_failures += 1
            self.balancer.eject(replica)
            self.last_error = exc
            if not sent:
                return  # nothing reached it: any other replica may take the call
            if not self.retried:
                self.retried = True
                return
        elif isinstance(exc, DagserveError) and not isinstance(exc, ClientConnectionError):
            self.balancer._answered(replica)  # a typed answer: the replica is up
        raise exc


def call_deadline_s(timeout_ms: int | None, timeout_s: float) -> float:
    """The time one balanced call may take, retries included: the request's own deadline,
    else the client's ``timeout_s``."""
    return timeout_ms / 1000 if timeout_ms is not None and timeout_ms > 0 else timeout_s


def args_timeout(args: Any) -> int | None:
    """The ``timeout_ms`` of an ``infer`` call's arguments (None for other methods)."""
    request = getattr(args, "request", None)
    return getattr(request, "timeout_ms", None)


def shorten_deadline(args: Any, remaining_s: float) -> None:
    """A retried ``infer`` carries what is left of its deadline, not all of it again."""
    request = getattr(args, "request", None)
    if request is not None and request.timeout_ms is not None:
        request.timeout_ms = max(1, int(remaining_s * 1000))


__all__ = [
    "DNS_PREFIX",
    "Attempts",
    "Balancer",
    "ReplicaStats",
    "Resolver",
    "Targets",
    "getaddrinfo_resolver",
    "parse_address",
]
