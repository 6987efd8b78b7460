"""dag/graph.py and dag/pipeline.py: the DAG, its checks, and the compiled pipeline."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import networkx as nx
import pytest

from dag import Pipeline, PipelineInvalid, build_graph, load_pipeline, load_pipelines, validate
from dag.graph import INPUTS, OUTPUTS, Wire, analyze, find_cycles
from dag.schema import PipelineSpec
from model_plugins.errors import PluginLoadError
from model_plugins.plugin import ModelPlugin
from model_plugins.registry import resolve
from model_plugins.specs import TensorSpec
from tests.dag import fixtures

CASES = Path(__file__).parent / "cases"
F = "tests.dag.fixtures"

#: case file -> (line, node, a fragment of the message) of its one error
EXPECTED: dict[str, tuple[int, str | None, str]] = {
    "e_cycle": (5, "first", "cycle: first -> second -> third -> first"),
    "e_unresolved_ref": (7, "decode", "input 'data': $inputs.imgae names no pipeline input"),
    "e_unknown_output_in_ref": (
        11,
        "embed",
        "node 'decode' has no output 'pixel' (outputs: pixels)",
    ),
    "e_unknown_node_in_ref": (
        11,
        "embed",
        "input 'pixels': decoder.pixels names no node 'decoder'",
    ),
    "e_output_not_produced": (
        10,
        None,
        "output 'embedding': node 'decode' has no output 'embedding'",
    ),
    "e_output_unknown_node": (
        10,
        None,
        "output 'embedding': embed.embedding names no node 'embed'",
    ),
    "e_unknown_plugin": (6, "decode", 'module "tests.dag.fixtures" has no attribute "Decoder"'),
    "e_unknown_plugin_name": (6, "decode", 'unknown plugin "image_decoder"'),
    "e_not_a_plugin": (6, "decode", "which is not a ModelPlugin subclass"),
    "e_signature_fails": (6, "decode", "signature() failed: KeyError: 'needs params.width'"),
    "e_dtype_mismatch": (
        8,
        "text_embed",
        "input 'text' must be string[] (got bytes[] from $inputs.text)",
    ),
    "e_shape_mismatch": (
        8,
        "embed",
        "input 'pixels' must be float32[3, 4, 4] (got float32[3, 8, 8]",
    ),
    "e_shape_mismatch_between_nodes": (
        11,
        "scale",
        "input 'x' must be float32[?] (got float32[3, 4, 4] from decode.pixels)",
    ),
    "e_unknown_key": (12, "embed", "batching: unknown key 'max_batch_szie' (did you mean 'max_bat"),
    "e_bad_batching_value": (13, "embed", "batching.max_batch_size: must be >= 1 (got 0)"),
    "e_yaml_syntax": (7, None, "invalid YAML: mapping values are not allowed here"),
    "e_duplicate_key": (8, "decode", "duplicate key 'plugin' (first written at line 6)"),
    "e_bad_ref_syntax": (
        11,
        "embed",
        "input 'pixels': a reference must be $inputs.NAME or NODE.OUTPUT",
    ),
    "e_missing_required_input": (7, "scale", "missing required input 'x' (float32[?])"),
    "e_unknown_plugin_input": (12, "embed", "input 'mask' is not an input of plugin"),
    "e_missing_plugin_key": (5, "decode", "missing required key 'plugin'"),
    "e_bad_node_name": (5, "image-decode", "a node name must be a letter or _"),
}

#: cases whose one mistake is (rightly) reported more than once
SEVERAL = {"e_bad_node_name": 2}


@pytest.fixture(autouse=True)
def _restore_sys_path(monkeypatch):
    """load_pipeline puts the file's folder on sys.path; keep that inside each test."""
    monkeypatch.setattr(sys, "path", list(sys.path))


def spec_of(**nodes: dict[str, object]) -> PipelineSpec:
    """A pipeline with input ``image`` (bytes) and the given nodes; output ``out`` = last node."""
    last = list(nodes)[-1]
    return PipelineSpec.model_validate(
        {
            "name": "p",
            "inputs": {"image": {"dtype": "bytes"}},
            "nodes": nodes,
            "outputs": {"out": f"{last}.{nodes[last].pop('_out', 'pixels')}"},
        }
    )


def decode() -> dict[str, object]:
    return {"plugin": f"{F}:Decode", "inputs": {"data": "$inputs.image"}}


class TestCases:
    def test_every_case_file_is_in_the_table(self):
        files = {p.stem for p in CASES.glob("e_*.yaml")}
        assert files == set(EXPECTED)

    @pytest.mark.parametrize("case", sorted(EXPECTED))
    def test_error_names_file_line_and_node(self, case):
        path = CASES / f"{case}.yaml"
        line, node, fragment = EXPECTED[case]
        with pytest.raises(PipelineInvalid) as caught:
            load_pipeline(path)
        errors = caught.value.errors
        assert len(errors) == SEVERAL.get(case, 1), errors
        first = errors[0]
        assert (first.file, first.line, first.node) == (str(path), line, node)
        assert fragment in first.message
        assert str(first).startswith(f"{path}:{line}: ")
        assert first.severity == "error"

    def test_valid_case_loads(self):
        pipeline = load_pipeline(CASES / "ok_valid.yaml")
        assert pipeline.warnings == []
        assert (pipeline.name, pipeline.version) == ("ok_valid", "1")

    def test_unused_input_is_a_warning(self):
        path = CASES / "w_unused_input.yaml"
        pipeline = load_pipeline(path)
        (warning,) = pipeline.warnings
        assert (warning.file, warning.line, warning.node) == (str(path), 4, None)
        assert warning.severity == "warning"
        assert str(warning) == f"{path}:4: warning: input 'extra' is declared but nothing reads it"

    def test_load_pipelines_collects_every_file(self):
        paths = [CASES / "ok_valid.yaml", CASES / "e_cycle.yaml", CASES / "e_unknown_key.yaml"]
        pipelines, errors = load_pipelines(paths)
        assert [p.name for p in pipelines] == ["ok_valid"]
        assert [Path(str(e.file)).stem for e in errors] == ["e_cycle", "e_unknown_key"]

    def test_invalid_pickles(self):
        with pytest.raises(PipelineInvalid) as caught:
            load_pipeline(CASES / "e_cycle.yaml")
        copy = pickle.loads(pickle.dumps(caught.value))
        assert str(copy) == str(caught.value)
        assert copy.errors[0].node == "first"


class TestBuildGraph:
    def test_nodes_pseudo_nodes_and_wires(self):
        spec = spec_of(
            decode=decode(),
            scale={
                "plugin": f"{F}:Scale",
                "inputs": {"x": "decode.pixels", "factor": "decode.pixels"},
                "_out": "y",
            },
        )
        graph = build_graph(spec)
        assert list(graph) == [INPUTS, "decode", "scale", OUTPUTS]
        assert graph.nodes["decode"] == {"kind": "node", "plugin": f"{F}:Decode", "join": "all"}
        assert graph.edges["decode", "scale"]["wires"] == [
            Wire("pixels", "x"),
            Wire("pixels", "factor"),
        ]
        assert graph.edges[INPUTS, "decode"]["wires"] == [Wire("image", "data")]
        assert graph.edges["scale", OUTPUTS]["wires"] == [Wire("y", "out")]

    def test_bad_references_make_no_edge(self):
        spec = spec_of(
            decode={"plugin": "x", "inputs": {"a": "nowhere.x", "b": "bad", "c": "$inputs.no"}}
        )
        graph = build_graph(spec)
        assert graph.in_degree("decode") == 0

    def test_self_loop_is_a_cycle(self):
        spec = spec_of(a={"plugin": f"{F}:Mirror", "inputs": {"x": "a.x"}, "_out": "x"})
        assert find_cycles(build_graph(spec)) == [["a"]]
        errors = validate(build_graph(spec), spec)
        assert [e.message for e in errors if not e.is_warning] == ["cycle: a -> a"]

    def test_each_cycle_is_reported(self):
        graph = nx.DiGraph([("a", "b"), ("b", "a"), ("c", "d"), ("d", "c"), ("b", "c")])
        assert find_cycles(graph) == [["a", "b"], ["c", "d"]]


class TestSignatures:
    def test_compiled_pipeline(self):
        pipeline = load_pipeline(CASES / "ok_valid.yaml")
        assert pipeline.order == ["decode", "embed", "text_embed", "fuse"]
        assert pipeline.path == CASES / "ok_valid.yaml"
        assert pipeline.input_specs["text"] == TensorSpec("string", [], optional=True)
        assert pipeline.output_specs == {"embedding": TensorSpec("float32", [8])}
        assert pipeline.plugin_classes["embed"] is fixtures.Embed
        inputs, outputs = pipeline.node_signatures["decode"]
        assert (inputs, outputs) == (dict(fixtures.Decode.inputs), dict(fixtures.Decode.outputs))
        assert pipeline.line_of("embed") == 11
        assert pipeline.line_of("nowhere") is None
        assert nx.is_frozen(pipeline.graph)

    def test_from_spec_has_no_path_or_lines(self):
        pipeline = Pipeline.from_spec(spec_of(decode=decode()))
        assert pipeline.path is None
        assert pipeline.line_of("decode") is None

    def test_from_spec_errors_have_no_place_but_the_node(self):
        spec = spec_of(decode={"plugin": f"{F}:Decode", "inputs": {"data": "$inputs.nope"}})
        with pytest.raises(PipelineInvalid) as caught:
            Pipeline.from_spec(spec)
        (error,) = caught.value.errors
        assert (error.file, error.line, error.node) == (None, None, "decode")

    def test_mirror_passes_specs_along(self):
        spec = spec_of(
            decode=decode(),
            mirror={"plugin": f"{F}:Mirror", "inputs": {"pixels": "decode.pixels"}},
        )
        pipeline = Pipeline.from_spec(spec)
        assert pipeline.output_specs["out"] == TensorSpec("float32", [3, 4, 4])

    def test_mismatch_is_found_through_a_mirror(self):
        spec = spec_of(
            decode=decode(),
            mirror={"plugin": f"{F}:Mirror", "inputs": {"x": "decode.pixels"}},
            scale={"plugin": f"{F}:Scale", "inputs": {"x": "mirror.x"}, "_out": "y"},
        )
        (error,) = validate(build_graph(spec), spec)
        assert error.node == "scale"
        assert error.message == "input 'x' must be float32[?] (got float32[3, 4, 4] from mirror.x)"

    def test_outputs_of_an_opaque_node_are_unknown(self):
        spec = spec_of(
            decode=decode(),
            opaque={"plugin": f"{F}:Opaque", "inputs": {"anything": "decode.pixels"}},
            mirror={"plugin": f"{F}:Mirror", "inputs": {"x": "opaque.whatever"}, "_out": "x"},
        )
        found = analyze(build_graph(spec), spec)
        assert found.errors == []
        assert found.node_signatures["mirror"] == ({}, {})
        assert found.output_specs == {"out": None}

    def test_yaml_outputs_supply_specs(self):
        spec = spec_of(
            decode=decode(),
            opaque={
                "plugin": f"{F}:Opaque",
                "inputs": {"x": "decode.pixels"},
                "outputs": {"embedding": {"dtype": "float32", "shape": [8]}},
            },
            scale={"plugin": f"{F}:Scale", "inputs": {"x": "opaque.embeding"}, "_out": "y"},
        )
        (error,) = validate(build_graph(spec), spec)
        assert error.message == (
            "input 'x': node 'opaque' has no output 'embeding' (outputs: embedding)"
        )

    def test_yaml_outputs_override_the_plugin(self):
        spec = spec_of(
            decode={**decode(), "outputs": {"pixels": {"dtype": "float32", "shape": [-1]}}},
            scale={"plugin": f"{F}:Scale", "inputs": {"x": "decode.pixels"}, "_out": "y"},
        )
        pipeline = Pipeline.from_spec(spec)
        assert pipeline.node_signatures["decode"][1]["pixels"] == TensorSpec("float32", [-1])

    def test_identity_builtin_with_unknown_upstream(self):
        spec = spec_of(
            decode=decode(),
            opaque={"plugin": f"{F}:Opaque", "inputs": {"x": "decode.pixels"}},
            same={"plugin": "identity", "inputs": {"x": "opaque.x", "pixels": "decode.pixels"}},
        )
        pipeline = Pipeline.from_spec(spec)
        assert pipeline.node_signatures["same"][0] == {"pixels": TensorSpec("float32", [3, 4, 4])}

    def test_output_may_name_a_pipeline_input(self):
        spec = spec_of(decode=decode())
        spec = spec.model_copy(update={"outputs": {"raw": "$inputs.image", "out": "decode.pixels"}})
        pipeline = Pipeline.from_spec(spec)
        assert pipeline.output_specs["raw"] == TensorSpec("bytes", [])
        assert list(pipeline.graph.predecessors(OUTPUTS)) == [INPUTS, "decode"]

    def test_optional_plugin_input_may_be_left_out(self):
        spec = spec_of(
            decode=decode(),
            fuse={"plugin": f"{F}:Fuse", "inputs": {"image": "decode.pixels"}, "_out": "embedding"},
        )
        (error,) = validate(build_graph(spec), spec)
        assert error.message.startswith("input 'image' must be float32[8]")

    def test_validate_lists_errors_then_warnings(self):
        spec = PipelineSpec.model_validate(
            {
                "name": "p",
                "inputs": {"unused": {"dtype": "int8"}, "image": {"dtype": "bytes"}},
                "nodes": {"decode": {"plugin": f"{F}:Decode", "inputs": {"data": "$inputs.image"}}},
                "outputs": {"out": "decode.nothing"},
            }
        )
        problems = validate(build_graph(spec), spec)
        assert [p.severity for p in problems] == ["error", "warning"]


class TestResolver:
    def test_plugin_load_error_is_kept(self):
        def failing(reference: str) -> type[ModelPlugin]:
            if reference.endswith("Decode"):
                raise PluginLoadError(f'plugin "{reference}": importing failed: no GPU')
            return resolve(reference)

        with pytest.raises(PipelineInvalid) as caught:
            load_pipeline(CASES / "ok_valid.yaml", resolver=failing)
        (error,) = caught.value.errors
        assert (error.line, error.node) == (9, "decode")
        assert error.message == f'plugin "{F}:Decode": importing failed: no GPU'

    def test_any_resolver_exception_becomes_an_error(self):
        def broken(reference: str) -> type[ModelPlugin]:
            raise RuntimeError("boom")

        with pytest.raises(PipelineInvalid) as caught:
            Pipeline.from_spec(spec_of(decode=decode()), resolver=broken)
        (error,) = caught.value.errors
        assert error.message == f"plugin '{F}:Decode' cannot be resolved: RuntimeError: boom"

    def test_each_plugin_is_resolved_once(self):
        seen: list[str] = []

        def counting(reference: str) -> type[ModelPlugin]:
            seen.append(reference)
            return resolve(reference)

        load_pipeline(CASES / "ok_valid.yaml", resolver=counting)
        assert sorted(seen) == sorted(
            {f"{F}:{c}" for c in ("Decode", "Embed", "TextEmbed", "Fuse")}
        )

    def test_plugin_next_to_the_yaml_is_importable(self, tmp_path, monkeypatch):
        monkeypatch.delitem(sys.modules, "next_door_plugins", raising=False)
        (tmp_path / "next_door_plugins.py").write_text(
            "from model_plugins.plugin import ModelPlugin\n"
            "from model_plugins.specs import TensorSpec\n"
            "class Local(ModelPlugin):\n"
            "    inputs = {'x': TensorSpec('float32', [2])}\n"
            "    outputs = {'y': TensorSpec('float32', [2])}\n"
        )
        path = tmp_path / "p.yaml"
        path.write_text(
            "name: local\ninputs:\n  x: {dtype: float32, shape: [2]}\n"
            "nodes:\n  a:\n    plugin: next_door_plugins:Local\n    inputs: {x: $inputs.x}\n"
            "outputs:\n  y: a.y\n"
        )
        pipeline = load_pipeline(path)
        assert sys.path[0] == str(tmp_path)
        assert pipeline.plugin_classes["a"].__module__ == "next_door_plugins"
        monkeypatch.delitem(sys.modules, "next_door_plugins")
