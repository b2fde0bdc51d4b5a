"""Preflight and topology checks: one test per rule and outcome, over facts of real captures.

The healthy node is the real 8 x H200 probe (`tests/support/probe_output.py`); each test
changes one fact, the way a broken node would show it.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from cluster.decide.checks import (
    GIB,
    RULES,
    CheckInput,
    CheckResult,
    Status,
    check_api_key,
    check_cache_disk,
    check_clock_skew,
    check_docker,
    check_driver_version,
    check_gpu_errors,
    check_gpus,
    check_gpus_idle,
    check_head_ports,
    check_image,
    check_model_present,
    check_nvidia_runtime,
    check_ray_nodes,
    check_route_to_head,
    check_shared_memory,
    check_ssh,
    check_topology,
    check_workers_reach_head,
    exit_code,
    results_as_dicts,
    run_checks,
)
from cluster.decide.inventory import Inventory
from cluster.decide.runtime import Runtime
from cluster.facts.gpu import GpuFacts, GpuProblemKind, GpuProcess, parse_topology
from cluster.facts.host import DiskSpace, DockerFacts, HostFacts, RouteToHead, parse_probe
from tests.support.probe_output import H200, H200X2, compose_probe, h200_sections, read

HEALTHY = parse_probe(compose_probe(h200_sections()))
# probed on a real 2 x H200 host (NVLink between the two), idle and with a process on GPU0
TWO_H200 = parse_probe(read(H200X2 / "probe.txt"))
TWO_H200_BUSY = parse_probe(read(H200X2 / "probe-busy.txt"))
MISSING = "nvidia-smi is not installed"


def inventory(**changes: Any) -> Inventory:
    data: dict[str, Any] = {
        "cluster": "demo",
        "image": "vllm/vllm-openai:v0.11.0",
        "nodes": [{"name": "a", "address": "10.0.0.1"}, {"name": "b", "address": "10.0.0.2"}],
        "model_cache": "/data/hf",
        "model": {"name": "meta-llama/Llama-3.1-405B-Instruct"},
        "secrets": {"api_key": "env:USERS_KEY"},
    }
    model = changes.pop("model", {})
    data.update(changes)
    data["model"] = {**data["model"], **model}
    return Inventory.model_validate(data)


def given(b: HostFacts = HEALTHY, a: HostFacts = HEALTHY, **settings: Any) -> CheckInput:
    """Two nodes, a (the head) and b; b is the one the tests break unless said otherwise."""
    extra = {
        k: settings.pop(k)
        for k in ("unreachable", "cluster_running_on_head", "runtime")
        if k in settings
    }
    return CheckInput(inventory(**settings), {"a": a, "b": b}, **extra)


def with_gpus(facts: HostFacts, **changes: Any) -> HostFacts:
    return replace(facts, gpu=replace(facts.gpu, **changes))


def with_gpu_values(facts: HostFacts, index: int, **values: Any) -> HostFacts:
    gpus = list(facts.gpus)
    gpus[index] = replace(gpus[index], **values)
    return with_gpus(facts, gpus=tuple(gpus))


def only(results: list[CheckResult], node: str | None = "b") -> CheckResult:
    [result] = [r for r in results if r.node == node]
    return result


def statuses(results: list[CheckResult]) -> dict[str | None, Status]:
    return {r.node: r.status for r in results}


# --- ssh -----------------------------------------------------------------------------------


def test_ssh_passes_for_probed_nodes():
    assert statuses(check_ssh(given())) == {"a": Status.PASS, "b": Status.PASS}


def test_ssh_fails_for_an_unreachable_node_with_its_reason():
    checks = CheckInput(inventory(), {"a": HEALTHY}, unreachable={"b": "connection refused"})
    result = only(check_ssh(checks))
    assert (result.status, result.detail) == (Status.FAIL, "connection refused")
    assert "ssh 10.0.0.2" in result.remedy


def test_ssh_fails_for_a_node_without_facts_even_without_a_reason():
    result = only(check_ssh(CheckInput(inventory(), {"a": HEALTHY})))
    assert result.status is Status.FAIL
    assert "no facts" in result.detail


def test_ssh_warns_when_the_probe_output_was_cut_off():
    result = only(check_ssh(given(replace(HEALTHY, problems=("cut off",)))))
    assert result.status is Status.WARN


def test_other_rules_leave_out_nodes_without_facts():
    checks = CheckInput(inventory(), {"a": HEALTHY}, unreachable={"b": "timed out"})
    assert {r.node for r in run_checks(checks)} == {"a", "b", None}
    assert [r.name for r in run_checks(checks) if r.node == "b"] == ["ssh"]


# --- docker --------------------------------------------------------------------------------


def test_docker_passes_with_its_version():
    assert only(check_docker(given())).detail == "Docker 28.3.3"


@pytest.mark.parametrize(
    ("problem", "fix"),
    [
        ("docker is not installed", "install Docker Engine"),
        ("exit 1: permission denied while trying to connect", "docker group"),
        ("exit 1: Cannot connect to the Docker daemon", "systemctl enable --now docker"),
    ],
)
def test_docker_fails_when_the_daemon_does_not_answer(problem, fix):
    result = only(check_docker(given(replace(HEALTHY, docker=DockerFacts(problem=problem)))))
    assert result.status is Status.FAIL
    assert problem in result.detail
    assert fix in result.remedy


def test_docker_fails_when_too_old_for_gpus():
    old = replace(HEALTHY, docker=replace(HEALTHY.docker, server_version="18.09.1"))
    assert only(check_docker(given(old))).status is Status.FAIL


# --- nvidia runtime ------------------------------------------------------------------------


def test_nvidia_runtime_passes_when_docker_lists_it():
    assert only(check_nvidia_runtime(given())).status is Status.PASS


def test_nvidia_runtime_passes_with_the_toolkit_hook_alone():
    hook_only = replace(HEALTHY, docker=replace(HEALTHY.docker, runtimes=("runc",)))
    assert only(check_nvidia_runtime(given(hook_only))).status is Status.PASS


def test_nvidia_runtime_fails_without_the_toolkit():
    bare = replace(HEALTHY, docker=DockerFacts(server_version="28.3.3", runtimes=("runc",)))
    result = only(check_nvidia_runtime(given(bare)))
    assert result.status is Status.FAIL
    assert "nvidia-ctk runtime configure" in result.remedy


def test_nvidia_runtime_is_skipped_when_docker_does_not_answer():
    down = replace(HEALTHY, docker=DockerFacts(problem="docker is not installed"))
    assert only(check_nvidia_runtime(given(down))).status is Status.SKIP


# --- GPUs ----------------------------------------------------------------------------------


def test_gpus_pass_when_every_node_has_the_same():
    assert only(check_gpus(given())).detail == "8 x NVIDIA H200"


def test_gpus_fail_on_the_node_with_a_gpu_less():
    seven = with_gpus(HEALTHY, gpus=HEALTHY.gpus[:7])
    results = check_gpus(three(seven))
    assert statuses(results) == {"a": Status.PASS, "b": Status.FAIL, "c": Status.PASS}
    assert only(results).detail == "7 x NVIDIA H200, but other nodes have 8 x NVIDIA H200"


def three_nodes() -> list[dict[str, str]]:
    return [{"name": n, "address": f"10.0.0.{i}"} for i, n in enumerate("abc", start=1)]


def three(b: HostFacts) -> CheckInput:
    """Three nodes, b the odd one: the majority says what is normal."""
    return CheckInput(inventory(nodes=three_nodes()), {"a": HEALTHY, "b": b, "c": HEALTHY})


def test_gpus_fail_on_the_node_with_another_model():
    gpus = tuple(replace(g, name="NVIDIA H100 80GB HBM3") for g in HEALTHY.gpus)
    results = check_gpus(three(with_gpus(HEALTHY, gpus=gpus)))
    assert only(results).status is Status.FAIL
    assert "NVIDIA H100 80GB HBM3" in only(results).detail


def test_gpus_fail_with_nvidia_smis_problem_and_fix():
    missing = parse_probe(read(H200.parents[1] / "probe" / "debian-no-gpu-no-docker.txt"))
    result = only(check_gpus(given(missing)))
    assert result.status is Status.FAIL
    assert result.detail == f"{GpuProblemKind.NVIDIA_SMI_MISSING}: {MISSING}"
    assert "install the NVIDIA driver" in result.remedy


def test_gpus_fail_when_no_gpu_is_listed_even_without_a_problem():
    result = only(check_gpus(given(replace(HEALTHY, gpu=GpuFacts()))))
    assert (result.status, result.detail) == (Status.FAIL, "nvidia-smi listed no GPUs")


def test_gpus_fail_when_the_inventory_declares_another_count():
    nodes = [
        {"name": "a", "address": "10.0.0.1", "gpus": 4},
        {"name": "b", "address": "10.0.0.2", "gpus": 4},
    ]
    result = only(check_gpus(given(nodes=nodes)))
    assert result.status is Status.FAIL
    assert "declares 4 GPUs, nvidia-smi lists 8" in result.detail


def test_driver_version_passes_when_one_everywhere():
    [result] = check_driver_version(given())
    assert (result.status, result.detail) == (Status.PASS, "580.159.04 on every node")


def test_driver_version_warns_on_the_odd_node():
    older = with_gpus(HEALTHY, driver_version="570.86.15")
    result = only(check_driver_version(three(older)))
    assert result.status is Status.WARN
    assert result.detail == "driver 570.86.15, other nodes 580.159.04"


def test_driver_version_is_skipped_when_unknown_everywhere():
    unknown = with_gpus(HEALTHY, driver_version=None)
    assert check_driver_version(given(unknown, a=unknown))[0].status is Status.SKIP


def test_gpu_errors_pass_on_healthy_gpus():
    assert only(check_gpu_errors(given())).status is Status.PASS


def test_gpu_errors_fail_on_uncorrected_ecc_errors():
    result = only(check_gpu_errors(given(with_gpu_values(HEALTHY, 2, ecc_uncorrected=3))))
    assert (result.status, result.detail) == (Status.FAIL, "uncorrected ECC errors: GPU2 (3)")


def test_gpu_errors_fail_on_an_error_value():
    sick = with_gpu_values(HEALTHY, 5, errors=("temperature.gpu=[GPU requires reset]",))
    result = only(check_gpu_errors(given(sick)))
    assert result.status is Status.FAIL
    assert "GPU5 temperature.gpu=[GPU requires reset]" in result.detail


def test_gpu_errors_fail_on_mig_mode():
    result = only(check_gpu_errors(given(with_gpu_values(HEALTHY, 0, mig_enabled=True))))
    assert (result.status, result.detail) == (Status.FAIL, "MIG mode enabled on GPU0")


def test_gpus_idle_passes_when_no_process_holds_memory():
    assert only(check_gpus_idle(given())).status is Status.PASS


def test_gpus_idle_warns_when_another_process_holds_memory():
    uuid = HEALTHY.gpus[1].uuid
    busy = with_gpus(HEALTHY, processes=(GpuProcess(4242, "python3", 2566, uuid),))
    result = only(check_gpus_idle(given(busy)))
    assert result.status is Status.WARN
    assert result.detail == "GPU memory held by python3 (pid 4242, GPU1, 2566 MiB)"


# --- topology ------------------------------------------------------------------------------

TOPOLOGY = read(H200 / "topo-m.txt")


def with_links(facts: HostFacts, kind_of: Any) -> HostFacts:
    """The node with its GPU links replaced: kind_of(a, b) for every pair of GPUs a != b."""
    topology = parse_topology(TOPOLOGY)
    links = {(a, b): "X" if a == b else kind_of(a, b) for a, b in topology.links}
    return with_gpus(facts, topology=replace(topology, links=links))


def two_pcie_islands(a: int, b: int) -> str:
    return "NV12" if a // 4 == b // 4 else "SYS"


def test_topology_passes_on_nvlink():
    result = only(check_topology(given()))
    assert (result.status, result.detail) == (Status.PASS, "NVLink between 8 GPUs")


def test_gpu_checks_on_two_real_two_gpu_hosts():
    checks = given(TWO_H200_BUSY, a=TWO_H200, model={"tensor_parallel": 2, "pipeline_parallel": 2})
    assert statuses(check_gpus(checks)) == {"a": Status.PASS, "b": Status.PASS}
    assert only(check_topology(checks)).detail == "NVLink between 2 GPUs"
    idle = check_gpus_idle(checks)
    assert only(idle, "a").status is Status.PASS
    assert only(idle).status is Status.WARN
    assert "python3" in only(idle).detail and "GPU0, 2566 MiB" in only(idle).detail


def test_topology_warns_when_tensor_parallel_spans_gpus_without_nvlink():
    pcie = with_links(HEALTHY, lambda a, b: "NODE")
    result = only(check_topology(given(pcie)))
    assert result.status is Status.WARN
    assert result.detail.startswith(
        "PCIe between 8 GPUs: tensor parallel runs over PCIe (GPU0-GPU1 NODE"
    )


def test_topology_passes_when_tensor_parallel_stays_within_nvlinked_gpus():
    islands = with_links(HEALTHY, two_pcie_islands)
    model = {"tensor_parallel": 4, "pipeline_parallel": 4}
    assert only(check_topology(given(islands, a=islands, model=model))).status is Status.PASS
    assert only(check_topology(given(islands, a=islands))).status is Status.WARN


def test_topology_warns_when_tensor_parallel_spans_nodes():
    result = only(check_topology(given(model={"tensor_parallel": 16, "pipeline_parallel": 1})))
    assert result.status is Status.WARN
    assert "spans nodes" in result.detail


def test_topology_is_skipped_without_a_matrix():
    assert only(check_topology(given(with_gpus(HEALTHY, topology=None)))).status is Status.SKIP


# --- host resources ------------------------------------------------------------------------


def with_shm(size: int) -> HostFacts:
    return replace(HEALTHY, shm=DiskSpace("/dev/shm", size, size))


@pytest.mark.parametrize(
    ("size", "status"),
    [(512 * GIB, Status.PASS), (4 * GIB, Status.WARN), (64 << 20, Status.FAIL)],
)
def test_shared_memory_by_size(size, status):
    result = only(check_shared_memory(given(with_shm(size))))
    assert result.status is status
    assert (result.remedy is None) == (status is Status.PASS)


def test_shared_memory_needs_less_in_cpu_mode():
    assert (
        only(check_shared_memory(given(with_shm(4 * GIB), accelerator="cpu"))).status is Status.PASS
    )
    assert (
        only(check_shared_memory(given(with_shm(64 << 20), accelerator="cpu"))).status
        is Status.FAIL
    )


def test_shared_memory_warns_when_unknown():
    assert only(check_shared_memory(given(replace(HEALTHY, shm=None)))).status is Status.WARN


def with_cache_free(free: int) -> HostFacts:
    return replace(HEALTHY, cache_disk=DiskSpace("/data", 7000 * GIB, free))


@pytest.mark.parametrize(
    ("free", "status"),
    [(3000 * GIB, Status.PASS), (50 * GIB, Status.WARN), (1 * GIB, Status.FAIL)],
)
def test_cache_disk_by_free_space(free, status):
    result = only(check_cache_disk(given(with_cache_free(free))))
    assert result.status is status
    assert result.detail.endswith("free at /data/hf (on /data)")


def test_cache_disk_needs_little_in_cpu_mode():
    cpu = given(with_cache_free(50 * GIB), accelerator="cpu")
    assert only(check_cache_disk(cpu)).status is Status.PASS


def test_cache_disk_warns_when_unknown():
    assert only(check_cache_disk(given(replace(HEALTHY, cache_disk=None)))).status is Status.WARN


# --- network -------------------------------------------------------------------------------


def listening(*ports: int) -> HostFacts:
    return replace(HEALTHY, listening_ports=frozenset(ports))


def test_head_ports_pass_when_free():
    [result] = check_head_ports(given())
    assert (result.node, result.status, result.detail) == (
        "a",
        Status.PASS,
        "free: the endpoint 8000, vLLM (loopback) 30100, Ray 6379",
    )


def test_head_ports_fail_when_taken():
    [result] = check_head_ports(given(a=listening(22, 6379)))
    assert (result.status, result.detail) == (Status.FAIL, "already in use on the head: Ray 6379")


def test_head_ports_pass_when_this_clusters_container_holds_them():
    [result] = check_head_ports(given(a=listening(6379, 8000), cluster_running_on_head=True))
    assert result.status is Status.PASS


def test_head_ports_with_the_mp_executor_check_the_rendezvous_port_and_ray_only_with_ray():
    with_ray = Runtime("img", ray=True, executor="mp", reason="the image has Ray")
    [result] = check_head_ports(given(a=listening(22), executor="mp", runtime=with_ray))
    assert result.detail == (
        "free: the endpoint 8000, vLLM (loopback) 30100, Ray 6379, torch.distributed 29501"
    )
    without_ray = Runtime("img", ray=False, executor="mp", reason="no Ray in the image")
    [result] = check_head_ports(given(a=listening(6379), executor="mp", runtime=without_ray))
    assert (result.status, result.detail) == (
        Status.PASS,
        "free: the endpoint 8000, vLLM (loopback) 30100, torch.distributed 29501",
    )
    assert check_head_ports(given(a=listening(29501), executor="mp"))[0].status is Status.FAIL


def with_route(**route: Any) -> HostFacts:
    return replace(HEALTHY, route=RouteToHead(**route))


def test_an_endpoint_without_a_key_fails_unless_anonymous_use_is_asked_for():
    [keyed] = check_api_key(given())
    assert keyed.status is Status.PASS
    [missing] = check_api_key(given(secrets={}))
    assert missing.status is Status.FAIL and "secrets.api_key" in missing.remedy
    [anonymous] = check_api_key(given(secrets={}, router={"allow_anonymous": True}))
    assert anonymous.status is Status.WARN and "anyone" in anonymous.detail


def test_route_to_head_reports_the_interface():
    result = only(check_route_to_head(given()))
    assert (result.status, result.detail) == (Status.PASS, "via ens9f0, source 10.0.0.2")


def test_route_to_head_fails_without_a_route():
    result = only(check_route_to_head(given(with_route(problem="ip is not installed"))))
    assert result.status is Status.FAIL
    assert "network.interface" in result.remedy


def test_route_to_head_only_warns_without_a_route_when_the_interface_is_set():
    facts = with_route(problem="ip is not installed")
    checks = given(facts, network={"interface": "ens9f0"})
    assert only(check_route_to_head(checks)).status is Status.WARN


def test_route_to_head_warns_when_it_avoids_the_configured_interface():
    checks = given(network={"interface": "ib0"})
    result = only(check_route_to_head(checks))
    assert (result.status, result.detail) == (
        Status.WARN,
        "routes to the head via ens9f0, network.interface is ib0",
    )


def test_route_to_head_passes_when_it_uses_the_configured_interface():
    checks = given(network={"interface": "ens9f0"})
    assert only(check_route_to_head(checks)).status is Status.PASS


def test_clock_skew_passes_within_two_seconds():
    later = replace(HEALTHY, clock_s=HEALTHY.clock_s + 1.5)
    [result] = check_clock_skew(given(later))
    assert (result.status, result.node) == (Status.PASS, None)


def test_clock_skew_warns_beyond_two_seconds():
    later = replace(HEALTHY, clock_s=HEALTHY.clock_s + 7.25)
    [result] = check_clock_skew(given(later))
    assert result.status is Status.WARN
    assert result.detail == "b is 7.2 s ahead of a (probe latency included)"


def test_clock_skew_is_skipped_with_one_clock():
    unknown = replace(HEALTHY, clock_s=None)
    assert check_clock_skew(given(unknown))[0].status is Status.SKIP


# --- all together --------------------------------------------------------------------------


def test_a_healthy_h200_pair_passes_everything():
    results = run_checks(given())
    assert {r.status for r in results} == {Status.PASS}
    assert exit_code(results) == 0


def test_cpu_mode_skips_every_gpu_rule_once_with_the_reason():
    cpu_host = parse_probe(read(H200.parents[1] / "probe" / "debian-no-gpu-no-docker.txt"))
    results = run_checks(given(cpu_host, a=cpu_host, accelerator="cpu"))
    skipped = [r for r in results if r.status is Status.SKIP]
    assert [r.name for r in skipped] == [
        "nvidia runtime",
        "gpus",
        "driver version",
        "gpu errors",
        "gpus idle",
        "topology",
        "infiniband",
    ]
    assert {r.detail for r in skipped} == {"accelerator: cpu, no GPUs to check"}
    assert all(r.node is None for r in skipped)


def test_the_local_machine_fails_for_its_missing_gpu_and_docker_daemon():
    local = parse_probe(read(H200.parents[1] / "probe" / "debian-no-gpu-no-docker.txt"))
    results = run_checks(given(local))
    failing = {r.name for r in results if r.status is Status.FAIL and r.node == "b"}
    assert failing == {"docker", "gpus"}
    assert exit_code(results) == 1


def test_every_rule_has_a_docstring():
    assert all(rule.__doc__ for rule in RULES)


# --- rules over data other steps gather ----------------------------------------------------

IMAGE_ID = "sha256:4f3c1b2a" + "0" * 56


def test_image_passes_with_one_id_everywhere():
    [result] = check_image(inventory(), {"a": IMAGE_ID, "b": IMAGE_ID})
    assert result.status is Status.PASS


def test_image_fails_on_the_node_with_another_id():
    other = "sha256:99" + "0" * 62
    ids = {"a": IMAGE_ID, "b": other, "c": IMAGE_ID}
    results = check_image(inventory(nodes=three_nodes()), ids)
    assert statuses(results) == {"b": Status.FAIL}
    assert "docker rmi" in only(results).remedy


def test_image_warns_when_missing_on_some_nodes():
    [result] = check_image(inventory(), {"a": IMAGE_ID, "b": None})
    assert (result.status, result.node) == (Status.WARN, None)
    assert "missing on b" in result.detail


def test_image_warns_when_on_no_node():
    [result] = check_image(inventory(), {"a": None, "b": None})
    assert result.status is Status.WARN


def test_model_passes_when_in_every_cache():
    [result] = check_model_present(inventory(), {"a": True, "b": True})
    assert result.status is Status.PASS


def test_a_local_model_path_missing_on_a_node_fails():
    local = inventory(model={"name": "/data/hf/llama-405b"})
    result = only(check_model_present(local, {"a": True, "b": False}))
    assert result.status is Status.FAIL


def test_a_hub_model_downloaded_on_some_nodes_only_warns():
    result = only(check_model_present(inventory(), {"a": True, "b": False}))
    assert result.status is Status.WARN


def test_a_hub_model_on_no_node_warns_that_each_downloads_it():
    [result] = check_model_present(inventory(), {"a": False, "b": False})
    assert (result.status, result.node) == (Status.WARN, None)


def test_workers_reaching_the_head_pass():
    result = only(check_workers_reach_head(inventory(), {"b": None}))
    assert (result.status, result.detail) == (Status.PASS, "10.0.0.1:6379 reached")


def test_a_worker_that_cannot_reach_the_head_fails():
    result = only(check_workers_reach_head(inventory(), {"b": "timed out after 5 s"}))
    assert result.status is Status.FAIL
    assert result.detail == "cannot reach 10.0.0.1:6379: timed out after 5 s"


def test_ray_nodes_pass_when_ray_sees_every_gpu():
    facts = {"a": HEALTHY, "b": HEALTHY}
    assert statuses(check_ray_nodes(facts, {"a": 8.0, "b": 8.0})) == {
        "a": Status.PASS,
        "b": Status.PASS,
    }


def test_ray_nodes_fail_for_a_node_ray_does_not_see_alive():
    assert only(check_ray_nodes({"b": HEALTHY}, {"b": None})).status is Status.FAIL


def test_ray_nodes_fail_when_ray_sees_fewer_gpus():
    result = only(check_ray_nodes({"b": HEALTHY}, {"b": 7.0}))
    assert (result.status, result.detail) == (Status.FAIL, "Ray sees 7 GPUs, nvidia-smi 8")


# --- output --------------------------------------------------------------------------------


def test_exit_code_is_one_on_any_fail_and_zero_on_warnings():
    warn = CheckResult("x", Status.WARN, "w")
    fail = CheckResult("y", Status.FAIL, "f", "b", "fix it")
    assert exit_code([warn]) == 0
    assert exit_code([warn, fail]) == 1


def test_results_as_json():
    results = [CheckResult("ssh", Status.FAIL, "refused", "b", "open port 22")]
    assert json.loads(json.dumps(results_as_dicts(results))) == [
        {
            "name": "ssh",
            "node": "b",
            "status": "FAIL",
            "detail": "refused",
            "remedy": "open port 22",
        }
    ]
