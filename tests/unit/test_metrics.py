"""Prometheus metrics of a status snapshot, read back with prometheus_client's own parser."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from cluster.facts.gpu import parse_query_gpu
from cluster.nodes.vllm import parse_serving_metrics
from cluster.report.metrics import cluster_metrics
from cluster.report.status import ClusterStatus, NodeStatus, VllmStatus

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
H200_GPUS, _ = parse_query_gpu(
    (FIXTURES / "gpu" / "h200x8" / "query-gpu-noheader-nounits.csv").read_text()
)


def snapshot(second_node_reachable: bool = True) -> ClusterStatus:
    head = NodeStatus(
        "gpu-a", "10.0.0.11", "head", True, container="running", ray_alive=True,
        vllm_process=True, gpus=tuple(H200_GPUS),
    )  # fmt: skip
    if second_node_reachable:
        worker = NodeStatus(
            "gpu-b", "10.0.0.12", "worker", True, container="running", ray_alive=True,
            gpus=tuple(H200_GPUS),
        )  # fmt: skip
    else:
        worker = NodeStatus("gpu-b", "10.0.0.12", "worker", False, error="connection refused")
    return ClusterStatus(
        cluster="llama70b",
        endpoint="http://10.0.0.11:8000/v1",
        served_model_name="llama-70b",
        accelerator="nvidia",
        nodes=(head, worker),
        ray_nodes_alive=2 if second_node_reachable else 1,
        ray_nodes_expected=2,
        vllm=VllmStatus(
            health=True,
            models=("llama-70b",),
            requests_running=3,
            requests_waiting=1,
            kv_cache_usage=0.25,
        ),
    )


class _Fixed(Collector):
    def __init__(self, status: ClusterStatus) -> None:
        self.status = status

    def collect(self):
        return iter(cluster_metrics(self.status, refreshed_at=1795570000.0, refresh_seconds=1.5))


def scrape(status: ClusterStatus) -> dict[str, list]:
    registry = CollectorRegistry()
    registry.register(_Fixed(status))
    text = generate_latest(registry).decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def test_every_gpu_of_every_node_has_its_samples_labelled_by_cluster_node_and_gpu():
    samples = scrape(snapshot())["vcluster_gpu_memory_total_bytes"]
    assert len(samples) == 16
    first = samples[0]
    assert first.labels == {
        "cluster": "llama70b", "node": "gpu-a", "gpu": "0", "model": "NVIDIA H200",
    }  # fmt: skip
    assert first.value == H200_GPUS[0].memory_total_mib * (1 << 20)


def test_a_node_down_is_marked_down_and_the_others_are_still_served():
    metrics = scrape(snapshot(second_node_reachable=False))
    up = {s.labels["node"]: s.value for s in metrics["vcluster_node_up"]}
    assert up == {"gpu-a": 1.0, "gpu-b": 0.0}
    nodes_with_gpus = {s.labels["node"] for s in metrics["vcluster_gpu_temperature_celsius"]}
    assert nodes_with_gpus == {"gpu-a"}
    assert metrics["vcluster_cluster_healthy"][0].value == 0.0


def test_vllm_serving_figures_are_exported():
    metrics = scrape(snapshot())
    assert metrics["vcluster_vllm_up"][0].value == 1.0
    assert metrics["vcluster_vllm_requests_running"][0].value == 3
    assert metrics["vcluster_vllm_kv_cache_usage_ratio"][0].value == 0.25
    assert metrics["vcluster_ray_nodes_alive"][0].value == 2


def test_vllms_own_metrics_page_is_read_with_the_prometheus_parser():
    # /metrics of vLLM 0.32 (CPU) serving the tiny model on the sandbox, captured with curl
    page = (FIXTURES / "vllm" / "metrics-sandbox.txt").read_text()
    load = parse_serving_metrics(page)
    assert (load.requests_running, load.requests_waiting, load.kv_cache_usage) == (0, 0, 0)


def test_each_nodes_vllm_restarts_and_last_cause_are_exported():
    status = snapshot()
    head = replace(
        status.nodes[0], vllm_restarts=2, vllm_last_exit="VLLM::EngineCore (pid 88) ended"
    )
    metrics = scrape(replace(status, nodes=(head, status.nodes[1])))
    restarts = {s.labels["node"]: s.value for s in metrics["vcluster_node_vllm_restarts"]}
    assert restarts == {"gpu-a": 2.0}  # the worker runs no vLLM process of its own (Ray)
    (cause,) = metrics["vcluster_node_vllm_last_exit_info"]
    assert cause.labels["cause"] == "VLLM::EngineCore (pid 88) ended" and cause.value == 1.0


def test_a_cluster_without_ray_exports_no_ray_gauges():
    status = snapshot()
    nodes = tuple(replace(n, ray_alive=None) for n in status.nodes)
    metrics = scrape(replace(status, nodes=nodes, ray_cluster=False))
    assert "vcluster_ray_nodes_alive" not in metrics
    assert metrics.get("vcluster_node_ray_alive", []) == []
    assert metrics["vcluster_vllm_up"][0].value == 1.0


def test_the_last_collective_checks_bus_bandwidth_is_a_gauge_per_group():
    last = {"finished_at": 1796000000.0, "seconds": 12.0, "ok": True, "groups": [
        {"scope": "intra", "group": "node 0", "node": "gpu-a", "size": 1 << 30,
         "busbw": 323.9e9, "correct": True},
    ]}  # fmt: skip
    metrics = scrape(replace(snapshot(), collective=last))
    [sample] = metrics["vcluster_collective_busbw_bytes_per_second"]
    assert sample.labels == {"cluster": "llama70b", "scope": "intra", "group": "node 0",
                             "node": "gpu-a"}  # fmt: skip
    assert sample.value == 323.9e9
    assert metrics["vcluster_collective_ok"][0].value == 1.0
    assert "vcluster_collective_ok" not in scrape(snapshot())  # never run: no gauge at all
