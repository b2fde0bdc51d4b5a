"""The plan: what runs on every node, decided from the inventory and the facts alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.cli.plan_text import render_text
from cluster.decide.inventory import Inventory, load_inventory
from cluster.decide.plan import (
    LABEL_CLUSTER,
    LABEL_EXECUTOR,
    LABEL_NODE,
    LABEL_RAY,
    LABEL_ROLE,
    NodeFacts,
    PlanError,
    build_plan,
    container_name,
    declared_facts,
    supervisor_argv,
)
from cluster.decide.ray_image import recipe_for
from cluster.decide.runtime import RaySupply, Runtime, choose_runtime
from cluster.facts.image import parse_image_probe

REPO = Path(__file__).resolve().parents[2]


def example(name: str) -> Inventory:
    return load_inventory(REPO / "inventory" / name)


def gpu_facts(
    inventory: Inventory, gpus: int = 8, interface: str | None = "ens8f0"
) -> dict[str, NodeFacts]:
    return {
        n.node_name: NodeFacts(
            address=n.address, gpu_count=gpus, gpu_model="NVIDIA H200", interface=interface
        )
        for n in inventory.nodes
    }


def flag(argv: tuple[str, ...], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_gpu_mode_uses_tp_equal_gpus_per_node_and_pp_equal_nodes() -> None:
    inventory = example("gpu-2x8.yaml")
    plan = build_plan(inventory, gpu_facts(inventory))
    assert (plan.tensor_parallel, plan.pipeline_parallel) == (8, 2)
    argv = plan.head.serve.argv
    assert argv[:3] == ("vllm", "serve", "meta-llama/Llama-3.1-70B-Instruct")
    assert flag(argv, "--tensor-parallel-size") == "8"
    assert flag(argv, "--pipeline-parallel-size") == "2"
    assert flag(argv, "--distributed-executor-backend") == "ray"
    assert (flag(argv, "--host"), flag(argv, "--port")) == ("127.0.0.1", "30100")
    assert flag(argv, "--served-model-name") == "llama-70b"
    assert argv[-4:] == ("--max-model-len", "32768", "--gpu-memory-utilization", "0.92")


def test_ray_executor_serves_from_the_head_only() -> None:
    inventory = example("gpu-4x8.yaml")
    plan = build_plan(inventory, gpu_facts(inventory))
    assert plan.head.serve is not None
    assert all(worker.serve is None for worker in plan.workers)


def test_ray_head_and_workers_start_with_their_own_node_ip() -> None:
    inventory = example("gpu-2x8.yaml")
    plan = build_plan(inventory, gpu_facts(inventory))
    assert plan.head.container.command == (
        "ray", "start", "--head", "--port=6379", "--dashboard-host=127.0.0.1",
        "--node-ip-address=10.0.0.11", "--metrics-export-port=8080", "--disable-usage-stats",
        "--block",
    )  # fmt: skip
    assert plan.workers[0].container.command == (
        "ray", "start", "--address=10.0.0.11:6379", "--node-ip-address=10.0.0.12",
        "--metrics-export-port=8080", "--disable-usage-stats", "--block",
    )  # fmt: skip


def test_every_container_gets_host_network_host_ipc_gpus_and_the_cache_mount() -> None:
    inventory = example("gpu-2x8.yaml")
    for node in build_plan(inventory, gpu_facts(inventory)).nodes:
        container = node.container
        assert (container.network_mode, container.ipc_mode, container.gpus) == (
            "host",
            "host",
            "all",
        )
        assert [(m.source, m.target) for m in container.mounts] == [
            ("/data/huggingface", "/root/.cache/huggingface")
        ]
        assert container.name == container_name("llama70b") == "vcluster-llama70b"
        assert container.image == "vllm/vllm-openai:v0.32.0"


def test_the_network_environment_names_each_nodes_own_address_and_the_interface() -> None:
    inventory = example("gpu-4x8.yaml")  # no interface in the inventory: the detected one is used
    plan = build_plan(inventory, gpu_facts(inventory, interface="bond0"))
    for node in plan.nodes:
        env = node.container.environment
        assert env["VLLM_HOST_IP"] == node.facts.address == env["RAY_NODE_IP_ADDRESS"]
        assert env["NCCL_SOCKET_IFNAME"] == env["GLOO_SOCKET_IFNAME"] == "bond0"
        assert env["NCCL_DEBUG"] == "WARN"


def test_the_inventorys_interface_wins_over_the_detected_one() -> None:
    inventory = example("gpu-2x8.yaml")
    plan = build_plan(inventory, gpu_facts(inventory, interface="eth9"))
    assert plan.head.container.environment["NCCL_SOCKET_IFNAME"] == "ens8f0"


def test_labels_name_cluster_node_and_role() -> None:
    inventory = example("gpu-2x8.yaml")
    plan = build_plan(inventory, gpu_facts(inventory))
    labels = plan.workers[0].container.labels
    assert (labels[LABEL_CLUSTER], labels[LABEL_NODE], labels[LABEL_ROLE]) == (
        "llama70b",
        "gpu-b",
        "worker",
    )


def test_the_spec_hash_changes_with_the_spec_and_only_with_it() -> None:
    inventory = example("gpu-2x8.yaml")
    first = build_plan(inventory, gpu_facts(inventory)).head.container.spec_hash
    assert build_plan(inventory, gpu_facts(inventory)).head.container.spec_hash == first
    other_image = inventory.model_copy(update={"image": "vllm/vllm-openai:v0.12.0"})
    assert build_plan(other_image, gpu_facts(other_image)).head.container.spec_hash != first


def each_node_downloads(inventory: Inventory) -> Inventory:
    """The inventory with its model downloaded by every node's vLLM (`download: nodes`)."""
    model = inventory.primary_model.model_copy(update={"download": "nodes"})
    return inventory.model_copy(update={"model": model})


def test_the_hub_token_stays_here_when_the_model_is_downloaded_once() -> None:
    inventory = example("gpu-2x8.yaml")  # a hub model, secrets.hf_token, no source
    plan = build_plan(inventory, gpu_facts(inventory))
    for node in plan.nodes:
        assert "hf-token" not in node.container.secret_files
        assert "HF_TOKEN_PATH" not in node.container.environment
        assert node.container.environment["HF_HUB_OFFLINE"] == "1"


def test_secrets_are_files_by_reference_and_only_the_head_gets_the_api_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VCLUSTER_STATE_DIR", "/home/ops/.state/vcluster")
    inventory = each_node_downloads(example("gpu-2x8.yaml"))
    plan = build_plan(inventory, gpu_facts(inventory))
    assert {k: str(v) for k, v in plan.head.container.secret_files.items()} == {
        "hf-token": "env:HF_TOKEN",
        "api-key": "file:/etc/vcluster/api-key",
        "ray-token": "file:/home/ops/.state/vcluster/clusters/llama70b/ray-token",
    }
    assert set(plan.workers[0].container.secret_files) == {"hf-token", "ray-token"}
    assert "--api-key" not in plan.head.serve.argv


def test_no_secret_is_in_a_container_environment_only_the_paths_of_its_files() -> None:
    inventory = each_node_downloads(example("gpu-2x8.yaml"))
    plan = build_plan(inventory, gpu_facts(inventory))
    for node in plan.nodes:
        environment = node.container.environment
        assert environment["RAY_AUTH_TOKEN_PATH"] == "/var/lib/vcluster/secrets/ray-token"
        assert environment["HF_TOKEN_PATH"] == "/var/lib/vcluster/secrets/hf-token"
        assert not {"RAY_AUTH_TOKEN", "HF_TOKEN", "VLLM_API_KEY"} & set(environment)


def test_the_endpoint_is_the_router_in_front_of_vllm_on_loopback_with_one_model() -> None:
    inventory = example("gpu-2x8.yaml")
    plan = build_plan(inventory, gpu_facts(inventory))
    assert not plan.routed and plan.front is not None
    head = plan.head.serve
    assert head.front is not None and head.front[-3:] == (
        "front",
        "/var/lib/vcluster/serving.json",
        plan.head.name,
    )
    [model] = plan.front.models
    assert model.external and model.served == "llama-70b" and model.api_port == 30100
    assert flag(head.argv, "--host") == "127.0.0.1"
    assert plan.front.port == 8000 and plan.endpoint.endswith(":8000/v1")
    assert all(n.serve is None or n.serve.front is None for n in plan.workers)


def test_every_ray_process_requires_the_same_cluster_token() -> None:
    inventory = example("gpu-4x8.yaml")
    plan = build_plan(inventory, gpu_facts(inventory))
    assert {n.container.environment["RAY_AUTH_MODE"] for n in plan.nodes} == {"token"}
    assert len({n.container.secret_files["ray-token"] for n in plan.nodes}) == 1
    assert not any("token" in word.lower() for n in plan.nodes for word in n.container.command)


def test_a_ray_token_given_by_reference_replaces_the_generated_one(
    tmp_path: Path,
) -> None:
    text = (REPO / "inventory" / "gpu-2x8.yaml").read_text()
    text = text.replace("secrets:", "secrets:\n  ray_token: env:OUR_RAY_TOKEN", 1)
    path = tmp_path / "inventory.yaml"
    path.write_text(text)
    inventory = load_inventory(path)
    plan = build_plan(inventory, gpu_facts(inventory))
    assert str(plan.head.container.secret_files["ray-token"]) == "env:OUR_RAY_TOKEN"


def test_the_dashboard_stays_on_localhost_unless_the_inventory_opens_it(tmp_path: Path) -> None:
    inventory = example("gpu-2x8.yaml")
    assert (
        "--dashboard-host=127.0.0.1"
        in build_plan(inventory, gpu_facts(inventory)).head.container.command
    )
    opened = inventory.model_copy(
        update={"ray": inventory.ray.model_copy(update={"dashboard_host": "0.0.0.0"})}
    )
    plan = build_plan(opened, gpu_facts(opened))
    assert "--dashboard-host=0.0.0.0" in plan.head.container.command
    assert not any(w.startswith("--dashboard-host") for w in plan.workers[0].container.command)


def test_no_secret_value_reaches_the_rendered_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_super_secret_value")
    inventory = each_node_downloads(example("gpu-2x8.yaml"))
    plan = build_plan(inventory, gpu_facts(inventory))
    rendered = render_text(plan) + json.dumps(plan.to_dict())
    assert "hf_super_secret_value" not in rendered
    assert "/var/lib/vcluster/secrets/hf-token = ******** (from env:HF_TOKEN)" in render_text(plan)
    assert (
        plan.to_dict()["nodes"][0]["container"]["secret_files"]["hf-token"]
        == "<secret env:HF_TOKEN>"
    )


def test_explicit_tp_and_pp_are_kept() -> None:
    inventory = example("gpu-4x8.yaml")
    plan = build_plan(inventory, gpu_facts(inventory))
    assert (plan.tensor_parallel, plan.pipeline_parallel) == (8, 4)


def test_different_gpu_counts_across_nodes_stop_the_plan_naming_each_node() -> None:
    inventory = example("gpu-2x8.yaml")
    facts = gpu_facts(inventory)
    facts["gpu-b"] = NodeFacts(address="10.0.0.12", gpu_count=7)
    with pytest.raises(PlanError, match=r"different GPU counts \(gpu-a=8, gpu-b=7\)"):
        build_plan(inventory, facts)


def test_tp_times_pp_must_match_the_gpus_found() -> None:
    inventory = example("gpu-4x8.yaml")  # declares TP 8 x PP 4 = 32
    with pytest.raises(PlanError, match="TP x PP = 8 x 4 = 32, but the cluster has 16 GPUs"):
        build_plan(inventory, gpu_facts(inventory, gpus=4))


def test_a_node_without_gpus_in_gpu_mode_stops_the_plan() -> None:
    inventory = example("gpu-2x8.yaml")
    with pytest.raises(PlanError, match="no GPUs found"):
        build_plan(inventory, gpu_facts(inventory, gpus=0))


def test_mp_executor_runs_vllm_on_every_node_with_its_rank_and_headless_workers() -> None:
    inventory = example("cpu-2.yaml")
    plan = build_plan(inventory, declared_facts(inventory))
    head, worker = plan.head.serve.argv, plan.workers[0].serve.argv
    assert (plan.tensor_parallel, plan.pipeline_parallel) == (1, 2)
    for argv, rank in ((head, "0"), (worker, "1")):
        assert flag(argv, "--distributed-executor-backend") == "mp"
        assert flag(argv, "--nnodes") == "2"
        assert flag(argv, "--node-rank") == rank
        assert flag(argv, "--master-addr") == "172.30.0.11"
        assert argv[2] == "/root/.cache/huggingface/models/tiny-llama"
    assert "--headless" in worker and "--port" not in worker
    assert "--headless" not in head and flag(head, "--port") == "30100"


def test_cpu_mode_requests_no_gpus_and_sets_no_nccl_interface() -> None:
    inventory = example("cpu-2.yaml")
    for node in build_plan(inventory, declared_facts(inventory)).nodes:
        assert node.container.gpus is None
        assert "NCCL_SOCKET_IFNAME" not in node.container.environment
        assert node.container.environment["GLOO_SOCKET_IFNAME"] == "eth0"


def test_mp_executor_is_offered_on_gpus_too() -> None:
    inventory = example("gpu-2x8.yaml").model_copy(update={"executor": "mp"})
    plan = build_plan(inventory, gpu_facts(inventory))
    assert [n.serve is not None for n in plan.nodes] == [True, True]
    assert flag(plan.workers[0].serve.argv, "--tensor-parallel-size") == "8"


def test_offline_plan_needs_declared_gpu_counts() -> None:
    inventory = example("gpu-2x8.yaml")
    nodes = [n.model_copy(update={"gpus": None}) for n in inventory.nodes]
    with pytest.raises(PlanError, match="missing on gpu-a, gpu-b"):
        declared_facts(inventory.model_copy(update={"nodes": nodes}))


def test_the_endpoint_is_the_heads_address_and_vllm_port() -> None:
    inventory = example("gpu-4x8.yaml")
    assert build_plan(inventory, gpu_facts(inventory)).endpoint == "http://192.168.40.1:8000/v1"


def _runtime_for(inventory: Inventory, probe_fixture: str, supply: RaySupply) -> Runtime:
    text = (REPO / "tests" / "fixtures" / "image-facts" / probe_fixture).read_text()
    return choose_runtime(inventory, parse_image_probe(text, "sha256:" + "ab" * 32), supply)


def test_without_ray_the_nodes_run_no_ray_and_get_no_ray_token() -> None:
    inventory = example("cpu-2.yaml")
    runtime = _runtime_for(inventory, "vllm-cpu-noray-0.32.0.txt", RaySupply(None, "no index"))
    plan = build_plan(inventory, declared_facts(inventory), runtime)
    assert not plan.ray and plan.executor == "mp" and plan.image_facts == runtime.facts
    head, worker = plan.head, plan.workers[0]
    for node in plan.nodes:
        container = node.container
        assert container.command == () and container.labels[LABEL_RAY] == "no"
        assert "ray-token" not in container.secret_files
        assert not any(name.startswith("RAY_") for name in container.environment)
        assert json.loads(supervisor_argv(container)[3])["ray"] is None
    # nothing to wait for before vLLM: the worker's vLLM meets the head's at its master port
    assert worker.container.supervisor.wait_for is None
    assert worker.container.supervisor.peers == (head.facts.address,)
    assert flag(worker.serve.argv, "--distributed-executor-backend") == "mp"
    assert "ray: none" in render_text(plan) and "no Ray" in render_text(plan)


def test_a_derived_ray_ready_image_is_what_every_container_runs() -> None:
    inventory = example("gpu-2x8.yaml")
    facts_text = REPO / "tests" / "fixtures" / "image-facts" / "vllm-cpu-noray-0.32.0.txt"
    facts = parse_image_probe(facts_text.read_text(), "sha256:" + "cd" * 32)
    recipe = recipe_for(facts, inventory.image)
    runtime = choose_runtime(inventory, facts, RaySupply(recipe))
    plan = build_plan(inventory, gpu_facts(inventory), runtime)
    assert plan.ray and plan.executor == "ray" and plan.image == recipe.tag
    assert {n.container.image for n in plan.nodes} == {recipe.tag}
    assert plan.head.container.command[:3] == ("ray", "start", "--head")
    assert plan.head.container.labels[LABEL_RAY] == "yes"
    assert plan.head.container.labels[LABEL_EXECUTOR] == "ray"
