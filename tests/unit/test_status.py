"""Cluster health: what makes a node and the cluster healthy, and the JSON document."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from rich.console import Console

from cluster.cli.tables import status_view
from cluster.facts.image import parse_image_probe
from cluster.report.status import ClusterStatus, NodeStatus, VllmStatus

REPO = Path(__file__).resolve().parents[2]

HEAD = NodeStatus(
    "node-1", "172.30.0.11", "head", True, container="running", ray_alive=True, vllm_process=True
)
WORKER = NodeStatus(
    "node-2", "172.30.0.12", "worker", True, container="running", ray_alive=True, vllm_process=True
)
SERVING = VllmStatus(health=True, models=("tiny-llama",), requests_running=0, requests_waiting=0)


def cluster(*nodes: NodeStatus, alive: int = 2, vllm: VllmStatus = SERVING) -> ClusterStatus:
    return ClusterStatus(
        cluster="demo",
        endpoint="http://172.30.0.11:8000/v1",
        served_model_name="tiny-llama",
        accelerator="cpu",
        nodes=nodes,
        ray_nodes_alive=alive,
        ray_nodes_expected=2,
        ray_resources={"CPU": 4.0, "GPU": 0.0},
        vllm=vllm,
    )


def test_all_nodes_in_ray_and_vllm_serving_is_healthy():
    assert cluster(HEAD, WORKER).healthy


def test_a_worker_whose_container_is_gone_makes_the_cluster_unhealthy():
    gone = NodeStatus("node-2", "172.30.0.12", "worker", True, container=None)
    status = cluster(HEAD, gone, alive=1)
    assert not status.healthy
    assert not gone.healthy


def test_an_unreachable_node_is_unhealthy_and_its_error_is_shown():
    lost = NodeStatus("node-2", "172.30.0.12", "worker", False, error="node-2: connection refused")
    status = cluster(HEAD, lost, alive=1)
    assert not status.healthy
    lines = [part for part in status_view(status) if isinstance(part, str)]
    assert "node-2: node-2: connection refused" in lines
    assert lines[-1] == "cluster demo: DEGRADED"


def test_a_dead_vllm_worker_process_is_unhealthy_even_when_ray_is_fine():
    dead = NodeStatus(
        "node-2", "172.30.0.12", "worker", True, container="running", ray_alive=True,
        vllm_process=False,
    )  # fmt: skip
    assert not cluster(HEAD, dead).healthy


def test_vllm_healthy_but_serving_another_model_is_unhealthy():
    other = VllmStatus(health=True, models=("other",))
    assert not cluster(HEAD, WORKER, vllm=other).healthy


def test_the_json_document_has_a_schema_version_and_health_per_node():
    document = cluster(HEAD, WORKER).to_dict()
    assert document["schema_version"] == 1
    assert document["healthy"] is True
    assert [n["healthy"] for n in document["nodes"]] == [True, True]
    assert list(document["vllm"]["models"]) == ["tiny-llama"]


def test_restarts_show_per_node_with_the_last_cause_and_a_waiting_vllm_says_why():
    healed = replace(HEAD, vllm_restarts=1, vllm_state="running",
                     vllm_last_exit="vllm serve killed by SIGKILL")  # fmt: skip
    waiting = replace(WORKER, vllm_process=False, vllm_restarts=3, vllm_state="backoff",
                      vllm_last_exit="a peer rank went away (172.30.0.11 closed its connection)")  # fmt: skip
    parts = status_view(cluster(healed, waiting))
    console = Console(width=200, record=True)
    for part in parts:
        console.print(part)
    text = console.export_text()
    assert "node-1: vLLM restarted 1 time(s), last because vllm serve killed by SIGKILL" in text
    assert "NO (backoff)" in text
    document = cluster(healed, waiting).to_dict()
    assert document["nodes"][1]["vllm_restarts"] == 3
    assert document["nodes"][1]["vllm_state"] == "backoff"
    assert not cluster(healed, waiting).healthy


def test_without_ray_the_ray_parts_read_not_applicable_and_do_not_make_it_unhealthy():
    head, worker = replace(HEAD, ray_alive=None), replace(WORKER, ray_alive=None)
    no_ray = replace(cluster(head, worker, alive=0), ray_cluster=False, ray_resources={})
    assert no_ray.healthy
    console = Console(width=200, record=True)
    for part in status_view(no_ray):
        console.print(part)
    text = console.export_text()
    assert "ray: not applicable (no Ray cluster: vLLM's own multi-node mode)" in text
    assert not replace(no_ray, nodes=(head, replace(worker, vllm_process=False))).healthy
    document = no_ray.to_dict()
    assert document["ray_cluster"] is False and document["nodes"][0]["ray_alive"] is None


def test_the_image_facts_show_in_the_table_and_in_json():
    text = (REPO / "tests" / "fixtures" / "image-facts" / "vllm-cpu-0.32.0.txt").read_text()
    facts = parse_image_probe(text, "sha256:" + "ab" * 32, ("vllm", "serve"))
    status = replace(cluster(HEAD, WORKER), image=facts)
    lines = [p for p in status_view(status) if isinstance(p, str)]
    assert "image: Python 3.11.2, vLLM 0.32.0+cpu, torch 2.13.0+cpu, Ray 2.60.0" in lines
    image = status.to_dict()["image"]
    assert (
        image["ray"] == "2.60.0" and image["has_ray"] and image["entrypoint"] == ["vllm", "serve"]
    )
    assert "packages" not in image  # hundreds of lines that `status --json` readers do not need
