"""What is wired into a node against what its plugin declares: the rules, and their messages.

The pipeline validator applies them to every node, and :class:`~model_plugins.PluginHarness`
to the ``upstream`` it is given, so both refuse a wrong wiring with the same words.

>>> from model_plugins.specs import TensorSpec
>>> declared = {"x": TensorSpec("float32", [4])}
>>> wiring_problems(declared, {"x": TensorSpec("float32", [3])}, plugin="p", sources={"x": "a.y"})
[('x', "input 'x' must be float32[4] (got float32[3] from a.y)")]
"""

from __future__ import annotations

from collections.abc import Mapping

from model_plugins.specs import TensorSpec


def wiring_problems(
    declared: Mapping[str, TensorSpec],
    wired: Mapping[str, TensorSpec | None],
    *,
    plugin: str,
    mirrors: bool = False,
    sources: Mapping[str, str] | None = None,
) -> list[tuple[str | None, str]]:
    """Every problem of one node's wiring.

    Args:
        declared: the node's inputs, as its plugin's ``signature`` gives them.
        wired: each input name the node wires -> the spec of the tensor wired into it, None
            where unknown.
        plugin: the plugin reference, for the messages.
        mirrors: the plugin works its specs out from what feeds it (it overrides
            ``signature``): it cannot declare a tensor of unknown spec, so such an input is
            no problem.
        sources: input name -> what is wired into it (``embed.vector``), for the messages.

    Returns:
        ``(input name, message)`` for each problem; the name is None for a missing input.
    """
    problems: list[tuple[str | None, str]] = []
    for local, got in wired.items():
        if local in declared or (mirrors and got is None):
            continue
        problems.append(
            (
                local,
                f"input {local!r} is not an input of plugin {plugin!r} "
                f"(it declares: {', '.join(declared)})",
            )
        )
    for local, want in declared.items():
        if not want.optional and local not in wired:
            problems.append(
                (None, f"missing required input {local!r} ({want.describe()}) of plugin {plugin!r}")
            )
    for local, got in wired.items():
        spec = declared.get(local)
        if got is not None and spec is not None and not got.compatible_with(spec):
            source = (sources or {}).get(local)
            text = f"{got.describe()} from {source}" if source else got.describe()
            problems.append((local, f"input {local!r} must be {spec.describe()} (got {text})"))
    return problems


__all__ = ["wiring_problems"]
