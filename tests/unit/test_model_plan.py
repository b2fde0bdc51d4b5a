"""The plan of a cluster with several models: the router's configuration, each rank's argv
and environment, and the errors for GPUs that are not there or models that cannot fit."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from cluster.cli.plan_text import render_text
from cluster.decide.inventory import load_inventory
from cluster.decide.model_plan import serving_config, sleep_levels
from cluster.decide.plan import NodeFacts, PlanError, build_plan
from cluster.remote.serving.agent import api_host, rank_argv, rank_environment
from cluster.remote.serving.catalog import ServingConfig

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "inventory" / "gpu-models.yaml"


def facts(gpus: dict[str, int]) -> dict[str, NodeFacts]:
    return {
        name: NodeFacts(address=f"10.0.0.{11 + i}", gpu_count=count, gpu_model="NVIDIA H200")
        for i, (name, count) in enumerate(gpus.items())
    }


@pytest.fixture
def plan():
    return build_plan(load_inventory(EXAMPLE), facts({"gpu-1": 8, "gpu-2": 8}))


def test_the_router_runs_on_the_head_and_an_agent_on_every_other_node(plan):
    assert plan.routed
    head, worker = plan.nodes
    assert head.serve.argv[-3:] == ("router", "/var/lib/vcluster/serving.json", "gpu-1")
    assert worker.serve.argv[-3:] == ("agent", "/var/lib/vcluster/serving.json", "gpu-2")
    assert not head.serve.watch_titled  # models' processes come and go under the router
    assert head.container.supervisor.peers == ()
    assert "agent-token" in head.container.secret_files
    assert "agent-token" in worker.container.secret_files


def test_each_model_gets_its_parallelism_ports_and_argv(plan):
    serving = plan.serving
    assert [(m.served, m.tensor_parallel, m.pipeline_parallel, m.keep_loaded)
            for m in serving.models] == [
        ("llama-70b", 4, 2, True), ("qwen-7b", 1, 1, False), ("mistral-24b", 2, 1, False)
    ]  # fmt: skip
    assert [(m.api_port, m.master_port) for m in serving.models] == [
        (30100, 30101), (30102, 30103), (30104, 30105)
    ]  # fmt: skip
    mistral = serving.models[2]
    assert mistral.argv[:3] == ("vllm", "serve", "mistralai/Mistral-Small-24B-Instruct-2501")
    assert mistral.argv[-2:] == ("--max-model-len", "16384")
    assert "--distributed-executor-backend" in mistral.argv


def test_a_gpu_subset_is_the_containers_gpus_and_the_placements_devices(plan):
    worker = plan.node("gpu-2")
    assert worker.container.gpus == (0, 1, 2, 3, 4, 5)
    assert plan.head.container.gpus == "all"
    assert [n.devices for n in plan.serving.nodes] == [tuple(range(8)), tuple(range(6))]


def test_the_configuration_reads_back_as_written(plan):
    assert ServingConfig.from_json(plan.serving.to_json()) == plan.serving


GUARD = "cluster.remote.serving.vllm_guard.guard"
"""The middleware every model's API server loads: no route but /v1 and the probes without the
agent token, from the node itself (vLLM's key covers only /v1)."""


def test_rank_0_on_the_head_listens_on_loopback_and_other_ranks_are_headless(plan):
    serving = plan.serving
    llama = serving.models[0]
    placement = (("gpu-1", (0, 1, 2, 3)), ("gpu-2", (2, 3, 4, 5)))
    first = rank_argv(serving, llama, placement, 0)
    second = rank_argv(serving, llama, placement, 1)
    assert first[-14:] == ["--nnodes", "2", "--node-rank", "0", "--master-addr", "10.0.0.11",
                           "--master-port", "30101", "--middleware", GUARD,
                           "--host", "127.0.0.1", "--port", "30100"]  # fmt: skip
    assert second[-9:] == ["--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.11",
                           "--master-port", "30101", "--headless"]  # fmt: skip
    assert api_host(serving, placement) == "127.0.0.1"


def test_a_one_node_model_off_the_head_listens_on_its_node_with_no_rendezvous(plan):
    serving = plan.serving
    qwen = serving.models[1]
    placement = (("gpu-2", (5,)),)
    argv = rank_argv(serving, qwen, placement, 0)
    assert "--nnodes" not in argv and "--headless" not in argv
    assert argv[-4:] == ["--host", "10.0.0.12", "--port", "30102"]


def test_a_rank_sees_its_gpus_and_serves_with_the_agent_token_as_its_key(plan):
    serving = plan.serving
    environment = rank_environment(
        serving,
        (("gpu-2", (4, 5)),),
        0,
        {"VCLUSTER_AGENT_TOKEN": "t0ken", "VLLM_API_KEY": "users-key", "PATH": "/bin"},
    )
    assert environment["CUDA_VISIBLE_DEVICES"] == "4,5"
    assert environment["VLLM_API_KEY"] == "t0ken"
    assert "VCLUSTER_AGENT_TOKEN" not in environment
    assert environment["PATH"] == "/bin"


def test_inside_a_subset_container_the_gpus_are_numbered_from_0(tmp_path):
    text = EXAMPLE.read_text().replace("gpu_ids: [0, 1, 2, 3, 4, 5]", "gpu_ids: [2, 3, 6, 7]")
    (tmp_path / "inventory.yaml").write_text(text)
    inventory = load_inventory(tmp_path / "inventory.yaml")
    serving = build_plan(inventory, facts({"gpu-1": 8, "gpu-2": 8})).serving
    environment = rank_environment(serving, (("gpu-2", (6, 7)),), 0, {})
    assert environment["CUDA_VISIBLE_DEVICES"] == "2,3"


def test_gpu_ids_a_node_does_not_have_are_a_plan_error_naming_it():
    inventory = load_inventory(EXAMPLE)
    with pytest.raises(PlanError) as error:
        build_plan(inventory, facts({"gpu-1": 8, "gpu-2": 4}))
    assert "gpu-2 has no GPU 4, 5 (it has 4)" in error.value.message


def test_a_model_the_found_gpus_cannot_hold_is_a_plan_error():
    inventory = load_inventory(EXAMPLE)
    with pytest.raises(PlanError) as error:
        build_plan(inventory, facts({"gpu-1": 2, "gpu-2": 8}))
    assert "model 'llama-70b' needs 2 node(s) with 4 device(s) each" in error.value.message


def test_the_plan_text_lists_the_models_and_the_devices(plan):
    text = render_text(plan)
    assert "models llama-70b, qwen-7b, mistral-24b, behind a router" in text
    assert "model 'qwen-7b': TP 1 x PP 1, on demand, unloaded after 900 s idle" in text
    assert "--gpus device=0,1,2,3,4,5" in text


GIB = 1024**3
DEVICES = {"gpu-1": tuple(range(8)), "gpu-2": tuple(range(6))}


def test_without_facts_models_that_give_way_sleep_at_level_2_and_kept_ones_never(plan):
    levels = {m.served: m.sleep for m in plan.serving.models}
    assert levels == {"llama-70b": None, "qwen-7b": 2, "mistral-24b": 2}


@pytest.mark.parametrize(
    ("available_gib", "expected"),
    [
        (
            256,
            {"llama-70b": None, "qwen-7b": 1, "mistral-24b": 1},
        ),  # (15 + 48) x 1.85 GiB fit in 128
        (
            100,
            {"llama-70b": None, "qwen-7b": 1, "mistral-24b": 2},
        ),  # 15 x 1.85 fits in 50, 63 x 1.85 not
        (20, {"llama-70b": None, "qwen-7b": 2, "mistral-24b": 2}),  # not even 15 x 1.85 in 10
    ],
    ids=["both", "the-first", "none"],
)
def test_level_1_while_the_sleepers_weights_fit_in_the_smallest_nodes_memory(
    available_gib, expected
):
    weights = {"llama-70b": 140 * GIB, "qwen-7b": 15 * GIB, "mistral-24b": 48 * GIB}
    available = {"gpu-1": 512 * GIB, "gpu-2": available_gib * GIB}
    levels = sleep_levels(load_inventory(EXAMPLE), DEVICES, weights, available)
    assert levels == expected


def test_the_plan_decides_sleep_on_the_nodes_memory_and_the_weights_found_here():
    """`up` passes the probed host and GPU memory (NodeFacts) and the weights in each model's
    `source` folder to the plan: the same decision as `sleep_levels` and the GPUs' room."""
    found = {
        name: replace(node, memory_bytes=available * GIB, gpu_memory_mib=143771)
        for (name, node), available in zip(
            facts({"gpu-1": 8, "gpu-2": 6}).items(), (512, 100), strict=True
        )
    }
    weights = {"llama-70b": 140 * GIB, "qwen-7b": 15 * GIB, "mistral-24b": 48 * GIB}
    serving = build_plan(load_inventory(EXAMPLE), found, weights_bytes=weights).serving
    assert serving is not None
    assert {m.served: m.sleep for m in serving.models} == {
        "llama-70b": None,
        "qwen-7b": 1,
        "mistral-24b": 2,
    }
    assert [n.sleepers for n in serving.nodes] == [9, 9]  # 140 GiB H200s, as measured


def test_the_inventorys_sleep_wins_and_off_stops_the_model(tmp_path):
    text = (
        EXAMPLE.read_text()
        .replace("    unload_after_s: 900\n", "    unload_after_s: 900\n    sleep: off\n")
        .replace(
            'args: [--max-model-len, "16384"]', 'args: [--max-model-len, "16384"]\n    sleep: 1'
        )
    )
    (tmp_path / "inventory.yaml").write_text(text)
    serving = build_plan(load_inventory(tmp_path / "inventory.yaml"), facts(
        {"gpu-1": 8, "gpu-2": 8}
    )).serving  # fmt: skip
    assert [m.sleep for m in serving.models] == [None, None, 1]


def test_on_the_cpu_platform_no_model_sleeps():
    inventory = load_inventory(REPO / "inventory" / "cpu-2.yaml")
    assert set(sleep_levels(inventory, {"a": (0,)}).values()) <= {None}


def test_a_gpus_room_for_sleepers_follows_its_memory():
    inventory = load_inventory(EXAMPLE)
    addresses = {"gpu-1": "10.0.0.11", "gpu-2": "10.0.0.12"}
    serving = serving_config(
        inventory, addresses, DEVICES, "/state", gpu_memory_gib={"gpu-1": 141.0}
    )
    assert [n.sleepers for n in serving.nodes] == [9, 2]  # measured H200; gpu-2: the default


def test_a_sleeping_models_ranks_start_with_sleep_mode_and_vllms_development_routes(plan):
    serving = plan.serving
    qwen = serving.models[1]
    assert qwen.sleep == 2
    placement = (("gpu-1", (0,)), ("gpu-2", (0,)))
    assert "--enable-sleep-mode" in rank_argv(serving, qwen, placement, 0)
    assert "--enable-sleep-mode" in rank_argv(serving, qwen, placement, 1)  # headless too
    first = rank_argv(serving, qwen, placement, 0)
    assert first[first.index("--middleware") :][:2] == ["--middleware", GUARD]
    assert "--middleware" not in rank_argv(serving, qwen, placement, 1)
    assert environment_path(rank_environment(serving, placement, 0, {}, qwen))
    environment = rank_environment(serving, placement, 0, {"VLLM_SERVER_DEV_MODE": "0"}, qwen)
    assert environment["VLLM_SERVER_DEV_MODE"] == "1"
    llama = serving.models[0]  # kept loaded: no sleep mode, no development routes
    assert "--enable-sleep-mode" not in rank_argv(serving, llama, placement, 0)
    assert GUARD in rank_argv(serving, llama, placement, 0)  # /invocations and the like too
    assert environment_path(rank_environment(serving, placement, 0, {}, llama))
    environment = rank_environment(serving, placement, 0, {"VLLM_SERVER_DEV_MODE": "1"}, llama)
    assert "VLLM_SERVER_DEV_MODE" not in environment


def environment_path(environment: dict[str, str]) -> bool:
    """Whether vLLM can import the guard: the package `cluster` is on its PYTHONPATH."""
    paths = environment.get("PYTHONPATH", "").split(":")
    return any(Path(p, "cluster", "remote", "serving", "vllm_guard.py").exists() for p in paths)
