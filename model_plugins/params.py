"""Typed reads of a node's ``params:``, every problem in one style.

A plugin reads its params twice: in :meth:`~model_plugins.ModelPlugin.signature` (validation
time, no node at hand) and in :meth:`~model_plugins.ModelPlugin.load` (with a
:class:`~model_plugins.LoadContext`).  Build a :class:`Params` in both, with the same ``known``
keys, and read each key through it: an unknown key or a bad value raises
:class:`~model_plugins.errors.PluginLoadError` saying what the value must be and what it was::

    node 'proj' (plugin 'mymod:Project'): params.dim must be a positive integer (got 0)

>>> params = Params({"dim": 4}, known=("dim", "normalize"))
>>> params.positive_int("dim"), params.flag("normalize", default=False)
(4, False)
>>> try:
...     Params({"dim": 0}, ("dim",), node="proj", plugin="mymod:Project").positive_int("dim")
... except PluginLoadError as exc:
...     print(exc)
node 'proj' (plugin 'mymod:Project'): params.dim must be a positive integer (got 0)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn, overload

from model_plugins.errors import PluginLoadError, node_label
from model_plugins.plugin import LoadContext


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Params:
    """A node's ``params:``, checked against the keys the plugin knows.

    Args:
        params: the node's ``params:`` (``context.params``, or the ``params`` argument of
            ``signature``).
        known: every key the plugin understands; any other key is an error.
        node: the node, for the messages (None in ``signature``: the validator adds it).
        plugin: the plugin reference, for the messages.

    Raises:
        PluginLoadError: ``params`` holds a key that is not in ``known``.
    """

    def __init__(
        self,
        params: Mapping[str, Any],
        known: Sequence[str],
        *,
        node: str | None = None,
        plugin: str | None = None,
    ) -> None:
        self.values = dict(params)
        #: how the messages name the node: ``node 'x' (plugin 'y')``, or "" when unknown
        self.where = node_label(node, plugin) if node or plugin else ""
        unknown = sorted(set(self.values) - set(known))
        if unknown:
            self.fail(f"unknown params: {', '.join(unknown)} (known: {', '.join(known)})")

    @classmethod
    def of(cls, context: LoadContext, known: Sequence[str]) -> Params:
        """The params of the node being loaded, named after it in the messages."""
        return cls(context.params, known, node=context.node, plugin=context.plugin)

    def fail(self, message: str) -> NoReturn:
        """Raise :class:`PluginLoadError` with ``message``, naming the node when known."""
        raise PluginLoadError(f"{self.where}: {message}" if self.where else message)

    def value(self, key: str, default: Any, *, ok: Callable[[Any], bool], must: str) -> Any:
        """``params[key]`` (``default`` when absent), which ``ok`` must accept.

        ``must`` completes the message ``params.KEY must be ...``; the default is not checked.

        >>> Params({"size": [2, 3]}, ("size",)).value("size", None, ok=lambda v: len(v) == 2,
        ...                                          must="[H, W]")
        [2, 3]
        """
        if key not in self.values:
            return default
        value = self.values[key]
        if not ok(value):
            self.fail(f"params.{key} must be {must} (got {value!r})")
        return value

    @overload
    def string(self, key: str, default: str) -> str: ...
    @overload
    def string(self, key: str, default: None = None) -> str | None: ...
    def string(self, key: str, default: str | None = None) -> str | None:
        """A non-empty string."""
        value: str | None = self.value(
            key, default, ok=lambda v: isinstance(v, str) and bool(v), must="a non-empty string"
        )
        return value

    def flag(self, key: str, default: bool) -> bool:
        """``true`` or ``false``."""
        value: bool = self.value(
            key, default, ok=lambda v: isinstance(v, bool), must="true or false"
        )
        return value

    @overload
    def positive_int(self, key: str, default: int) -> int: ...
    @overload
    def positive_int(self, key: str, default: None = None) -> int | None: ...
    def positive_int(self, key: str, default: int | None = None) -> int | None:
        """An integer > 0 (``true`` is not one)."""
        value: int | None = self.value(
            key, default, ok=lambda v: _is_int(v) and v > 0, must="a positive integer"
        )
        return value

    def number(self, key: str, default: float) -> float:
        """A finite number (``true`` is not one)."""
        value = self.value(
            key, default, ok=lambda v: _is_number(v) and math.isfinite(v), must="a number"
        )
        return float(value)

    def numbers(
        self, key: str, default: Sequence[float], *, count: int, positive: bool = False
    ) -> tuple[float, ...]:
        """A list of ``count`` finite numbers (each > 0 when ``positive``)."""

        def ok(value: object) -> bool:
            return (
                isinstance(value, (list, tuple))
                and len(value) == count
                and all(_is_number(v) and math.isfinite(v) for v in value)
                and all(v > 0 or not positive for v in value)
            )

        what = "positive numbers" if positive else "numbers"
        return tuple(float(v) for v in self.value(key, default, ok=ok, must=f"{count} {what}"))

    def names(self, key: str) -> list[str] | None:
        """A list of distinct, non-empty names, or None when absent."""

        def ok(value: object) -> bool:
            return (
                isinstance(value, list)
                and bool(value)
                and all(isinstance(v, str) and v for v in value)
                and len(set(value)) == len(value)
            )

        value = self.value(key, None, ok=ok, must="a list of distinct names")
        return list(value) if value is not None else None

    def mapping(self, key: str) -> dict[str, str]:
        """A name -> name mapping, empty when absent."""

        def ok(value: object) -> bool:
            return isinstance(value, Mapping) and all(
                isinstance(k, str) and isinstance(v, str) and k and v for k, v in value.items()
            )

        return dict(self.value(key, {}, ok=ok, must="a mapping of names to names"))


__all__ = ["Params"]
