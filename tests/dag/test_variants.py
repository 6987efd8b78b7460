"""Node variants and warm-up in the pipeline YAML: what the schema and the validator accept,
what they refuse and how they say it (file:line, node, variant), and the executor's record of
which variant ran a node."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dag import PipelineInvalid, load_pipeline
from dag.executor import Plan, execute
from dag.runner import variant_scope
from dag.schema import NodeSpec, PipelineSpec

PLUGINS = "tests.pipelines.variants.variant_plugins"

PIPELINE = f"""\
name: p
inputs:
  x: {{dtype: float32, shape: [2]}}
nodes:
  embed:
    plugin: {PLUGINS}:Tag
    params: {{factor: 1}}
    inputs: {{x: $inputs.x}}
    variants:
VARIANTS
outputs:
  y: embed.y
"""


def load(tmp_path: Path, variants: str, *, tail: str = ""):
    path = tmp_path / "p.yaml"
    path.write_text(PIPELINE.replace("VARIANTS", variants) + tail)
    return load_pipeline(path)


def problems(tmp_path: Path, variants: str, **options) -> list[tuple[int | None, str | None, str]]:
    with pytest.raises(PipelineInvalid) as caught:
        load(tmp_path, variants, **options)
    for error in caught.value.errors:
        assert error.file == str(tmp_path / "p.yaml")
    return [(e.line, e.node, e.message) for e in caught.value.errors]


def test_a_variant_overrides_node_keys_and_the_node_keeps_the_rest(tmp_path):
    pipeline = load(
        tmp_path,
        "      candidate: {params: {factor: 2}, weight: 10, batching: {max_batch_size: 4}}\n"
        "      next: {model: v3.pt, shadow: true}",
    )
    node = pipeline.spec.nodes["embed"]
    candidate, following = node.variant("candidate"), node.variant("next")
    assert (candidate.params, candidate.batching.max_batch_size) == ({"factor": 2}, 4)
    assert candidate.inputs == node.inputs == {"x": "$inputs.x"}
    assert (following.model, following.params, following.batching) == ("v3.pt", {"factor": 1}, None)
    assert candidate.variants == {}
    assert following.variants == {}
    assert node.variants["candidate"].weight == 10
    assert node.variants["next"].shadow
    assert set(pipeline.variant_classes["embed"]) == {"candidate", "next"}
    assert pipeline.plan.variant_nodes == {"embed"}


def test_a_variant_may_set_a_key_back_to_none(tmp_path):
    path = tmp_path / "p.yaml"
    text = PIPELINE.replace("VARIANTS", "      plain: {batching: null}")
    path.write_text(text.replace("    params: {factor: 1}", "    batching: {max_batch_size: 8}"))
    node = load_pipeline(path).spec.nodes["embed"]
    assert node.batching is not None
    assert node.variant("plain").batching is None


@pytest.mark.parametrize(
    ("variants", "line", "message"),
    [
        (
            "      a: {weight: 60}\n      b: {weight: 50}",
            9,
            "variants: the weights must add up to at most 100 percent (got 110)",
        ),
        ("      a: {weight: 101}", 10, "variants.a.weight: must be <= 100 (got 101)"),
        ("      a: {weight: -1}", 10, "variants.a.weight: must be >= 0 (got -1)"),
        (
            "      a: {inputs: {x: $inputs.x}}",
            10,
            "variants.a: a variant overrides any node key but inputs and variants (got 'inputs')",
        ),
        (
            "      a: {variants: {}}",
            10,
            "variants.a: a variant overrides any node key but inputs and variants (got 'variants')",
        ),
        ("      a: {modle: v2.pt}", 10, "variants.a: unknown key 'modle' (did you mean 'model'?)"),
        (
            "      a: {device: gpu}",
            10,
            "variants.a.device: must be auto, cpu or cuda:N (got 'gpu')",
        ),
        (
            "      a: {shadow: true}\n      b: {shadow: true}",
            9,
            "variants: at most one variant may be shadow (got a, b)",
        ),
        (
            "      a: {shadow: true, weight: 5}",
            10,
            "variants.a: a shadow variant never answers: its weight must be 0 (got 5)",
        ),
        (
            "      a-b: {weight: 5}",
            10,
            "a variant name must be a letter or _ then letters, digits or _ (got 'a-b')",
        ),
    ],
)
def test_bad_variants_are_refused_at_their_line_naming_the_node(tmp_path, variants, line, message):
    assert problems(tmp_path, variants) == [(line, "embed", message)]


def test_a_variant_whose_specs_differ_is_refused_naming_variant_and_difference(tmp_path):
    found = problems(tmp_path, f"      wide: {{plugin: '{PLUGINS}:WideTag', weight: 5}}")
    assert found == [
        (
            10,
            "embed",
            "variant 'wide' must have the node's specs, but its output 'y' is float64[?] "
            "(the node's: float32[?])",
        )
    ]


def test_a_variant_with_other_outputs_is_refused_and_so_is_an_unknown_plugin(tmp_path):
    found = problems(
        tmp_path,
        f"      counted: {{plugin: '{PLUGINS}:Counted'}}\n      gone: {{plugin: 'no.such:Plugin'}}",
    )
    assert [(line, node) for line, node, _ in found] == [(10, "embed"), (11, "embed")]
    assert found[0][2] == (
        "variant 'counted' must have the node's specs, but it has output 'call' (int64[]), "
        "which the node has not"
    )
    assert found[1][2].startswith("variant 'gone': plugin \"no.such:Plugin\": ")


def test_dagserve_validate_prints_a_variant_error_with_file_and_line(tmp_path):
    with pytest.raises(PipelineInvalid) as caught:
        load(tmp_path, f"      wide: {{plugin: '{PLUGINS}:WideTag'}}")
    assert str(caught.value).startswith(f"{tmp_path / 'p.yaml'}:10: node 'embed': variant 'wide'")


# -- warm-up ------------------------------------------------------------------------------------


def test_warmup_takes_samples_or_a_file(tmp_path):
    pipeline = load(tmp_path, "      a: {warmup: {file: a.npz}}", tail="warmup: {samples: 4}\n")
    assert pipeline.spec.warmup.samples == 4
    assert pipeline.spec.nodes["embed"].variant("a").warmup.file == "a.npz"


@pytest.mark.parametrize(
    ("warmup", "message"),
    [
        ("{}", "warmup: give exactly one of samples and file (got neither)"),
        ("{samples: 2, file: a.npz}", "warmup: give exactly one of samples and file (got both)"),
        ("{samples: 0}", "warmup.samples: must be >= 1 (got 0)"),
        ("{sample: 2}", "warmup: unknown key 'sample' (did you mean 'samples'?)"),
    ],
)
def test_a_bad_warmup_is_refused_at_its_line(tmp_path, warmup, message):
    with pytest.raises(PipelineInvalid) as caught:
        load(tmp_path, "      a: {weight: 1}", tail=f"warmup: {warmup}\n")
    assert [(e.line, e.message) for e in caught.value.errors] == [(13, message)]


def test_generated_node_samples_need_the_spec_of_each_input(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(
        "name: p\n"
        "inputs:\n"
        "  x: {dtype: float32, shape: [2]}\n"
        "nodes:\n"
        "  adapter:\n"
        "    plugin: tests.plugins:Pid\n"  # declares x: float32[-1]
        "    warmup: {samples: 1}\n"
        "    inputs: {x: $inputs.x}\n"
        "  free:\n"
        "    plugin: identity\n"  # mirrors what feeds it: a.pid is known
        "    warmup: {samples: 1}\n"
        "    inputs: {x: adapter.pid}\n"
        "outputs:\n"
        "  y: free.x\n"
    )
    assert load_pipeline(path).spec.nodes["free"].warmup.samples == 1


def test_generated_samples_of_a_bytes_input_warn(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(
        "name: p\n"
        "inputs:\n"
        "  image: {dtype: bytes, shape: []}\n"
        "warmup: {samples: 2}\n"
        "nodes:\n"
        "  decode:\n"
        "    plugin: tests.dag.fixtures:Decode\n"
        "    inputs: {data: $inputs.image}\n"
        "outputs:\n"
        "  pixels: decode.pixels\n"
    )
    (warning,) = load_pipeline(path).warnings
    assert warning.line == 4
    assert "give warmup: {file: ...}" in warning.message


# -- the executor -------------------------------------------------------------------------------


class Picking:
    """A runner that says it ran ``variant`` for requests whose sticky key is ``key``."""

    def __init__(self, node: str, key: str, variant: str) -> None:
        self.node, self.key, self.variant = node, key, variant

    async def run(self, inputs, *, deadline):
        scope = variant_scope.get()
        if scope is not None and scope.key == self.key:
            scope.ran[self.node] = self.variant
        return {"x": inputs["x"]}


async def test_node_latency_names_the_variant_that_ran_a_node():
    spec = PipelineSpec.model_validate(
        {
            "name": "p",
            "inputs": {"x": {"dtype": "float32"}},
            "nodes": {
                "a": {"plugin": "identity", "inputs": {"x": "$inputs.x"}, "variants": {"v": {}}},
                "b": {"plugin": "identity", "inputs": {"x": "$inputs.x"}},
            },
            "outputs": {"a": "a.x", "b": "b.x"},
        }
    )
    plan = Plan.of(spec)
    runners = {"a": Picking("a", "u1", "v"), "b": Picking("b", "-", "-")}
    x = {"x": np.zeros(1, np.float32)}
    chosen = await execute(plan, x, runners, request_key="u1")
    assert set(chosen.node_latency_us) == {"a@v", "b"}
    assert chosen.timings["a"].variant == "v"
    plain = await execute(plan, x, runners, request_key="u2")
    assert set(plain.node_latency_us) == {"a", "b"}
    assert variant_scope.get() is None  # the scope is the request's alone


async def test_a_pipeline_without_variants_sets_no_scope():
    spec = PipelineSpec.model_validate(
        {
            "name": "p",
            "inputs": {"x": {"dtype": "float32"}},
            "nodes": {"a": {"plugin": "identity", "inputs": {"x": "$inputs.x"}}},
            "outputs": {"a": "a.x"},
        }
    )
    seen = []

    class Looking:
        async def run(self, inputs, *, deadline):
            seen.append(variant_scope.get())
            return {"x": inputs["x"]}

    await execute(Plan.of(spec), {"x": np.zeros(1, np.float32)}, {"a": Looking()})
    assert seen == [None]


def test_node_spec_variant_is_the_node_for_an_unknown_name_a_key_error():
    node = NodeSpec.model_validate({"plugin": "identity", "variants": {"a": {"weight": 1}}})
    with pytest.raises(KeyError):
        node.variant("b")
