"""vLLM's known traps: the table row by row, the versions outside each range, the merging of
`--compilation-config` (a user's own value kept, a user's config vcluster cannot read left as
it is), and what `plan` and `check` make of them.

The multicast facts come from real probe output (the lent H100: attribute 0) and from the
constructed multicast results in `fixtures/fabric/constructed/` (see its README).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from cluster.cli.plan_text import render_text
from cluster.decide.checks import CheckInput, Status, check_known_traps
from cluster.decide.inventory import Inventory, load_inventory
from cluster.decide.plan import NodeFacts, build_plan
from cluster.decide.runtime import Runtime
from cluster.decide.traps import (
    TRAP_NAMES,
    TRAPS,
    CompilationConfig,
    HandledElsewhere,
    ModelShape,
    TrapFacts,
    Versions,
    choose_mitigations,
    mitigated_argv,
)
from cluster.errors import InventoryError
from cluster.facts.fabric import Multicast, parse_multicast
from cluster.facts.host import HostFacts, parse_probe
from tests.support.probe_output import FABRIC, H200X2, compose_probe, read

MNNVL = "flashinfer-allreduce-without-multicast"
RAY = "ray-missing-from-image"
FUSION_OFF = '{"pass_config":{"fuse_allreduce_rms":false}}'
H100_PROBE = parse_probe(read(FABRIC / "h100x1" / "probe.txt"))
BIND_401 = read(FABRIC / "constructed" / "multicast-try-h200x2-bind-401.txt")
BOUND = read(FABRIC / "constructed" / "multicast-try-h200x8-bound.txt")
REPO = Path(__file__).resolve().parents[2]


def facts(
    version: str | None = "0.26.0",
    multicast: Multicast = Multicast.NO,
    *,
    nodes: tuple[str, ...] = ("a",),
    **changes: Any,
) -> TrapFacts:
    return TrapFacts(
        vllm_version=version,
        multicast={node: (multicast, "as the test says") for node in nodes},
        nodes=nodes,
        **changes,
    )


def names(found: tuple) -> list[str]:
    return [m.trap for m in found]


# --- the table -----------------------------------------------------------------------------


def test_every_row_has_a_unique_name_a_warning_and_a_public_source():
    assert len(TRAP_NAMES) == len(TRAPS)
    for trap in TRAPS:
        assert trap.warn and trap.source
        assert any(ch.isdigit() for ch in trap.source)  # an issue or PR number
        assert isinstance(trap.action, CompilationConfig | HandledElsewhere)


def test_mnnvl_without_multicast_at_tp_2_turns_the_fused_all_reduce_off():
    (found,) = choose_mitigations(facts(), ModelShape(tensor_parallel=2))
    assert found.trap == MNNVL
    assert found.fragment == {"pass_config": {"fuse_allreduce_rms": False}}
    assert "multicast" in found.why and "vLLM 0.26.0" in found.why
    assert "47219" in found.source and "49043" in found.source


@pytest.mark.parametrize("version", ["0.25.0", "0.25.1", "0.26.0", "0.26.0+cu130", "0.32.0"])
def test_mnnvl_applies_from_0_25_0_on(version: str):
    assert names(choose_mitigations(facts(version), ModelShape(2))) == [MNNVL]


@pytest.mark.parametrize("version", ["0.19.1", "0.24.0", "0.24.9"])
def test_mnnvl_does_not_apply_before_0_25_0(version: str):
    assert choose_mitigations(facts(version), ModelShape(2)) == ()


def test_mnnvl_needs_tensor_parallel():
    assert choose_mitigations(facts(), ModelShape(tensor_parallel=1)) == ()


def test_mnnvl_does_not_apply_where_multicast_works_on_every_node():
    assert choose_mitigations(facts(multicast=Multicast.YES, nodes=("a", "b")), ModelShape(8)) == ()


def test_mnnvl_names_the_node_without_multicast():
    mixed = TrapFacts(
        vllm_version="0.26.0",
        multicast={"a": (Multicast.YES, "bound"), "b": (Multicast.NO, "attribute 0")},
        nodes=("a", "b"),
    )
    (found,) = choose_mitigations(mixed, ModelShape(8))
    assert "b (attribute 0)" in found.why and "a (" not in found.why


def test_unknown_multicast_is_taken_as_absent_and_says_so():
    (found,) = choose_mitigations(facts(multicast=Multicast.UNKNOWN), ModelShape(2))
    assert "not known" in found.why and "taken as absent" in found.why


def test_a_node_without_facts_counts_as_unknown():
    partial = TrapFacts("0.26.0", multicast={"a": (Multicast.YES, "bound")}, nodes=("a", "b"))
    (found,) = choose_mitigations(partial, ModelShape(2))
    assert "b (no facts)" in found.why


def test_an_unknown_vllm_version_applies_the_mitigation_and_says_so():
    (found,) = choose_mitigations(facts(version=None), ModelShape(2))
    assert "version is not known" in found.why


def test_cpu_clusters_have_no_nvlink_trap():
    assert choose_mitigations(facts(accelerator="cpu"), ModelShape(2)) == ()


def test_an_image_without_ray_points_to_the_runtime_choice():
    (found,) = choose_mitigations(facts(image_has_ray=False), ModelShape(1))
    assert found.trap == RAY
    assert found.fragment is None and "runtime" in found.action
    assert "8515" in found.source


@pytest.mark.parametrize("has_ray", [True, None])
def test_the_ray_trap_needs_an_image_known_to_lack_ray(has_ray: bool | None):
    assert choose_mitigations(facts(image_has_ray=has_ray), ModelShape(1)) == ()


def test_the_ray_trap_is_outside_its_range_before_0_19_1():
    assert choose_mitigations(facts("0.19.0", image_has_ray=False), ModelShape(1)) == ()


def test_a_trap_turned_off_in_the_inventory_is_not_chosen():
    off = facts(turned_off=frozenset({MNNVL}))
    assert choose_mitigations(off, ModelShape(2)) == ()


def test_a_new_row_is_one_entry_of_the_table():
    row = replace(TRAPS[0], name="example", versions=Versions("0.30.0", before="0.31.0"))
    assert names(choose_mitigations(facts("0.30.2"), ModelShape(2), [row])) == ["example"]
    assert choose_mitigations(facts("0.31.0"), ModelShape(2), [row]) == ()


# --- the argv ------------------------------------------------------------------------------

SERVE = ["vllm", "serve", "org/model", "--tensor-parallel-size", "2"]


def mitigate(*args: str) -> list[str]:
    shape = ModelShape(2, args)
    return mitigated_argv([*SERVE, *args], choose_mitigations(facts(), shape))


def config_of(argv: list[str]) -> dict:
    return json.loads(argv[argv.index("--compilation-config") + 1])


def test_without_a_config_of_the_users_ours_comes_before_the_users_options():
    argv = mitigate("--max-model-len", "4096")
    assert argv == [*SERVE[:3], "--compilation-config", FUSION_OFF, *SERVE[3:],
                    "--max-model-len", "4096"]  # fmt: skip


def test_the_users_other_keys_are_merged_with_ours():
    argv = mitigate("--compilation-config", '{"cudagraph_mode": "FULL", "pass_config": {"x": 1}}')
    assert config_of(argv) == {
        "cudagraph_mode": "FULL",
        "pass_config": {"fuse_allreduce_rms": False, "x": 1},
    }
    assert argv.count("--compilation-config") == 1


def test_the_users_own_value_of_the_key_is_kept_and_said():
    users = '{"pass_config": {"fuse_allreduce_rms": true}}'
    argv = mitigate("--compilation-config", users)
    assert config_of(argv) == {"pass_config": {"fuse_allreduce_rms": True}}
    (found,) = choose_mitigations(facts(), ModelShape(2, ("--compilation-config", users)))
    assert found.kept == ("pass_config.fuse_allreduce_rms",)
    assert "the user's own pass_config.fuse_allreduce_rms kept" in found.line()


@pytest.mark.parametrize("form", ["--compilation-config={}", "-cc={}"])
def test_the_equals_and_short_forms_are_merged_too(form: str):
    argv = mitigate(form.format('{"mode": 3}'))
    assert config_of(argv) == {"mode": 3, "pass_config": {"fuse_allreduce_rms": False}}


def test_the_short_flag_with_a_separate_value_is_merged():
    argv = mitigate("-cc", '{"mode": 3}')
    assert "-cc" not in argv
    assert config_of(argv)["mode"] == 3


@pytest.mark.parametrize(
    "users",
    [
        ["--compilation-config", "{not json"],
        ["--compilation-config", "3"],
        ["-cc.pass_config.fuse_allreduce_rms=true"],
        ["-cc.mode=3"],
    ],
)
def test_a_config_vcluster_cannot_merge_into_is_left_intact_and_nothing_added(users: list[str]):
    assert mitigate(*users) == [*SERVE, *users]
    (found,) = choose_mitigations(facts(), ModelShape(2, tuple(users)))
    assert found.skipped is not None
    assert "NOT applied" in found.line()


def test_a_dotted_option_of_the_users_counts_as_their_value():
    (found,) = choose_mitigations(
        facts(), ModelShape(2, ("-cc.pass_config.fuse_allreduce_rms=true",))
    )
    assert found.kept == ("pass_config.fuse_allreduce_rms",)


def test_applying_twice_changes_nothing_more():
    once = mitigate()
    assert mitigated_argv(once, choose_mitigations(facts(), ModelShape(2))) == once


def test_only_a_vllm_serve_argv_is_changed():
    router = ["python3", "/var/lib/vcluster/bundle.pyz", "router"]
    assert mitigated_argv(router, choose_mitigations(facts(), ModelShape(2))) == router


def test_a_mitigation_without_a_fragment_changes_no_argv():
    found = choose_mitigations(facts(multicast=Multicast.YES, image_has_ray=False), ModelShape(2))
    assert names(found) == [RAY]
    assert mitigated_argv(SERVE, found) == SERVE


# --- plan ----------------------------------------------------------------------------------


def inventory(**changes: Any) -> Inventory:
    data: dict[str, Any] = {
        "cluster": "demo",
        "image": "vllm/vllm-openai:v0.26.0",
        "nodes": [{"name": "a", "address": "10.0.0.1"}],
        "model_cache": "/data/hf",
        "model": {"name": "org/model", "args": ["--max-model-len", "4096"]},
        "secrets": {"api_key": "env:USERS_KEY"},
        **changes,
    }
    return Inventory.model_validate(data)


def runtime(inv: Inventory, vllm: str | None = "0.26.0", executor: str = "ray") -> Runtime:
    return Runtime(inv.image, executor == "ray", executor, "test", vllm_version=vllm,  # type: ignore[arg-type]
                   image_has_ray=True)  # fmt: skip


def node_facts(inv: Inventory, multicast: str, gpus: int = 2) -> dict[str, NodeFacts]:
    host = parse_probe(compose_probe({"multicast": (0, multicast, "")}))
    return {
        n.node_name: NodeFacts(n.address, gpus, "NVIDIA H200", "eth0", fabric=host.fabric)
        for n in inv.nodes
    }


def test_plan_adds_the_mitigation_to_vllm_serve_and_says_why():
    inv = inventory()
    plan = build_plan(inv, node_facts(inv, BIND_401), runtime(inv))
    assert names(plan.mitigations) == [MNNVL]
    argv = list(plan.head.serve.argv)
    assert config_of(argv) == {"pass_config": {"fuse_allreduce_rms": False}}
    assert argv[-2:] == ["--max-model-len", "4096"]
    text = render_text(plan)
    line = next(x for x in text.splitlines() if x.startswith("known vLLM trap"))
    assert MNNVL in line and "47219" in line
    assert "cuMulticastBindMem on GPU 0: CUDA_ERROR_ILLEGAL_STATE (401)" in line


def test_plan_leaves_vllm_alone_where_multicast_was_bound_on_every_gpu():
    inv = inventory()
    plan = build_plan(inv, node_facts(inv, BOUND), runtime(inv))
    assert plan.mitigations == ()
    assert "--compilation-config" not in plan.head.serve.argv


def test_plan_before_0_25_0_changes_nothing():
    inv = inventory()
    plan = build_plan(inv, node_facts(inv, BIND_401), runtime(inv, "0.24.0"))
    assert "--compilation-config" not in plan.head.serve.argv


def test_the_inventory_turns_a_trap_off():
    inv = inventory(traps={MNNVL: "off"})
    plan = build_plan(inv, node_facts(inv, BIND_401), runtime(inv))
    assert plan.mitigations == () and "--compilation-config" not in plan.head.serve.argv


def test_every_rank_of_vllms_own_multi_node_mode_gets_it():
    inv = inventory(nodes=[{"name": "a", "address": "10.0.0.1"},
                           {"name": "b", "address": "10.0.0.2"}], executor="mp")  # fmt: skip
    plan = build_plan(inv, node_facts(inv, BIND_401), runtime(inv, executor="mp"))
    for node in plan.nodes:
        assert config_of(list(node.serve.argv))["pass_config"] == {"fuse_allreduce_rms": False}


def test_routed_models_get_it_by_their_own_tensor_parallel():
    inv = inventory(
        model=None,
        models=[
            {"name": "org/big", "tensor_parallel": 2},
            {"name": "org/small", "tensor_parallel": 1},
        ],
    )
    plan = build_plan(inv, node_facts(inv, BIND_401), runtime(inv, executor="mp"))
    by_name = {m.served: m.argv for m in plan.serving.models}
    assert "--compilation-config" in by_name["org/big"]
    assert "--compilation-config" not in by_name["org/small"]
    assert [m.model for m in plan.mitigations] == ["org/big"]


def test_an_offline_plan_applies_it_conservatively():
    inv = inventory(nodes=[{"name": "a", "address": "10.0.0.1", "gpus": 2}])
    plan = build_plan(inv, {"a": NodeFacts("10.0.0.1", 2)})
    assert "not known" in plan.mitigations[0].why
    assert "--compilation-config" in plan.head.serve.argv


# --- inventory -----------------------------------------------------------------------------


def test_yaml_off_turns_a_trap_off(tmp_path: Path):
    text = (REPO / "inventory" / "gpu-2x8.yaml").read_text() + f"traps:\n  {MNNVL}: off\n"
    (tmp_path / "inventory.yaml").write_text(text)
    assert load_inventory(tmp_path / "inventory.yaml").traps_off == {MNNVL}


def test_an_unknown_trap_name_is_an_error_naming_the_line(tmp_path: Path):
    text = (REPO / "inventory" / "gpu-2x8.yaml").read_text() + "traps:\n  no-such-trap: off\n"
    (tmp_path / "inventory.yaml").write_text(text)
    with pytest.raises(InventoryError) as raised:
        load_inventory(tmp_path / "inventory.yaml")
    assert "unknown trap 'no-such-trap'" in str(raised.value)
    assert MNNVL in str(raised.value)


# --- check ---------------------------------------------------------------------------------


def with_multicast(host: HostFacts, output: str) -> HostFacts:
    fabric = replace(host.fabric, multicast=parse_multicast(output))
    return replace(host, fabric=fabric)


TWO_H200 = parse_probe(read(H200X2 / "probe.txt"))


def check(host: HostFacts, inv: Inventory | None = None, vllm: str | None = "0.26.0") -> list:
    inv = inv or inventory()
    return check_known_traps(CheckInput(inv, {"a": host}, runtime=runtime(inv, vllm)))


def test_check_warns_where_the_try_failed_and_says_what_up_adds():
    (result,) = check(with_multicast(TWO_H200, BIND_401))
    assert result.status is Status.WARN
    assert "CUDA_ERROR_ILLEGAL_STATE" in result.detail
    assert "`up` adds --compilation-config" in result.remedy
    assert f"traps: {{{MNNVL}: off}}" in result.remedy


def test_check_on_the_lent_h100s_real_probe_reads_attribute_0():
    assert H100_PROBE.fabric.multicast.verdict is Multicast.NO
    two_gpus = replace(H100_PROBE, gpu=TWO_H200.gpu)  # its facts, with two GPUs for TP 2
    (result,) = check(two_gpus)
    assert result.status is Status.WARN
    assert "multicast attribute is 0 on GPU 0" in result.detail


def test_check_passes_where_multicast_was_bound():
    (result,) = check(with_multicast(TWO_H200, BOUND))
    assert result.status is Status.PASS


def test_check_warns_that_a_trap_turned_off_still_applies():
    inv = inventory(traps={MNNVL: False})
    (result,) = check(with_multicast(TWO_H200, BIND_401), inv)
    assert result.status is Status.WARN
    assert "turned off" in result.detail
