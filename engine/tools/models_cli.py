"""``dagserve models``: register model files in the MLflow registry that ``models:/`` names
resolve against, move aliases, list versions.

::

    dagserve models [--registry-uri URI | --config CONFIG.yaml] VERB ...
      register NAME PATH [--alias ALIAS]     a file or a folder as the next version; prints it
      alias NAME ALIAS VERSION               point ALIAS at VERSION (a rollout, or a rollback)
      list [NAME]                            versions, aliases, sizes

The tracking URI is the server's: ``--registry-uri``, else ``registry_uri`` of ``--config``,
else ``MLFLOW_TRACKING_URI``, else the embedded sqlite store (``engine.runtime.registry``).

Exit codes: 0 done; 1 refused (unknown name or version, registry unreachable: the reason is
printed); 2 usage.
"""

# ruff: noqa: T201 (a command's job is to print, as engine/cli.py's, which pyproject exempts)
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from engine.errors import ConfigError, RegistryError

#: exit codes (the module docstring)
OK, REFUSED, USAGE = 0, 1, 2


def parser(prog: str = "dagserve models") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Register models, move aliases and list versions in the registry."
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument("--registry-uri", help="MLflow tracking URI (sqlite:///..., http://...)")
    where.add_argument("--config", type=Path, help="a server config: use its registry_uri")
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    register = verbs.add_parser("register", help="a file or folder as the next version")
    register.add_argument("name")
    register.add_argument("path", type=Path)
    register.add_argument("--alias", help="point this alias at the new version")
    alias = verbs.add_parser("alias", help="point an alias at a version")
    alias.add_argument("name")
    alias.add_argument("alias")
    alias.add_argument("version")
    listing = verbs.add_parser("list", help="versions, aliases and sizes")
    listing.add_argument("name", nargs="?")
    return p


def tracking_uri(args: argparse.Namespace) -> str:
    """The URI the server would use (see the module docstring)."""
    from engine.runtime.registry import default_tracking_uri

    if args.registry_uri:
        return str(args.registry_uri)
    if args.config is not None:
        from engine.config import load_config

        configured = load_config(args.config).registry_uri
        if configured:
            return configured
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def main(argv: Sequence[str]) -> int:
    args = parser().parse_args(argv)
    from engine.runtime import registry

    try:
        uri = tracking_uri(args)
        if args.verb == "register":
            print(registry.register(uri, args.name, args.path, alias=args.alias))
        elif args.verb == "alias":
            registry.set_alias(uri, args.name, args.alias, args.version)
            print(f"{args.name}@{args.alias} -> version {args.version}")
        else:
            rows = registry.list_versions(uri, args.name)
            table = [("name", "version", "aliases", "bytes", "source")]
            table += [
                (r.name, r.version, ",".join(r.aliases) or "-",
                 "?" if r.size is None else str(r.size), r.source)
                for r in rows
            ]  # fmt: skip
            widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
            for row in table:
                print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)), row[-1])
    except (RegistryError, ConfigError) as exc:
        print(f"dagserve models {args.verb}: {exc}", file=sys.stderr)
        return REFUSED
    return OK


__all__ = ["main", "parser", "tracking_uri"]
