"""The cluster's health as Prometheus metrics: a pure function from a `ClusterStatus`.

Labels: `cluster` everywhere, `node` on node metrics, `gpu` (index) and `model` on GPU metrics.
A node that could not be reached has `vcluster_node_up 0` and no GPU samples.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.core import GaugeMetricFamily, Metric

from cluster.report.status import ClusterStatus

MIB = 1 << 20


def _gauge(name: str, documentation: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, labels=labels)


def cluster_metrics(
    status: ClusterStatus, refreshed_at: float, refresh_seconds: float
) -> list[Metric]:
    """Every metric of one status snapshot."""
    cluster = status.cluster
    node_labels = ["cluster", "node"]
    up = _gauge("vcluster_node_up", "1 when the node answered over SSH", node_labels)
    running = _gauge(
        "vcluster_node_container_running", "1 when the node's container runs", node_labels
    )
    ray_alive = _gauge("vcluster_node_ray_alive", "1 when Ray reports the node alive", node_labels)
    healthy = _gauge("vcluster_node_healthy", "1 when the node is healthy", node_labels)
    restarts = _gauge(
        "vcluster_node_vllm_restarts",
        "Times the node's supervisor restarted vLLM since its container was made",
        node_labels,
    )
    last_exit = _gauge(
        "vcluster_node_vllm_last_exit_info",
        "Why vLLM last stopped on its own on the node (the cause label); always 1",
        [*node_labels, "cause"],
    )
    for node in status.nodes:
        labels = [cluster, node.name]
        up.add_metric(labels, float(node.reachable))
        running.add_metric(labels, float(node.container == "running"))
        if node.ray_alive is not None:  # None: the cluster runs no Ray
            ray_alive.add_metric(labels, float(node.ray_alive))
        healthy.add_metric(labels, float(node.healthy))
        if node.vllm_restarts is not None:
            restarts.add_metric(labels, float(node.vllm_restarts))
        if node.vllm_last_exit:
            last_exit.add_metric([*labels, node.vllm_last_exit], 1.0)
    families: list[Metric] = [up, running, ray_alive, healthy, restarts, last_exit]
    families += _gpu_metrics(status)

    ray = _gauge("vcluster_ray_nodes_alive", "Nodes alive in Ray", ["cluster"])
    ray.add_metric([cluster], float(status.ray_nodes_alive))
    expected = _gauge("vcluster_ray_nodes_expected", "Nodes in the inventory", ["cluster"])
    expected.add_metric([cluster], float(status.ray_nodes_expected))
    vllm_up = _gauge("vcluster_vllm_up", "1 when vLLM answers /health", ["cluster"])
    vllm_up.add_metric([cluster], float(status.vllm.health))
    families += [ray, expected, vllm_up] if status.ray_cluster else [vllm_up]
    families += _collective_metrics(status)
    families += _model_metrics(status)
    for name, value, documentation in (
        ("vcluster_vllm_requests_running", status.vllm.requests_running, "Requests running"),
        ("vcluster_vllm_requests_waiting", status.vllm.requests_waiting, "Requests waiting"),
        (
            "vcluster_vllm_kv_cache_usage_ratio",
            status.vllm.kv_cache_usage,
            "KV cache in use (0..1)",
        ),
    ):
        if value is not None:
            family = _gauge(name, documentation, ["cluster"])
            family.add_metric([cluster], value)
            families.append(family)
    cluster_healthy = _gauge(
        "vcluster_cluster_healthy", "1 when the cluster is healthy", ["cluster"]
    )
    cluster_healthy.add_metric([cluster], float(status.healthy))
    refreshed = _gauge(
        "vcluster_last_refresh_timestamp_seconds", "When this snapshot was taken", ["cluster"]
    )
    refreshed.add_metric([cluster], refreshed_at)
    duration = _gauge(
        "vcluster_refresh_duration_seconds", "How long taking the snapshot took", ["cluster"]
    )
    duration.add_metric([cluster], refresh_seconds)
    return [*families, cluster_healthy, refreshed, duration]


def _gpu_metrics(status: ClusterStatus) -> Iterable[Metric]:
    labels = ["cluster", "node", "gpu", "model"]
    specs = [
        ("vcluster_gpu_utilization_percent", "GPU utilisation", lambda g: g.utilization_pct),
        (
            "vcluster_gpu_memory_used_bytes",
            "GPU memory in use",
            lambda g: None if g.memory_used_mib is None else g.memory_used_mib * MIB,
        ),
        (
            "vcluster_gpu_memory_total_bytes",
            "GPU memory",
            lambda g: None if g.memory_total_mib is None else g.memory_total_mib * MIB,
        ),
        ("vcluster_gpu_temperature_celsius", "GPU temperature", lambda g: g.temperature_c),
        ("vcluster_gpu_power_watts", "GPU power draw", lambda g: g.power_draw_w),
        (
            "vcluster_gpu_ecc_uncorrected_errors",
            "Uncorrected ECC errors (volatile)",
            lambda g: g.ecc_uncorrected,
        ),
        (
            "vcluster_gpu_ecc_corrected_errors",
            "Corrected ECC errors (volatile)",
            lambda g: g.ecc_corrected,
        ),
    ]
    for name, documentation, read in specs:
        family = _gauge(name, documentation, labels)
        for node in status.nodes:
            for gpu in node.gpus:
                value = read(gpu)
                if value is not None:
                    family.add_metric(
                        [status.cluster, node.name, str(gpu.index), gpu.name or ""], float(value)
                    )
        yield family


MODEL_STATES = ("unloaded", "loading", "loaded", "failed", "unloading", "sleeping", "waking")


def _model_metrics(status: ClusterStatus) -> list[Metric]:
    """With several models: each model's state, activations, start time and requests."""
    if not status.models:
        return []
    labels = ["cluster", "model"]
    state = _gauge("vcluster_model_state", "1 for the model's current state", [*labels, "state"])
    activations = _gauge(
        "vcluster_model_activations", "Times the router loaded the model since it started", labels
    )
    start = _gauge(
        "vcluster_model_last_activation_seconds", "How long the model's last load took", labels
    )
    requests = _gauge("vcluster_model_requests", "Requests routed to the model", labels)
    in_flight = _gauge("vcluster_model_requests_in_flight", "Requests in flight now", labels)
    wakes = _gauge(
        "vcluster_model_wakes",
        "Times the router woke the model from sleep since it started",
        labels,
    )
    wake = _gauge("vcluster_model_last_wake_seconds", "How long the model's last wake took", labels)
    for model in status.models:
        names = [status.cluster, model.name]
        for name in MODEL_STATES:
            state.add_metric([*names, name], float(model.state == name))
        activations.add_metric(names, float(model.activations))
        if model.last_activation_s is not None:
            start.add_metric(names, model.last_activation_s)
        requests.add_metric(names, float(model.requests))
        in_flight.add_metric(names, float(model.in_flight))
        wakes.add_metric(names, float(model.wakes))
        if model.last_wake_s is not None:
            wake.add_metric(names, model.last_wake_s)
    return [state, activations, start, requests, in_flight, wakes, wake]


def _collective_metrics(status: ClusterStatus) -> list[Metric]:
    """The last collective check's bus bandwidth per group (at its largest size) and verdict."""
    last = status.collective
    if not last:
        return []
    cluster = status.cluster
    busbw = _gauge(
        "vcluster_collective_busbw_bytes_per_second",
        "All-reduce bus bandwidth of the last collective check, at its largest size",
        ["cluster", "scope", "group", "node"],
    )
    for group in last.get("groups") or []:
        try:
            labels = [cluster, str(group["scope"]), str(group["group"]), str(group["node"])]
            busbw.add_metric(labels, float(group["busbw"]))
        except (KeyError, TypeError, ValueError):
            continue  # a hand-edited or damaged file: the other groups still count
    ok = _gauge(
        "vcluster_collective_ok", "1 when the last collective check had no FAIL", ["cluster"]
    )
    ok.add_metric([cluster], float(bool(last.get("ok"))))
    finished = _gauge(
        "vcluster_collective_finished_timestamp_seconds",
        "When the last collective check finished (Unix time)",
        ["cluster"],
    )
    try:
        finished.add_metric([cluster], float(last.get("finished_at", 0.0)))
    except (TypeError, ValueError):
        finished.add_metric([cluster], 0.0)
    return [busbw, ok, finished]
