"""Placement and eviction of models on GPU layouts read from real nvidia-smi captures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.facts.gpu import parse_query_gpu
from cluster.remote.serving.catalog import NodeDevices
from cluster.remote.serving.placement import (
    SLEEPER_GPU_GIB,
    Activation,
    NoRoom,
    Resident,
    free_devices,
    place,
    plan_activation,
    sleepers_per_device,
)

GPU_FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "gpu"


def gpu_indices(machine: str) -> tuple[int, ...]:
    gpus, _ = parse_query_gpu(
        (GPU_FIXTURES / machine / "query-gpu-noheader-nounits.csv").read_text()
    )
    return tuple(g.index for g in gpus)


H200X8 = gpu_indices("h200x8")
H200X2 = gpu_indices("h200x2")


def cluster(*devices: tuple[int, ...]) -> list[NodeDevices]:
    return [
        NodeDevices(f"node-{i + 1}", f"10.0.0.{i + 1}", d, head=i == 0)
        for i, d in enumerate(devices)
    ]


def resident(served: str, placement, last_used: float, **keys) -> Resident:
    return Resident(served, placement, last_used, **keys)


def test_the_fixtures_are_the_machines_they_are_named_after():
    assert tuple(range(8)) == H200X8
    assert H200X2 == (0, 1)


def test_two_tp4_models_share_an_eight_gpu_server_side_by_side():
    nodes = cluster(H200X8)
    first = place(nodes, free_devices(nodes, []), tensor=4, pipeline=1)
    assert first == (("node-1", (0, 1, 2, 3)),)
    second = place(nodes, free_devices(nodes, [first]), tensor=4, pipeline=1)
    assert second == (("node-1", (4, 5, 6, 7)),)
    assert place(nodes, free_devices(nodes, [first, second]), tensor=1, pipeline=1) is None


def test_a_model_over_every_node_takes_tp_gpus_on_each_with_rank_0_on_the_head():
    nodes = cluster(H200X8, H200X8, H200X8, H200X8)
    placement = place(nodes, free_devices(nodes, []), tensor=8, pipeline=4)
    assert placement == tuple((f"node-{i}", tuple(range(8))) for i in (1, 2, 3, 4))


def test_the_fullest_nodes_that_fit_are_taken_first_so_large_holes_stay():
    nodes = cluster(H200X8, H200X8)
    half = (("node-2", (0, 1, 2, 3)),)
    placement = place(nodes, free_devices(nodes, [half]), tensor=2, pipeline=1)
    assert placement == (("node-2", (4, 5)),)  # node-1 stays whole for an 8-GPU model


def test_rank_0_goes_to_the_head_when_the_head_is_one_of_the_nodes():
    nodes = cluster(H200X2, H200X2, H200X2)
    held = (("node-3", (0, 1)),)
    placement = place(nodes, free_devices(nodes, [held]), tensor=2, pipeline=2)
    assert placement is not None and placement[0][0] == "node-1"


def test_a_gpu_subset_is_all_the_placement_sees():
    nodes = cluster((2, 3, 6, 7), (0, 1, 2, 3))
    placement = place(nodes, free_devices(nodes, []), tensor=4, pipeline=2)
    assert placement == (("node-1", (2, 3, 6, 7)), ("node-2", (0, 1, 2, 3)))
    assert nodes[0].visible_index(6) == 2  # the container sees the subset as 0..3


def test_a_model_that_fits_needs_no_eviction():
    nodes = cluster(H200X8)
    loaded = resident("a", (("node-1", (0, 1, 2, 3)),), last_used=10.0)
    decision = plan_activation(nodes, [loaded], tensor=4, pipeline=1)
    assert decision == Activation((("node-1", (4, 5, 6, 7)),), evict=())


def test_the_least_recently_used_idle_model_gives_way():
    nodes = cluster(H200X8)
    old = resident("old", (("node-1", (0, 1, 2, 3)),), last_used=1.0)
    recent = resident("recent", (("node-1", (4, 5, 6, 7)),), last_used=9.0)
    decision = plan_activation(nodes, [recent, old], tensor=4, pipeline=1)
    assert decision == Activation((("node-1", (0, 1, 2, 3)),), evict=("old",))


def test_a_model_not_in_the_way_is_kept_even_when_it_is_older():
    nodes = cluster(H200X2, H200X2)
    oldest = resident("oldest", (("node-2", (0,)),), last_used=1.0)
    blocking = resident("blocking", (("node-1", (0, 1)),), last_used=5.0)
    newest = resident("newest", (("node-2", (1,)),), last_used=9.0)
    decision = plan_activation(nodes, [oldest, blocking, newest], tensor=2, pipeline=1)
    assert decision == Activation((("node-1", (0, 1)),), evict=("blocking",))


def test_busy_loading_and_kept_models_never_give_way():
    nodes = cluster(H200X2, H200X2)
    residents = [
        resident("busy", (("node-1", (0, 1)),), 1.0, in_flight=3),
        resident("starting", (("node-2", (0,)),), 2.0, loading=True),
        resident("pinned", (("node-2", (1,)),), 3.0, keep_loaded=True),
    ]
    decision = plan_activation(nodes, residents, tensor=1, pipeline=1)
    assert isinstance(decision, NoRoom)
    assert decision.holders == ("busy", "starting", "pinned")
    assert "busy (3 request(s) in flight)" in decision.reason
    assert "starting (loading)" in decision.reason
    assert "pinned (keep_loaded)" in decision.reason


def test_a_model_larger_than_the_cluster_has_no_room_and_no_holders():
    nodes = cluster(H200X2, H200X2)
    decision = plan_activation(nodes, [], tensor=4, pipeline=1)
    assert isinstance(decision, NoRoom) and decision.holders == ()


def test_eviction_across_nodes_frees_a_model_over_every_node():
    nodes = cluster(H200X8, H200X8)
    small = resident("small", (("node-1", (0,)),), 1.0)
    wide = resident("wide", (("node-1", (4, 5, 6, 7)), ("node-2", (4, 5, 6, 7))), 2.0)
    decision = plan_activation(nodes, [small, wide], tensor=8, pipeline=2)
    assert isinstance(decision, Activation)
    assert decision.evict == ("small", "wide")


# Sleep mode: a device holds one awake model and up to `sleepers` sleeping ones.

ONE_GPU = (("node-1", (0,)),)
SECOND_GPU = (("node-1", (1,)),)
BOTH_GPUS = (("node-1", (0, 1)),)


def sleeper(served: str, placement, last_used: float, **keys) -> Resident:
    return Resident(served, placement, last_used, asleep=True, can_sleep=True, **keys)


def awake(served: str, placement, last_used: float, **keys) -> Resident:
    return Resident(served, placement, last_used, can_sleep=True, **keys)


def node(devices: tuple[int, ...], sleepers: int) -> list[NodeDevices]:
    return [NodeDevices("node-1", "10.0.0.1", devices, head=True, sleepers=sleepers)]


SLEEP_CASES = {
    "an idle model that can sleep sleeps instead of stopping": (
        node((0,), sleepers=2),
        [awake("a", ONE_GPU, 1.0)],
        None,
        Activation(ONE_GPU, evict=(), sleep=("a",)),
    ),
    "a model without sleep mode stops as before": (
        node((0,), sleepers=2),
        [Resident("a", ONE_GPU, 1.0)],
        None,
        Activation(ONE_GPU, evict=("a",)),
    ),
    "sleepers do not hold devices: a cold model starts beside them": (
        node((0,), sleepers=2),
        [sleeper("a", ONE_GPU, 1.0), sleeper("b", ONE_GPU, 2.0)],
        None,
        Activation(ONE_GPU, evict=()),
    ),
    "a sleeper wakes on its own devices and the awake one there sleeps": (
        node((0, 1), sleepers=2),
        [awake("b", ONE_GPU, 5.0), awake("c", SECOND_GPU, 1.0)],
        ONE_GPU,
        Activation(ONE_GPU, evict=(), sleep=("b",)),
    ),
    "waking evicts every awake model on its devices, least recently used first": (
        node((0, 1), sleepers=2),
        [awake("late", ONE_GPU, 9.0), awake("early", SECOND_GPU, 1.0)],
        BOTH_GPUS,
        Activation(BOTH_GPUS, evict=(), sleep=("early", "late")),
    ),
    "one sleeper too many: the least recently used sleeper on the device stops": (
        node((0,), sleepers=1),
        [sleeper("old", ONE_GPU, 1.0), awake("b", ONE_GPU, 5.0)],
        None,
        Activation(ONE_GPU, evict=("old",), sleep=("b",)),
    ),
    "the evicted model stops itself when it is older than every sleeper there": (
        node((0,), sleepers=1),
        [sleeper("newer", ONE_GPU, 8.0), awake("b", ONE_GPU, 5.0)],
        None,
        Activation(ONE_GPU, evict=("b",), sleep=()),
    ),
    "the waking model leaves the device's sleepers, so the evicted one takes its room": (
        node((0,), sleepers=1),
        [awake("b", ONE_GPU, 5.0)],
        ONE_GPU,
        Activation(ONE_GPU, evict=(), sleep=("b",)),
    ),
    "no room for sleepers at all: giving way stops": (
        node((0,), sleepers=0),
        [awake("b", ONE_GPU, 5.0)],
        None,
        Activation(ONE_GPU, evict=("b",), sleep=()),
    ),
}


@pytest.mark.parametrize("case", SLEEP_CASES, ids=list(SLEEP_CASES))
def test_placement_with_sleepers(case):
    nodes, residents, asleep_at, expected = SLEEP_CASES[case]
    tensor = len(asleep_at[0][1]) if asleep_at else 1
    decision = plan_activation(nodes, residents, tensor, pipeline=1, asleep_at=asleep_at)
    assert decision == expected


def test_a_stopped_sleeper_of_two_nodes_frees_its_room_on_both():
    nodes = [
        NodeDevices("node-1", "10.0.0.1", (0,), head=True, sleepers=1),
        NodeDevices("node-2", "10.0.0.2", (0,), sleepers=1),
    ]
    wide = (("node-1", (0,)), ("node-2", (0,)))
    residents = [sleeper("wide", wide, 1.0), awake("b", (("node-2", (0,)),), 5.0)]
    decision = plan_activation(nodes, residents, tensor=1, pipeline=1)
    # b sleeps on node-2, where the older sleeper `wide` is stopped; the new model needs one GPU
    assert decision == Activation((("node-1", (0,)),), evict=(), sleep=())
    decision = plan_activation(nodes, residents, tensor=1, pipeline=2)
    assert decision == Activation(wide, evict=("wide",), sleep=("b",))


@pytest.mark.parametrize(
    "state", [{"in_flight": 2}, {"loading": True}, {"keep_loaded": True}], ids=str
)
def test_a_sleeper_never_wakes_over_a_busy_loading_or_kept_model(state):
    residents = [awake("b", ONE_GPU, 5.0, **state)]
    decision = plan_activation(node((0,), 2), residents, 1, 1, asleep_at=ONE_GPU)
    assert isinstance(decision, NoRoom) and decision.holders == ("b",)


@pytest.mark.parametrize(
    ("memory_gib", "expected"),
    [(80, 5), (141, 9), (16, 1), (8, 0)],
    ids=["h100", "h200", "t4", "small"],
)
def test_sleepers_per_device_follow_the_memory_the_awake_model_leaves(memory_gib, expected):
    assert sleepers_per_device(memory_gib) == expected


SLEEP_FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "sleep"


@pytest.mark.parametrize("card", ["h100", "h200"])
def test_what_a_sleeper_keeps_per_gpu_is_the_measured_figure(card):
    """SLEEPER_GPU_GIB against nvidia-smi's figure for a sleeping vLLM 0.26 (level 1 and 2)."""
    phases = json.loads((SLEEP_FIXTURES / card / "sleep.json").read_text())["phases"]
    held = [
        sample["asleep_memory"]["gpu_mib"] / 1024
        for level in ("level1", "level2")
        for sample in phases[level]["samples"]
    ]
    assert held and max(held) <= SLEEPER_GPU_GIB <= max(held) * 1.05
