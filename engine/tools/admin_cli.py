"""``dagserve admin``: drive the model lifecycle of a running server over its admin port.

::

    dagserve admin --port N [--host H] [--token-file F] [--tls-ca F [--tls-cert F --tls-key F]]
                   VERB ...
      list                                   every pipeline version: state, traffic, in flight
      load FILE.yaml                         load a version beside those serving
      traffic NAME V=W ... [--shadow V] [--sticky HEADER]
      variants NAME V NODE VARIANT=W ...     weights (percent) of a node's variants in V
      reload NAME V [--in-place]             re-read its files, swap blue/green
      unload NAME V                          stop routing, drain, free its models

Exit codes: 0 done; 1 refused by the server (its reason is printed, nothing changed);
2 usage; 3 unauthorized or unreachable.
"""

# ruff: noqa: T201 (a command's job is to print, as engine/cli.py's, which pyproject exempts)
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine.errors import ApplicationError, ClientConnectionError, ConfigError
from engine.transport.admin import read_token
from engine.transport.admin_client import AdminClient, AdminRefused, AdminUnauthorized
from engine.transport.client import tls_context

#: exit codes (the module docstring)
OK, REFUSED, USAGE, UNREACHABLE = 0, 1, 2, 3

COLUMNS = (
    "pipeline", "version", "state", "weight", "shadow", "sticky", "inflight", "variants", "why"
)  # fmt: skip


def parser(prog: str = "dagserve admin") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Load, route, reload and unload pipeline versions of a server."
    )
    p.add_argument("--port", type=int, required=True, help="the server's admin port")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--token-file", type=Path, help="the server's admin_token_file (a copy)")
    p.add_argument("--tls-ca", help="CA that signed the server's certificate (turns TLS on)")
    p.add_argument("--tls-cert", help="client certificate, where the server requires one")
    p.add_argument("--tls-key", help="the client certificate's key")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per call (300)")
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    verbs.add_parser("list", help="every pipeline version: state, weight, shadow, in flight")
    load = verbs.add_parser("load", help="load a pipeline version beside those serving")
    load.add_argument(
        "file", metavar="FILE.yaml", help="its path (made absolute if it exists here)"
    )
    traffic = verbs.add_parser("traffic", help="split the requests that name no version")
    traffic.add_argument("name")
    traffic.add_argument("weights", nargs="+", metavar="V=W")
    traffic.add_argument("--shadow", metavar="V", help="mirror each request to V (never answers)")
    traffic.add_argument("--sticky", metavar="HEADER", help="hash this header to pick a version")
    variants = verbs.add_parser(
        "variants", help="set the weights (percent) of a node's variants in one version"
    )
    variants.add_argument("name")
    variants.add_argument("version")
    variants.add_argument("node")
    variants.add_argument(
        "weights", nargs="+", metavar="VARIANT=W", help="percent; the node answers the rest"
    )
    reload = verbs.add_parser("reload", help="re-read a version's files and swap them in")
    reload.add_argument("name")
    reload.add_argument("version")
    reload.add_argument("--in-place", action="store_true", help="accept a pause if it must")
    unload = verbs.add_parser("unload", help="stop routing to a version, drain it, free it")
    unload.add_argument("name")
    unload.add_argument("version")
    return p


def parse_weights(texts: Sequence[str], what: str = "VERSION") -> dict[str, float]:
    """``["1=90", "2=10"]`` -> ``{"1": 90.0, "2": 10.0}``; raises ValueError naming the bad one
    (``what``: the word for the key in the message, e.g. ``VARIANT``)."""
    weights: dict[str, float] = {}
    for text in texts:
        version, sep, value = text.rpartition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = -1.0
        if not sep or not version or weight < 0 or weight != weight:  # NaN is not >= 0 either
            msg = f"a weight is {what}=NUMBER, the number >= 0 (got {text!r})"
            raise ValueError(msg)
        weights[version] = weight
    return weights


def render(versions: Sequence[Any]) -> str:
    """``list``'s table: one row per version, columns aligned."""
    rows = [COLUMNS] + [_row(v) for v in versions]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _row(v: Any) -> tuple[str, ...]:
    shadow = "yes" if v.shadow else ""
    weight = f"{v.weight:.3g}"
    return (v.pipeline, v.version, v.state, weight, shadow, v.sticky_header or "",
            str(v.inflight), render_variants(v.variants), v.why or "")  # fmt: skip


def render_variants(variants: Any) -> str:
    """A version's node variants, compactly: ``embed: candidate=10 next(shadow); ...`` (weights
    in percent; each node answers what its variants leave)."""
    parts = []
    for node, split in sorted((variants or {}).items()):
        arms = [f"{v}={w:g}" for v, w in split.weights.items()]
        if split.shadow:
            arms.append(f"{split.shadow}(shadow)")
        parts.append(f"{node}: {' '.join(arms)}")
    return "; ".join(parts)


def main(argv: Sequence[str] | None = None, prog: str = "dagserve admin") -> int:
    args = parser(prog).parse_args(argv)  # exits 2 on a usage error
    try:
        client = _client(args)
    except (ConfigError, OSError, ValueError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return USAGE
    try:
        return _run(client, args)
    except ValueError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return USAGE
    except AdminRefused as exc:
        print(f"{prog} {args.verb}: refused: {exc}", file=sys.stderr)
        return REFUSED
    except AdminUnauthorized as exc:
        print(f"{prog} {args.verb}: {exc}", file=sys.stderr)
        return UNREACHABLE
    except ClientConnectionError as exc:
        print(f"{prog} {args.verb}: cannot reach the admin port: {exc}", file=sys.stderr)
        return UNREACHABLE
    except ApplicationError as exc:  # e.g. an inference port, which has no admin methods
        print(f"{prog} {args.verb}: {exc} (is {args.port} the admin port?)", file=sys.stderr)
        return UNREACHABLE


def _client(args: argparse.Namespace) -> AdminClient:
    token = read_token(args.token_file) if args.token_file is not None else ""
    context = None
    if args.tls_ca or args.tls_cert:
        if bool(args.tls_cert) != bool(args.tls_key):
            msg = "--tls-cert and --tls-key go together"
            raise ValueError(msg)
        context = tls_context(args.tls_ca, args.tls_cert, args.tls_key)
    return AdminClient(
        args.host, args.port, token=token, timeout_s=args.timeout, ssl_context=context
    )


def _run(client: AdminClient, args: argparse.Namespace) -> int:
    if args.verb == "list":
        print(render(client.list_versions()))
    elif args.verb == "load":
        path = Path(args.file)
        # The server reads the path: one that exists here is most likely meant as it is here.
        where = str(path.resolve()) if path.exists() else args.file
        state = client.load(where)
        print(f"loaded {state.pipeline} version {state.version} ({state.state}, weight "
              f"{state.weight:.3g})")  # fmt: skip
    elif args.verb == "traffic":
        weights = parse_weights(args.weights)
        print(render(client.traffic(
            args.name, weights, shadow=args.shadow, sticky_header=args.sticky
        )))  # fmt: skip
    elif args.verb == "variants":
        weights = parse_weights(args.weights, "VARIANT")
        print(render([client.variants(args.name, args.version, args.node, weights)]))
    elif args.verb == "reload":
        state = client.reload(args.name, args.version, in_place=args.in_place)
        print(f"reloaded {state.pipeline} version {state.version} ({state.state})")
    elif args.verb == "unload":
        client.unload(args.name, args.version)
        print(f"unloaded {args.name} version {args.version}")
    return OK


if __name__ == "__main__":
    sys.exit(main())
