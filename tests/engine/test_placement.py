"""engine/runtime/placement.py: packing by memory AND share, refusals, shared models,
determinism."""

from __future__ import annotations

import pickle
import random
from typing import Any

import pytest

from engine.runtime.devices import CpuInfo, DeviceInventory
from engine.runtime.placement import (
    DeviceBudget,
    PlacementError,
    PlacementRequest,
    place,
)
from model_plugins.errors import DagserveError

CPU = CpuInfo(cores=8, memory_total_mb=32000)


def gpus(*memory_mb: int, used_mb: int = 0) -> DeviceInventory:
    return DeviceInventory.from_config(
        [
            {"index": i, "name": f"GPU{i}", "memory_mb": mb, "memory_used_mb": used_mb}
            for i, mb in enumerate(memory_mb)
        ],
        cpu=CPU,
    )


def req(
    model_id: str,
    device: str = "auto",
    memory: int | None = None,
    share: float | None = None,
    *,
    pipeline: str = "p",
    node: str | None = None,
    framework: str | None = "torchscript",
) -> PlacementRequest:
    return PlacementRequest(
        model_id=model_id,
        pipeline=pipeline,
        node=node or model_id,
        device=device,
        gpu_memory_mb=memory,
        gpu_share=share,
        framework=framework,
    )


def refused(requests: list[PlacementRequest], inventory: DeviceInventory, **kw: Any) -> str:
    with pytest.raises(PlacementError) as info:
        place(requests, inventory, **kw)
    return str(info.value)


def test_packs_by_best_fit_and_reports_budgets() -> None:
    placement = place(
        [
            req("a", memory=6000, share=0.5),
            req("b", memory=3000, share=0.25),
            req("c", memory=9000),
            req("pre", device="cpu"),
        ],
        gpus(16000, 10000),
    )
    # largest first: c (9000) -> tightest card that fits is cuda:1 (10000); a (6000) -> cuda:0;
    # b (3000) -> cuda:0 leaves 7000 and cuda:1 would leave -2000: cuda:0
    assert placement.models == {"a": "cuda:0", "b": "cuda:0", "c": "cuda:1", "pre": "cpu"}
    assert placement.nodes[("p", "c")] == "cuda:1"
    assert placement.device_of("pre") == "cpu"
    assert placement.budgets["cuda:0"] == DeviceBudget(
        device="cuda:0",
        name="GPU0",
        models=("a", "b"),
        memory_capacity_mb=16000,
        memory_committed_mb=9000,
        share_committed=0.75,
    )
    assert placement.budgets["cuda:0"].memory_left_mb == 7000
    assert placement.budgets["cuda:0"].share_left == pytest.approx(0.25)
    assert placement.details() == {
        "placement.cuda:0": "models=2 memory=9000/16000MB share=0.75/1.00",
        "placement.cuda:1": "models=1 memory=9000/10000MB share=0.00/1.00",
        "placement.cpu": "models=1",
    }
    assert placement.log_lines() == [
        "cuda:0 (GPU0): 2 models, memory 9000/16000 MB, share 0.75/1.00",
        "  a (pipeline 'p' node 'a')",
        "  b (pipeline 'p' node 'b')",
        "cuda:1 (GPU1): 1 model, memory 9000/10000 MB, share 0.00/1.00",
        "  c (pipeline 'p' node 'c')",
        "cpu: 1 model",
        "  pre (pipeline 'p' node 'pre')",
    ]


def test_refused_on_memory() -> None:
    message = refused([req("big", memory=30000, share=0.5)], gpus(16000, 12000))
    assert message == (
        "cannot place a model: pipeline 'p' node 'big': needs 30000 MB and share 0.5 on auto; "
        "left: cuda:0 16000 MB share 1, cuda:1 12000 MB share 1"
    )


def test_refused_on_share_although_memory_has_room() -> None:
    message = refused(
        [req("a", memory=1000, share=0.75), req("b", memory=1000, share=0.5)], gpus(16000)
    )
    assert "pipeline 'p' node 'b': needs 1000 MB and share 0.5 on auto" in message
    assert "left: cuda:0 15000 MB share 0.25" in message


def test_a_card_whose_share_is_spoken_for_takes_no_more_models() -> None:
    message = refused(
        [req("owner", memory=1000, share=1.0), req("extra", memory=1000)], gpus(16000)
    )
    assert "node 'extra': needs 1000 MB and share 0 on auto; left: cuda:0 15000 MB share 0" in (
        message
    )


def test_shares_summing_to_one_fit_despite_float_rounding() -> None:
    requests = [req(m, memory=100, share=s) for m, s in (("a", 0.1), ("b", 0.2), ("c", 0.7))]
    placement = place(requests, gpus(16000))
    assert set(placement.models.values()) == {"cuda:0"}
    assert placement.budgets["cuda:0"].share_committed == pytest.approx(1.0)


def test_memory_used_at_startup_and_reserve_are_not_committable() -> None:
    inventory = gpus(16000, used_mb=1000)
    assert place([req("a", memory=15000)], inventory).models == {"a": "cuda:0"}
    message = refused([req("a", memory=15000)], inventory, reserve_mb=512)
    assert "left: cuda:0 14488 MB share 1" in message


def test_explicit_card() -> None:
    placement = place([req("a", "cuda:1", memory=1000, share=0.5)], gpus(16000, 16000))
    assert placement.models == {"a": "cuda:1"}
    assert placement.budgets["cuda:0"].models == ()


def test_explicit_card_that_does_not_fit_is_refused_even_if_another_would() -> None:
    message = refused([req("a", "cuda:1", memory=12000)], gpus(16000, 10000))
    assert "needs 12000 MB and share 0 on cuda:1; left: cuda:0 16000 MB share 1" in message


def test_explicit_cards_are_placed_before_auto_ones() -> None:
    # 'auto' is larger, so sorted first it would take cuda:0 and leave the pinned node no room
    placement = place(
        [req("auto", memory=9000), req("pinned", "cuda:0", memory=8000)], gpus(16000, 10000)
    )
    assert placement.models == {"auto": "cuda:1", "pinned": "cuda:0"}


def test_absent_card() -> None:
    message = refused([req("a", "cuda:5", memory=1000)], gpus(16000, 16000))
    assert message == (
        "cannot place a model: pipeline 'p' node 'a': asks for cuda:5, "
        "which is not in the inventory (GPUs: cuda:0, cuda:1)"
    )


def test_explicit_card_without_memory_is_refused_and_zero_opts_out() -> None:
    message = refused([req("a", "cuda:0")], gpus(16000))
    assert "asks for cuda:0 without gpu_memory_mb" in message
    assert "0 to leave it out of the memory budget" in message
    placement = place([req("a", "cuda:0", memory=0)], gpus(16000))
    assert placement.budgets["cuda:0"].memory_committed_mb == 0


def test_cpu_only_machine() -> None:
    inventory = DeviceInventory.cpu_only(CPU)
    placement = place([req("a", memory=4000, share=0.5), req("b")], inventory)
    assert placement.models == {"a": "cpu", "b": "cpu"}
    assert placement.details() == {"placement.cpu": "models=2"}

    message = refused([req("a", "cuda:0", memory=4000)], inventory)
    assert message == (
        "cannot place a model: pipeline 'p' node 'a': asks for cuda:0, "
        "but there is no GPU (CPU only)"
    )


@pytest.mark.parametrize(
    ("request_", "device"),
    [
        (req("no_memory"), "cpu"),  # auto without gpu_memory_mb: nothing to budget on a GPU
        (req("numpy", memory=100, framework="numpy"), "cpu"),
        (req("plain_python", memory=100, framework=None), "cpu"),
        (req("pinned_cpu", "cpu", memory=100), "cpu"),
        (req("torch", memory=100), "cuda:0"),
    ],
)
def test_auto_goes_to_the_cpu_when_it_cannot_use_a_gpu(
    request_: PlacementRequest, device: str
) -> None:
    assert place([request_], gpus(16000)).models == {request_.model_id: device}


def test_shared_model_is_placed_once_with_the_largest_budget() -> None:
    placement = place(
        [
            req("enc", memory=3000, share=0.25, pipeline="p", node="image_embed"),
            req("enc", memory=4000, pipeline="q", node="embed"),
        ],
        gpus(16000),
    )
    (assignment,) = placement.assignments
    assert (assignment.device, assignment.memory_mb, assignment.share) == ("cuda:0", 4000, 0.25)
    assert assignment.nodes == (("p", "image_embed"), ("q", "embed"))
    assert placement.nodes == {("p", "image_embed"): "cuda:0", ("q", "embed"): "cuda:0"}
    assert placement.budgets["cuda:0"].memory_committed_mb == 4000


def test_shared_model_on_two_explicit_devices_is_refused() -> None:
    message = refused(
        [req("enc", "cuda:0", memory=1, node="a"), req("enc", "cpu", pipeline="q", node="b")],
        gpus(16000),
    )
    assert "model 'enc' is shared but asked for on different devices" in message
    assert "pipeline 'p' node 'a' on cuda:0" in message
    assert "pipeline 'q' node 'b' on cpu" in message


def test_every_unplaceable_node_is_reported_with_what_every_device_has_left() -> None:
    with pytest.raises(PlacementError) as info:
        place(
            [
                req("a", memory=10000, share=0.5),
                req("b", memory=9000, share=0.5),
                req("huge", memory=50000, pipeline="p1"),
                req("greedy", memory=100, share=0.75, pipeline="p2"),
                req("lost", "cuda:7", memory=1, pipeline="p3"),
            ],
            gpus(16000, 12000),
        )
    # pinned nodes first, then auto ones largest first: huge fails on empty cards; a takes
    # cuda:1 (tightest), b cuda:0; greedy then fails on share although memory has room
    assert info.value.problems == [
        "pipeline 'p3' node 'lost': asks for cuda:7, which is not in the inventory "
        "(GPUs: cuda:0, cuda:1)",
        "pipeline 'p1' node 'huge': needs 50000 MB and share 0 on auto; "
        "left: cuda:0 16000 MB share 1, cuda:1 12000 MB share 1",
        "pipeline 'p2' node 'greedy': needs 100 MB and share 0.75 on auto; "
        "left: cuda:0 7000 MB share 0.5, cuda:1 2000 MB share 0.5",
    ]
    assert str(info.value) == "cannot place 3 models:" + "".join(
        f"\n  - {problem}" for problem in info.value.problems
    )


def test_placement_is_deterministic() -> None:
    requests = [
        req(f"m{i}", memory=1000 * (i % 4 + 1), share=[None, 0.125, 0.25][i % 3]) for i in range(12)
    ]
    inventory = gpus(16000, 16000, 8000)
    expected = place(requests, inventory)
    assert len(set(expected.models.values())) > 1
    for seed in range(5):
        shuffled = requests[:]
        random.Random(seed).shuffle(shuffled)
        assert place(shuffled, inventory) == expected


def test_error_pickles_with_its_problems() -> None:
    error = PlacementError(["a", "b"])
    copy = pickle.loads(pickle.dumps(error))
    assert isinstance(copy, PlacementError)
    assert isinstance(copy, DagserveError)
    assert (copy.problems, str(copy)) == (["a", "b"], str(error))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"device": "gpu"}, "device must be 'auto', 'cpu' or 'cuda:N' (got 'gpu')"),
        ({"device": "cuda"}, "device must be"),
        ({"gpu_memory_mb": -1}, "gpu_memory_mb must be >= 0 (got -1)"),
        ({"gpu_share": 0.0}, "gpu_share must be in (0, 1] (got 0.0)"),
        ({"gpu_share": 1.5}, "gpu_share must be in (0, 1] (got 1.5)"),
    ],
)
def test_request_is_validated(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match="must be") as info:
        PlacementRequest(model_id="m", pipeline="p", node="n", **kwargs)
    assert message in str(info.value)


def test_negative_reserve_is_rejected() -> None:
    with pytest.raises(ValueError, match="reserve_mb must be >= 0"):
        place([], gpus(16000), reserve_mb=-1)
