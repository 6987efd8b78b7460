"""dag/loader.py and dag/errors.py: YAML to spec, with a line for every problem."""

from __future__ import annotations

import pickle

import pytest

from dag.errors import PipelineError, PipelineInvalid
from dag.loader import SourceMap, load_spec, parse_spec, parse_yaml

VALID = """\
name: p
version: 2
inputs:
  x: {dtype: float32, shape: [2]}
nodes:
  a:
    plugin: identity
    inputs: {x: $inputs.x}
outputs:
  y: a.x
"""


def problems(text: str) -> list[PipelineError]:
    with pytest.raises(PipelineInvalid) as caught:
        parse_spec(text, file="p.yaml")
    return caught.value.errors


class TestParseYaml:
    def test_records_the_line_of_every_key_and_item(self):
        data, source = parse_yaml("a:\n  b:\n    - 1\n    - {c: 2}\n")
        assert data == {"a": {"b": [1, {"c": 2}]}}
        assert source.lines[("a",)] == 1
        assert source.lines[("a", "b")] == 2
        assert source.lines[("a", "b", 1)] == 4
        assert source.lines[("a", "b", 1, "c")] == 4

    def test_nearest_line_of_a_loc_that_was_not_written(self):
        _, source = parse_yaml("nodes:\n  embed:\n    plugin: x\n")
        assert source.line(("nodes", "embed", "batching", "max_batch_size")) == 2
        assert source.line(("elsewhere",)) == 1

    def test_empty_source_map_has_no_line(self):
        assert SourceMap().line(("nodes", "a")) is None

    def test_duplicate_key_is_an_error_at_the_second_one(self):
        with pytest.raises(PipelineInvalid) as caught:
            parse_yaml("nodes:\n  a:\n    plugin: x\n    plugin: y\n", file="p.yaml")
        (error,) = caught.value.errors
        assert (error.file, error.line, error.node) == ("p.yaml", 4, "a")
        assert error.message == "duplicate key 'plugin' (first written at line 3)"

    def test_every_duplicate_key_is_reported(self):
        with pytest.raises(PipelineInvalid) as caught:
            parse_yaml("a: 1\na: 2\nb: {c: 1, c: 2}\n")
        assert [e.line for e in caught.value.errors] == [2, 3]

    def test_merge_keys_may_be_overridden(self):
        data, _ = parse_yaml("base: &b {x: 1, y: 2}\nuse:\n  <<: *b\n  y: 3\n")
        assert data["use"] == {"x": 1, "y": 3}

    def test_recursive_alias_is_an_error_not_a_hang(self):
        with pytest.raises(PipelineInvalid, match="recursive alias"):
            parse_yaml("a: &x [1, *x]\n")

    def test_collection_as_key_is_an_error(self):
        with pytest.raises(PipelineInvalid, match="mapping key must be a plain value"):
            parse_yaml("? [1, 2]\n: x\n")

    def test_python_tags_are_refused(self):
        (error,) = problems("name: !!python/object/apply:os.system ['true']\n")
        assert error.line == 1
        assert error.message == (
            "the YAML tag 'tag:yaml.org,2002:python/object/apply:os.system' is not allowed "
            "in a pipeline"
        )

    def test_syntax_error_has_its_line(self):
        (error,) = problems("name: p\nnodes:\n  a:\n    plugin: x: y\n")
        assert error.line == 4
        assert error.message.startswith("invalid YAML: mapping values are not allowed here")

    def test_unclosed_bracket_names_where_it_started(self):
        (error,) = problems("name: p\ninputs: {x: 1\nnodes: 3\n")
        assert "started at line 2" in error.message

    def test_several_documents_are_an_error(self):
        (error,) = problems("name: a\n---\nname: b\n")
        assert "single document" in error.message


class TestParseSpec:
    def test_valid_spec(self):
        spec, source = parse_spec(VALID, file="p.yaml")
        assert spec.name == "p"
        assert spec.version == "2"
        assert spec.nodes["a"].inputs == {"x": "$inputs.x"}
        assert source.file == "p.yaml"
        assert source.line(("nodes", "a")) == 6

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("", "(got an empty file)"),
            ("- 1\n", "(got list)"),
            ("just text\n", "(got str)"),
        ],
    )
    def test_top_level_must_be_a_mapping(self, text, expected):
        (error,) = problems(text)
        assert error.line == 1
        assert error.message.startswith("a pipeline must be a mapping")
        assert error.message.endswith(expected)

    def test_all_schema_errors_at_once_in_line_order(self):
        text = VALID.replace(
            "plugin: identity", "plugin: identity\n    device: gpu\n    instances: 0"
        )
        text = text.replace("shape: [2]", "shape: [two]")
        found = problems(text)
        assert [(e.line, e.node) for e in found] == [(4, None), (8, "a"), (9, "a")]
        assert (
            found[0].message == "inputs.x.shape[0]: must be a valid integer, unable to parse "
            "string as an integer (got 'two')"
        )
        assert found[1].message == "device: must be auto, cpu or cuda:N (got 'gpu')"
        assert found[2].message == "instances: must be >= 1 (got 0)"

    def test_unknown_key_suggests_the_close_one(self):
        (error,) = problems(VALID.replace("plugin: identity", "plugin: identity\n    join_: all"))
        assert (error.line, error.node) == (8, "a")
        assert error.message == "unknown key 'join_' (did you mean 'join'?)"

    def test_unknown_key_at_the_top(self):
        (error,) = problems(VALID + "extra: 1\n")
        assert (error.line, error.node, error.message) == (11, None, "unknown key 'extra'")

    def test_unknown_key_inside_a_tensor_decl(self):
        (error,) = problems(VALID.replace("shape: [2]", "shape: [2], dtyp: int8"))
        assert error.message == "inputs.x: unknown key 'dtyp' (did you mean 'dtype'?)"

    def test_missing_key_points_at_the_parent(self):
        (error,) = problems(VALID.replace("    plugin: identity\n", ""))
        assert (error.line, error.node, error.message) == (6, "a", "missing required key 'plugin'")

    def test_literal_choices(self):
        (error,) = problems(VALID.replace("plugin: identity", "plugin: identity\n    join: some"))
        assert error.message == "join: must be 'all' or 'available' (got 'some')"

    def test_long_values_are_shortened(self):
        (error,) = problems(VALID.replace("name: p", "name: " + "x y" * 50))
        assert error.message.startswith("name: must match pattern")
        assert error.message.endswith("...)")
        assert len(error.message) < 150

    def test_reading_a_missing_file(self, tmp_path):
        with pytest.raises(PipelineInvalid) as caught:
            load_spec(tmp_path / "absent.yaml")
        (error,) = caught.value.errors
        assert error.file == str(tmp_path / "absent.yaml")
        assert error.message == "cannot read the file: No such file or directory"

    def test_file_name_in_every_error(self, tmp_path):
        path = tmp_path / "p.yaml"
        path.write_text("name: p\n")
        with pytest.raises(PipelineInvalid) as caught:
            load_spec(path)
        assert {e.file for e in caught.value.errors} == {str(path)}
        assert str(caught.value).splitlines()[0] == f"{path}:1: missing required key 'inputs'"


class TestErrors:
    @pytest.mark.parametrize(
        ("kwargs", "text"),
        [
            ({"file": "p.yaml", "line": 3, "node": "a"}, "p.yaml:3: node 'a': bad"),
            ({"file": "p.yaml"}, "p.yaml: bad"),
            ({"node": "a"}, "node 'a': bad"),
            ({}, "bad"),
            ({"line": 2, "severity": "warning"}, "2: warning: bad"),
        ],
    )
    def test_str_omits_what_is_unknown(self, kwargs, text):
        assert str(PipelineError("bad", **kwargs)) == text

    def test_pipeline_error_pickles(self):
        error = PipelineError("bad", file="p.yaml", line=3, node="a", severity="warning")
        copy = pickle.loads(pickle.dumps(error))
        assert (copy.message, copy.file, copy.line, copy.node, copy.severity) == (
            "bad",
            "p.yaml",
            3,
            "a",
            "warning",
        )
        assert str(copy) == str(error)

    def test_pipeline_invalid_pickles_with_its_errors(self):
        error = PipelineInvalid([PipelineError("a", line=1), PipelineError("b", line=2, node="n")])
        copy = pickle.loads(pickle.dumps(error))
        assert [str(e) for e in copy.errors] == ["1: a", "2: node 'n': b"]
        assert str(copy) == "1: a\n2: node 'n': b"


def test_python_tag_on_a_scalar_is_refused():
    (error,) = problems("name: !!python/name:os.system\n")
    assert error.line == 1
    assert error.message.startswith("invalid YAML: could not determine a constructor")
