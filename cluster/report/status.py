"""One health snapshot of the cluster: SSH, containers, Ray and vLLM, gathered in parallel.

`gather_status` costs about one round trip per host (all hosts at once) plus the Ray and vLLM
queries on the head; `ClusterStatus` is its JSON and decides health (`cluster/cli/tables.py`
renders it for people).
"""

from __future__ import annotations

import dataclasses
import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import docker

from cluster.decide.inventory import Inventory
from cluster.decide.manifest import Item, SourceError, model_items, models_with_source
from cluster.decide.plan import container_name
from cluster.errors import VclusterError
from cluster.facts.gpu import GpuInfo
from cluster.facts.host import HostFacts
from cluster.facts.image import ImageFacts
from cluster.nodes.containers import ContainerState
from cluster.nodes.image_cache import image_facts_cache
from cluster.nodes.model_admin import models_report
from cluster.nodes.router_client import ModelStatus
from cluster.nodes.session import Session
from cluster.nodes.status_head import head_ray_view
from cluster.nodes.status_snapshot import node_snapshot
from cluster.nodes.transfer import ChainNode, chain_nodes, check_node
from cluster.nodes.transport.ssh import SshConnection
from cluster.nodes.vllm import (
    ServingMetrics,
    SupervisedVllm,
    http_get,
    parse_serving_metrics,
    served_models,
)
from cluster.report.collective_store import load_last_run

STATUS_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class NodeStatus:
    name: str
    address: str
    role: str
    reachable: bool
    error: str | None = None
    container: str | None = None  # docker's state, or None when there is no container
    started_at: str | None = None
    image_id: str | None = None
    ray_alive: bool | None = False
    """None where the cluster runs no Ray: not applicable, not a failure."""
    vllm_process: bool | None = None  # None where no vLLM process belongs
    vllm_state: str | None = None  # the supervisor's: running, backoff, stopped, waiting for X
    vllm_restarts: int | None = None  # restarts by the supervisor since the container was made
    vllm_last_exit: str | None = None  # why vLLM last stopped on its own
    gpus: tuple[GpuInfo, ...] = ()
    gpu_problem: str | None = None
    model_files: dict[str, str] = field(default_factory=dict)
    """With models that have a `source`: `3/3 verified` (or what lacks) per model."""

    @property
    def healthy(self) -> bool:
        return (
            self.reachable
            and self.container == "running"
            and self.ray_alive is not False
            and self.vllm_process is not False
            and self.gpu_problem is None
        )


@dataclass(frozen=True)
class VllmStatus:
    health: bool = False
    models: tuple[str, ...] = ()
    requests_running: float | None = None
    requests_waiting: float | None = None
    kv_cache_usage: float | None = None
    error: str | None = None


@dataclass(frozen=True)
class ClusterStatus:
    cluster: str
    endpoint: str
    served_model_name: str
    accelerator: str
    nodes: tuple[NodeStatus, ...]
    ray_nodes_alive: int
    ray_nodes_expected: int
    ray_resources: dict[str, float] = field(default_factory=dict)
    ray_error: str | None = None
    vllm: VllmStatus = VllmStatus()
    ray_cluster: bool = True
    """False when the cluster runs vLLM's own multi-node mode without Ray."""
    image: ImageFacts | None = None
    """What the head's image holds, when the controller has probed it (`up` does)."""
    collective: dict | None = None
    """The last collective check's figures on this controller (`finished_at`, `ok`, `groups`)."""
    models: tuple[ModelStatus, ...] = ()
    """With several models: each as the router reports it."""
    models_error: str | None = None

    @property
    def healthy(self) -> bool:
        return (
            all(n.healthy for n in self.nodes)
            and (not self.ray_cluster or self.ray_nodes_alive == self.ray_nodes_expected)
            and self.vllm.health
            and self.served_model_name in self.vllm.models
            and all(m.state == "loaded" for m in self.models if m.keep_loaded)
            and self.models_error is None
        )

    def to_dict(self) -> dict:
        """The `status --json` document (schema in docs/status.md)."""
        data = asdict(self)
        data["image"] = self.image.to_dict() if self.image else None
        data["schema_version"] = STATUS_SCHEMA_VERSION
        data["healthy"] = self.healthy
        for node_data, node in zip(data["nodes"], self.nodes, strict=True):
            node_data["healthy"] = node.healthy
        return data


def gather_status(
    inventory: Inventory, session: Session, *, docker_host: str | None = None
) -> ClusterStatus:
    """Query every node at once (one exec each) while the head answers for Ray and vLLM.

    `docker_host`: the engine the nodes' `docker` CLI talks to, where not the default (the SSH
    lab's hosts share this machine's daemon).
    """
    session.open()
    name = container_name(inventory.cluster)
    head_name = inventory.head.node_name
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="status") as pool:
        ray_job = pool.submit(_ray_view, inventory, session, name, docker_host)
        vllm_job = pool.submit(_vllm_view, inventory, session)
        models_job = pool.submit(_models_view, inventory, session)
        files_job = pool.submit(_model_files_view, inventory, session)
        states = session.on_each(
            lambda node: _node_state(session, inventory, node, name, node == head_name, docker_host)
        )
        head_state = states.succeeded.get(head_name, (None, None, None, False))[0]
        ray_cluster = head_state is None or head_state.ray
        ray_view = ray_job.result()
    ray_alive, resources, ray_error = ray_view if ray_cluster else (set(), {}, None)
    nodes = []
    for node in inventory.nodes:
        node_name = node.node_name
        role = "head" if node is inventory.head else "worker"
        if node_name in session.failed:
            error = session.failed[node_name].one_line()
            nodes.append(NodeStatus(node_name, node.address, role, False, error=error))
            continue
        outcome = states[node_name]
        if outcome.error is not None:
            nodes.append(
                NodeStatus(node_name, node.address, role, True, error=outcome.error.one_line())
            )
            continue
        state, supervised, facts, serves = outcome.value  # type: ignore[misc]
        nodes.append(
            NodeStatus(
                node_name,
                node.address,
                role,
                True,
                container=state.status if state else None,
                started_at=state.started_at if state else None,
                image_id=state.image_id if state else None,
                ray_alive=node.address in ray_alive if ray_cluster else None,
                vllm_process=bool(supervised and supervised.running) if serves else None,
                vllm_state=supervised.state if supervised else None,
                vllm_restarts=supervised.restarts if supervised else None,
                vllm_last_exit=supervised.last_exit_cause if supervised else None,
                gpus=facts.gpu.gpus,
                gpu_problem=(
                    facts.gpu.problem.detail
                    if facts.gpu.problem and inventory.accelerator == "nvidia"
                    else None
                ),
            )
        )
    served = inventory.primary_model.served
    head_address = inventory.head.address
    models, models_error = models_job.result()
    files = files_job.result()
    nodes = [dataclasses.replace(n, model_files=files.get(n.name, {})) for n in nodes]
    return ClusterStatus(
        cluster=inventory.cluster,
        endpoint=f"http://{head_address}:{inventory.ports.vllm}/v1",
        served_model_name=served,
        accelerator=inventory.accelerator,
        nodes=tuple(nodes),
        ray_nodes_alive=sum(1 for n in inventory.nodes if n.address in ray_alive),
        ray_nodes_expected=len(inventory.nodes),
        ray_resources=resources,
        ray_error=ray_error,
        vllm=vllm_job.result(),
        ray_cluster=ray_cluster,
        image=image_facts_cache().get(head_state.image_id) if head_state else None,
        collective=load_last_run(inventory.cluster),
        models=models,
        models_error=models_error,
    )


def _model_files_view(inventory: Inventory, session: Session) -> dict[str, dict[str, str]]:
    """Per node and model with a `source`: how many of its files a stamp vouches for (no file
    is read: `check` verifies, `models pull` repairs)."""
    views: dict[str, dict[str, str]] = {}
    models = models_with_source(inventory)
    if not models:
        return views
    chain = {n.name: n for n in chain_nodes(inventory, session, reachable_only=True)}
    for model in models:
        assert model.source is not None
        try:
            items = model_items(Path(model.source).expanduser(), model.name, inventory.model_cache)
        except SourceError as error:
            for name in chain:
                views.setdefault(name, {})[model.served] = f"source unreadable: {error.message}"
            continue
        files = [i for i in items if i.kind == "file"]
        found = session.on_each(functools.partial(_stamped, chain=chain, items=items), list(chain))
        for name, states in found.succeeded.items():
            good = sum(1 for i in files if states.get(i.path) == "ok")
            views.setdefault(name, {})[model.served] = f"{good}/{len(files)} verified"
    return views


def _stamped(name: str, *, chain: dict[str, ChainNode], items: list[Item]) -> dict[str, str]:
    return check_node(chain[name], items, rehash=False)[0]


def _models_view(
    inventory: Inventory, session: Session
) -> tuple[tuple[ModelStatus, ...], str | None]:
    if not inventory.routed:
        return (), None
    try:
        return models_report(inventory, session), None
    except (VclusterError, KeyError, docker.errors.DockerException) as exc:
        return (), str(exc)


def _node_state(
    session: Session,
    inventory: Inventory,
    node: str,
    name: str,
    is_head: bool,
    docker_host: str | None,
) -> tuple[ContainerState | None, SupervisedVllm | None, HostFacts, bool]:
    """The node's container, its supervisor's report and its facts, and whether vLLM runs
    there (on every node with vLLM's own executor, on the head alone with Ray's)."""
    snapshot = node_snapshot(
        session.ssh(node),
        name,
        head=is_head,
        default_executor=inventory.default_executor,
        docker_host=docker_host,
    )
    state = snapshot.state
    executor = (state.executor if state else None) or inventory.default_executor
    serves = is_head or executor == "mp"
    supervised = snapshot.supervised if serves and state is not None and state.running else None
    return state, supervised, snapshot.facts, serves


def _ray_view(
    inventory: Inventory, session: Session, name: str, docker_host: str | None
) -> tuple[set[str], dict[str, float], str | None]:
    head = inventory.head
    if head.node_name not in session.connections:
        return set(), {}, "head unreachable"
    ssh = session.ssh(head.node_name)
    try:
        return head_ray_view(ssh, name, head.address, inventory.ports.ray, docker_host)
    except VclusterError as error:  # the query ran past the command time limit
        return set(), {}, error.one_line()


def _vllm_view(inventory: Inventory, session: Session) -> VllmStatus:
    head = inventory.head
    if head.node_name not in session.connections:
        return VllmStatus(error="head unreachable")
    ssh = session.ssh(head.node_name)
    port = inventory.ports.vllm
    key_ref = inventory.secrets.api_key
    key = key_ref.resolve() if key_ref is not None else None
    try:
        health = http_get(ssh, head.address, port, "/health")
        models = http_get(ssh, head.address, port, "/v1/models", api_key=key)
    except OSError as exc:
        return VllmStatus(error=str(exc))
    load = None if inventory.routed else _vllm_load(ssh, inventory.ports.models)
    return VllmStatus(
        health=health.status == 200,
        models=tuple(served_models(models.body)) if models.status == 200 else (),
        requests_running=load.requests_running if load else None,
        requests_waiting=load.requests_waiting if load else None,
        kv_cache_usage=load.kv_cache_usage if load else None,
        error=None if models.status == 200 else f"/v1/models answered {models.status}",
    )


def _vllm_load(ssh: SshConnection, port: int) -> ServingMetrics | None:
    """The one model's load, from its vLLM on the head's loopback (behind the router)."""
    try:
        metrics = http_get(ssh, "127.0.0.1", port, "/metrics")
    except OSError:
        return None
    return parse_serving_metrics(metrics.body) if metrics.status == 200 else None
