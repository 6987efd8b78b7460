"""Read a pipeline YAML file into a :class:`~dag.schema.PipelineSpec`, keeping line numbers.

The text is composed with a :class:`yaml.SafeLoader` (no tags that build Python objects) into
a node tree, which is walked by hand: every mapping key and sequence item records its line, and
a key written twice in one mapping is an error (plain YAML keeps the last one silently).  Each
pydantic error ``loc`` is then mapped to the nearest recorded line, and all problems of a file
are raised together as one :class:`~dag.errors.PipelineInvalid`.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydantic
import yaml

from dag.errors import PipelineError, PipelineInvalid
from dag.schema import PipelineSpec

#: a position in the document: mapping keys and sequence indexes from the root
Loc = tuple[Hashable, ...]

#: longest ``repr`` of an offending value quoted in a message
_MAX_GOT = 60

#: pydantic's "Input should be ..." / "String should match ..." openings
_SHOULD = re.compile(r"^\w+ should ")

#: pydantic's tail on length errors, which the "(got ...)" says better
_AFTER_VALIDATION = re.compile(r" after validation, not \d+$")

#: pydantic's words for bounds, and the signs a reader scans faster
_COMPARISONS = (
    ("greater than or equal to", ">="),
    ("less than or equal to", "<="),
    ("greater than", ">"),
    ("less than", "<"),
)


@dataclass(frozen=True)
class SourceMap:
    """Where each part of a pipeline was written.

    Attributes:
        file: the file's path as given, or None for text that came from elsewhere.
        lines: document position -> 1-based line of its key (or sequence item).

    >>> source = SourceMap("p.yaml", {(): 1, ("nodes",): 4, ("nodes", "embed"): 5})
    >>> source.line(("nodes", "embed", "batching", "max_batch_size"))
    5
    """

    file: str | None = None
    lines: Mapping[Loc, int] = field(default_factory=dict)

    def line(self, loc: Sequence[Hashable]) -> int | None:
        """The line of ``loc``, or of its nearest written ancestor; None when nothing is known."""
        for end in range(len(loc), -1, -1):
            found = self.lines.get(tuple(loc[:end]))
            if found is not None:
                return found
        return None

    def error(
        self, loc: Sequence[Hashable], message: str, *, node: str | None = None
    ) -> PipelineError:
        """A :class:`PipelineError` placed at ``loc``."""
        return PipelineError(message, file=self.file, line=self.line(loc), node=node)

    def warning(
        self, loc: Sequence[Hashable], message: str, *, node: str | None = None
    ) -> PipelineError:
        """Like :meth:`error`, as a warning."""
        return PipelineError(
            message, file=self.file, line=self.line(loc), node=node, severity="warning"
        )


#: the only tags of collections a pipeline may use (set, omap and !!python/... are refused)
_PLAIN_TAGS = frozenset({"tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"})


class _Loader(yaml.SafeLoader):
    """The safe loader; its node tree is walked by :func:`_construct`."""


class _Builder:
    """Turns a composed YAML node tree into plain data, recording lines and duplicate keys."""

    def __init__(self, loader: _Loader, file: str | None) -> None:
        self.loader = loader
        self.file = file
        self.lines: dict[Loc, int] = {}
        self.errors: list[PipelineError] = []
        self._open: set[int] = set()  # ids of the collections being built (recursive aliases)

    def build(self, node: yaml.Node, loc: Loc) -> Any:
        if isinstance(node, yaml.ScalarNode):
            return self.loader.construct_object(node, deep=True)
        if id(node) in self._open:
            self._error(
                node, "a recursive alias (an anchor used inside itself) is not allowed", loc
            )
            return None
        if node.tag not in _PLAIN_TAGS:
            self._error(node, f"the YAML tag {node.tag!r} is not allowed in a pipeline", loc)
            return None
        self._open.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node, loc)
            if isinstance(node, yaml.SequenceNode):
                return self._sequence(node, loc)
            return self.loader.construct_object(node, deep=True)
        finally:
            self._open.discard(id(node))

    def _sequence(self, node: yaml.SequenceNode, loc: Loc) -> list[Any]:
        items = []
        for index, item in enumerate(node.value):
            self.lines[(*loc, index)] = item.start_mark.line + 1
            items.append(self.build(item, (*loc, index)))
        return items

    def _mapping(self, node: yaml.MappingNode, loc: Loc) -> dict[Any, Any]:
        # Duplicates are judged on the keys written here; keys merged in with `<<` may be
        # overridden, as YAML intends.
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self._key(key_node)
            line = key_node.start_mark.line + 1
            if key in seen:
                message = f"duplicate key {key!r} (first written at line {seen[key]})"
                self._error(key_node, message, loc)
            else:
                seen[key] = line
        self.loader.flatten_mapping(node)  # resolves `<<: *anchor` merges
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = self._key(key_node)
            self.lines[(*loc, key)] = key_node.start_mark.line + 1
            result[key] = self.build(value_node, (*loc, key))
        return result

    def _key(self, key_node: yaml.Node) -> Hashable:
        key = self.build(key_node, ())
        if isinstance(key, Hashable):
            return key
        self._error(key_node, "a mapping key must be a plain value (got a collection)", ())
        return f"<line {key_node.start_mark.line + 1}>"

    def _error(self, node: yaml.Node, message: str, loc: Loc) -> None:
        name = str(loc[1]) if len(loc) >= 2 and loc[0] == "nodes" else None
        line = node.start_mark.line + 1
        self.errors.append(PipelineError(message, file=self.file, line=line, node=name))


def parse_yaml(text: str, *, file: str | None = None) -> tuple[Any, SourceMap]:
    """Parse YAML text safely into plain data and the line of every key.

    Args:
        text: the YAML document (exactly one).
        file: the name used in errors.

    Returns:
        ``(data, source)``: the data (None for an empty document) and its :class:`SourceMap`.

    Raises:
        PipelineInvalid: a syntax error, or keys written twice in one mapping.

    >>> data, source = parse_yaml("name: p\\nnodes:\\n  a: {plugin: identity}\\n")
    >>> data["nodes"], source.line(("nodes", "a", "plugin"))
    ({'a': {'plugin': 'identity'}}, 3)
    """
    loader = _Loader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None, SourceMap(file, {(): 1})
        builder = _Builder(loader, file)
        data = builder.build(root, ())
    except yaml.MarkedYAMLError as exc:
        raise PipelineInvalid([_yaml_error(exc, file)]) from exc
    except yaml.YAMLError as exc:
        raise PipelineInvalid([PipelineError(f"invalid YAML: {exc}", file=file)]) from exc
    finally:
        loader.dispose()
    if builder.errors:
        raise PipelineInvalid(builder.errors)
    builder.lines[()] = root.start_mark.line + 1
    return data, SourceMap(file, builder.lines)


def _yaml_error(exc: yaml.MarkedYAMLError, file: str | None) -> PipelineError:
    mark = exc.problem_mark or exc.context_mark
    what = exc.problem or exc.context or "unreadable"
    if exc.problem_mark is not None:
        what += f" (column {exc.problem_mark.column + 1})"
    if exc.problem and exc.context:
        started = f" started at line {exc.context_mark.line + 1}" if exc.context_mark else ""
        what += f", {exc.context}{started}"
    line = mark.line + 1 if mark is not None else None
    return PipelineError(f"invalid YAML: {what}", file=file, line=line)


def parse_spec(text: str, *, file: str | None = None) -> tuple[PipelineSpec, SourceMap]:
    """Parse and check the text of a pipeline file against the schema.

    Args:
        text: the YAML text.
        file: the name used in errors.

    Returns:
        The spec and where each part of it was written.

    Raises:
        PipelineInvalid: every syntax and schema error of the text, each with its line.

    >>> parse_spec("name: p\\nnodes: {}\\n", file="p.yaml")
    Traceback (most recent call last):
    ...
    dag.errors.PipelineInvalid: p.yaml:1: missing required key 'inputs'
    p.yaml:1: missing required key 'outputs'
    p.yaml:2: nodes: must have at least 1 item (got {})
    """
    data, source = parse_yaml(text, file=file)
    if not isinstance(data, dict):
        got = "an empty file" if data is None else type(data).__name__
        message = f"a pipeline must be a mapping of name, inputs, nodes and outputs (got {got})"
        raise PipelineInvalid([PipelineError(message, file=file, line=source.line(()))])
    try:
        spec = PipelineSpec.model_validate(data)
    except pydantic.ValidationError as exc:
        errors = [_schema_error(detail, source) for detail in exc.errors(include_url=False)]
        raise PipelineInvalid(sorted(errors, key=_file_order)) from None
    return spec, source


def load_spec(path: str | Path) -> tuple[PipelineSpec, SourceMap]:
    """Read a pipeline file and check it against the schema.

    Args:
        path: the YAML file.

    Returns:
        The spec and where each part of it was written.

    Raises:
        PipelineInvalid: the file cannot be read, or every syntax and schema error in it.
    """
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise PipelineInvalid(
            [PipelineError(f"cannot read the file: {reason}", file=file)]
        ) from exc
    return parse_spec(text, file=file)


def _file_order(error: PipelineError) -> int:
    return error.line if error.line is not None else 0


def _schema_error(detail: Mapping[str, Any], source: SourceMap) -> PipelineError:
    """One pydantic error as "where: what must be what (got value)", at its line and node."""
    loc = _data_loc(detail["loc"], source)
    node = None
    where = loc
    if len(loc) >= 2 and loc[0] == "nodes":
        node, where = str(loc[1]), loc[2:]
    kind = detail["type"]
    if kind == "extra_forbidden":
        message = f"unknown key {where[-1]!r}{_did_you_mean(loc)}"
        where = where[:-1]
    elif kind == "missing":
        message = f"missing required key {where[-1]!r}"
        where = where[:-1]
    else:
        message = _SHOULD.sub("must ", detail["msg"].removeprefix("Value error, "))
        message = _AFTER_VALIDATION.sub("", message)
        for words, sign in _COMPARISONS:
            message = message.replace(words, sign)
        if "(got " not in message:
            message = f"{message} (got {_short(detail.get('input'))})"
    path = _dotted(where)
    return source.error(loc, f"{path}: {message}" if path else message, node=node)


def _data_loc(loc: Sequence[Any], source: SourceMap) -> Loc:
    """``loc`` without pydantic's own steps (``[key]``, union tags) that name no data."""
    kept: list[Hashable] = []
    for step in loc:
        candidate = (*kept, step)
        if isinstance(step, int) or candidate in source.lines or not _is_pydantic_step(step):
            kept.append(step)
    return tuple(kept)


def _is_pydantic_step(step: Any) -> bool:
    return isinstance(step, str) and (
        step == "[key]" or "[" in step or step.startswith("function-")
    )


def _dotted(loc: Sequence[Hashable]) -> str:
    text = ""
    for step in loc:
        text += f"[{step}]" if isinstance(step, int) else f".{step}" if text else str(step)
    return text


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_GOT else text[: _MAX_GOT - 3] + "..."


def _did_you_mean(loc: Loc) -> str:
    """`` (did you mean 'x'?)`` for an unknown key close to a field of the model at ``loc``."""
    model = _model_at(loc[:-1])
    if model is None:
        return ""
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _model_at(loc: Sequence[Hashable]) -> type[pydantic.BaseModel] | None:
    """The pydantic model that validates the mapping at ``loc`` of a pipeline, if any."""
    annotation: Any = PipelineSpec
    for step in loc:
        annotation = _unwrap_optional(annotation)
        if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
            info = annotation.model_fields.get(str(step))
            if info is None:
                return None
            annotation = info.annotation
        elif typing.get_origin(annotation) in (dict, list):
            annotation = typing.get_args(annotation)[-1]
        else:
            return None
    annotation = _unwrap_optional(annotation)
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return annotation
    return None


def _unwrap_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(options) == 1:
            return options[0]
    return annotation


__all__ = ["Loc", "SourceMap", "load_spec", "parse_spec", "parse_yaml"]
