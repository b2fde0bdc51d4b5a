"""The plan: a pure function from inventory + per-node facts to what runs on every node.

Nothing here touches the network. `vcluster plan` prints a `ClusterPlan`; `vcluster up`
applies it. Secrets stay `SecretRef`s in the plan and are resolved only when applied.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Literal, TypedDict

from cluster import __version__
from cluster.decide.hub import served_offline, token_on_nodes
from cluster.decide.inventory import CONTAINER_CACHE_PATH, Inventory, Node
from cluster.decide.model_plan import (
    ModelPlanError,
    front_config,
    node_devices,
    serving_argv,
    serving_config,
)
from cluster.decide.runtime import Runtime, assumed_runtime
from cluster.decide.secrets import SecretRef
from cluster.decide.state_paths import agent_token_path
from cluster.decide.traps import (
    Mitigation,
    ModelShape,
    TrapFacts,
    choose_mitigations,
    mitigated_argv,
)
from cluster.errors import VclusterError
from cluster.facts.fabric import FabricFacts, RdmaSetup, rdma_setup
from cluster.remote.registry import SUPERVISOR, source
from cluster.remote.serving.catalog import (
    AGENT_TOKEN_FILE,
    API_KEY_FILE,
    HF_TOKEN_FILE,
    RAY_TOKEN_FILE,
    SECRETS_DIR,
    ServingConfig,
)

LABEL_PREFIX = "vcluster"
LABEL_CLUSTER = f"{LABEL_PREFIX}.cluster"
LABEL_NODE = f"{LABEL_PREFIX}.node"
LABEL_ROLE = f"{LABEL_PREFIX}.role"
LABEL_SPEC_HASH = f"{LABEL_PREFIX}.spec-hash"
LABEL_VERSION = f"{LABEL_PREFIX}.version"
LABEL_RAY = f"{LABEL_PREFIX}.ray"
"""`yes` when the containers form a Ray cluster, `no` in vLLM's own multi-node mode without Ray."""
LABEL_EXECUTOR = f"{LABEL_PREFIX}.executor"
"""vLLM's executor: `ray` (vLLM runs on the head only) or `mp` (on every node)."""
VLLM_LOG_PATH = "/var/log/vcluster-vllm.log"
FRONT_LOG_PATH = "/var/log/vcluster-router.log"
SUPERVISOR_STATE_DIR = "/var/lib/vcluster"
"""In the container's own file system: it outlives a restart of the container, not a `down`."""
SECRETS_PATH = f"{SUPERVISOR_STATE_DIR}/{SECRETS_DIR}"
"""The container's secret files (owner-only), written through the Docker API before it starts."""
RESTART_POLICY = "unless-stopped"
"""Docker starts the container again after a crash or a reboot, not after `docker stop`."""

Role = Literal["head", "worker"]


class PlanError(VclusterError):
    """The facts do not allow a plan (e.g. nodes with different GPU counts)."""


@dataclass(frozen=True)
class NodeFacts:
    """What the plan needs to know of a node: gathered by probes, or declared (offline)."""

    address: str  # the address other nodes reach it at: VLLM_HOST_IP, Ray's node IP
    gpu_count: int  # 0 in cpu mode
    gpu_model: str | None = None
    interface: str | None = None  # the interface that routes to the head
    fabric: FabricFacts | None = None
    """NVLink multicast and the HCAs (None: not probed, e.g. an offline plan)."""
    memory_bytes: int | None = None
    """The host's memory (MemTotal): what level-1 sleepers may hold (None: not probed)."""
    gpu_memory_mib: int | None = None
    """The smallest GPU's memory: how many sleepers a GPU holds (None: not probed)."""


@dataclass(frozen=True)
class Ulimit:
    """A resource limit of the container (-1: unlimited)."""

    name: str
    soft: int
    hard: int


MEMLOCK_UNLIMITED = Ulimit("memlock", -1, -1)
"""InfiniBand/RoCE registers (pins) memory: NCCL needs the memlock limit lifted."""


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool = False


@dataclass(frozen=True)
class SupervisorSpec:
    """What the container's first process (cluster/remote/supervisor.py) watches besides vLLM itself."""

    peers: tuple[str, ...]
    """Addresses of the other ranks of vLLM's own multi-node mode: a connection of ours that
    one of them closes means its vLLM went away, and ours restarts to meet it again."""
    wait_for: tuple[str, int] | None
    """An address and port that must answer before vLLM (re)starts here: the head's Ray."""
    serving: tuple[str, int] | None = None
    """The model's endpoint (the head's API port): once it answers, the ranks have met."""
    state_dir: str = SUPERVISOR_STATE_DIR


@dataclass(frozen=True)
class ContainerSpec:
    """One node's long-running container: the supervisor runs Ray (`command`, empty for no
    Ray) and vLLM."""

    name: str
    image: str
    command: tuple[str, ...]
    environment: dict[str, str]
    secret_files: dict[str, SecretRef]
    """Files of `SECRETS_PATH` in the container, by name: never in its environment."""
    labels: dict[str, str]
    mounts: tuple[Mount, ...]
    gpus: Literal["all"] | tuple[int, ...] | None
    """Every GPU, the inventory's `gpu_ids`, or none (CPU)."""
    supervisor: SupervisorSpec
    network_mode: str = "host"
    ipc_mode: str = "host"
    restart_policy: str = RESTART_POLICY
    devices: tuple[str, ...] = ()
    """Host devices passed in: `/dev/infiniband` where NCCL uses InfiniBand/RoCE."""
    ulimits: tuple[Ulimit, ...] = ()
    cap_add: tuple[str, ...] = ()
    """Capabilities added: IPC_LOCK with InfiniBand/RoCE (to pin memory)."""

    @property
    def spec_hash(self) -> str:
        """A digest of everything that defines the container (secrets by reference)."""
        return self.labels[LABEL_SPEC_HASH]


@dataclass(frozen=True)
class ServeSpec:
    """A `vllm serve` process started inside a node's container."""

    argv: tuple[str, ...]
    log_path: str = VLLM_LOG_PATH
    headless: bool = False
    watch_titled: bool = True
    """Restart it when one of its `VLLM::` processes dies: not for the router and agents,
    whose model ranks come and go."""
    front: tuple[str, ...] | None = None
    """The router in front of this vLLM (one model's head): the users' endpoint."""
    front_log_path: str = FRONT_LOG_PATH


@dataclass(frozen=True)
class NodePlan:
    name: str
    role: Role
    host: str  # how the controller reaches it over SSH
    facts: NodeFacts
    container: ContainerSpec
    serve: ServeSpec | None


@dataclass(frozen=True)
class ClusterPlan:
    cluster: str
    executor: Literal["ray", "mp"]
    ray: bool
    """Whether the nodes form a Ray cluster (vLLM's own mode may run without one)."""
    image: str
    runtime_reason: str
    """Why this image, Ray or not, and this executor (from the image's facts)."""
    image_facts: str | None
    accelerator: Literal["nvidia", "cpu"]
    tensor_parallel: int
    pipeline_parallel: int
    model: str
    served_model_name: str
    endpoint: str
    nodes: tuple[NodePlan, ...] = field(default_factory=tuple)
    serving: ServingConfig | None = None
    """With several models (or one on demand): what the router and the agents run on."""
    front: ServingConfig | None = None
    """With one model always loaded: what the router in front of the head's vLLM runs on."""
    mitigations: tuple[Mitigation, ...] = ()
    """vLLM's known traps that apply here, and what the argv got for each (cluster/decide/traps.py)."""

    @property
    def routed(self) -> bool:
        return self.serving is not None

    @property
    def endpoint_port(self) -> int:
        config = self.serving or self.front
        assert config is not None
        return config.port

    @property
    def head(self) -> NodePlan:
        return next(n for n in self.nodes if n.role == "head")

    @property
    def workers(self) -> list[NodePlan]:
        return [n for n in self.nodes if n.role == "worker"]

    def node(self, name: str) -> NodePlan:
        return next(n for n in self.nodes if n.name == name)

    def to_dict(self, *, mask_secrets: bool = True) -> dict:
        """A JSON-ready dict; secret references are shown as `env:NAME` or masked."""

        def render(value: object) -> object:
            if isinstance(value, SecretRef):
                return f"<secret {value}>" if mask_secrets else str(value)
            if isinstance(value, dict):
                return {k: render(v) for k, v in value.items()}
            if isinstance(value, list | tuple):
                return [render(v) for v in value]
            return value

        data = asdict(self)
        for node_data, node in zip(data["nodes"], self.nodes, strict=True):
            node_data["container"]["secret_files"] = node.container.secret_files
        return render(data)  # type: ignore[return-value]


def supervisor_source() -> str:
    """The supervisor's code, which each container runs as `python3 -c SOURCE CONFIG`."""
    return source(SUPERVISOR)


def supervisor_argv(spec: ContainerSpec) -> list[str]:
    """The container's full command line: the supervisor, given Ray's argv and what to watch."""
    config = {
        "ray": list(spec.command) or None,
        "state_dir": spec.supervisor.state_dir,
        "peers": list(spec.supervisor.peers),
        "wait_for": list(spec.supervisor.wait_for) if spec.supervisor.wait_for else None,
        "serving": list(spec.supervisor.serving) if spec.supervisor.serving else None,
    }
    return ["python3", "-c", supervisor_source(), json.dumps(config)]


def container_name(cluster: str) -> str:
    """The one container vcluster runs per host and cluster (run_cluster.sh uses it too)."""
    return f"vcluster-{cluster}"


def build_plan(
    inventory: Inventory,
    facts: dict[str, NodeFacts],
    runtime: Runtime | None = None,
    *,
    weights_bytes: Mapping[str, int] | None = None,
) -> ClusterPlan:
    """Decide every node's container and commands from the inventory, the facts by node name
    and the runtime chosen on the image's facts (taken to have Ray when not given).
    `weights_bytes`: each model's weights by served name, where known (its `source` folder),
    for the models' sleep levels."""
    runtime = runtime or assumed_runtime(inventory)
    missing = [n.node_name for n in inventory.nodes if n.node_name not in facts]
    if missing:
        raise PlanError(f"no facts for node(s) {', '.join(missing)}")
    try:
        devices = node_devices(inventory, {name: f.gpu_count for name, f in facts.items()})
        serving = (
            serving_config(
                inventory,
                {name: f.address for name, f in facts.items()},
                devices,
                SUPERVISOR_STATE_DIR,
                traps=_trap_facts(inventory, facts, runtime),
                weights_bytes=weights_bytes,
                host_available_bytes={
                    name: f.memory_bytes for name, f in facts.items() if f.memory_bytes
                },
                gpu_memory_gib={
                    name: f.gpu_memory_mib / 1024 for name, f in facts.items() if f.gpu_memory_mib
                },
            )
            if inventory.routed
            else None
        )
    except ModelPlanError as exc:
        raise PlanError(exc.message, fix=exc.fix) from None
    front = None
    if serving is None:
        counts = {name: len(ids) for name, ids in devices.items()}
        tensor_parallel, pipeline_parallel = _parallelism(inventory, counts)
        front = front_config(
            inventory,
            {name: f.address for name, f in facts.items()},
            devices,
            SUPERVISOR_STATE_DIR,
            (tensor_parallel, pipeline_parallel),
        )
    else:
        tensor_parallel = serving.models[0].tensor_parallel
        pipeline_parallel = serving.models[0].pipeline_parallel
    mitigations = _mitigations(
        inventory, _trap_facts(inventory, facts, runtime), serving, tensor_parallel
    )
    head = inventory.head
    head_facts = facts[head.node_name]
    nodes = []
    for rank, node in enumerate(inventory.head_first):
        role: Role = "head" if node is head else "worker"
        node_facts = facts[node.node_name]
        container = _container_spec(inventory, runtime, node, role, node_facts, facts, serving)
        if serving is not None:
            serve: ServeSpec | None = _serving_spec(serving, role, node.node_name)
        else:
            serve = _serve_spec(
                inventory,
                runtime.executor,
                role,
                rank,
                head_facts,
                tensor_parallel,
                pipeline_parallel,
                front,
            )
        serve = _mitigated(serve, mitigations)
        nodes.append(NodePlan(node.node_name, role, node.address, node_facts, container, serve))
    return ClusterPlan(
        cluster=inventory.cluster,
        executor=runtime.executor,
        ray=runtime.ray,
        image=runtime.image,
        runtime_reason=runtime.reason,
        image_facts=runtime.facts,
        accelerator=inventory.accelerator,
        tensor_parallel=tensor_parallel,
        pipeline_parallel=pipeline_parallel,
        model=inventory.container_model_path(),
        served_model_name=inventory.primary_model.served,
        endpoint=f"http://{head_facts.address}:{inventory.ports.vllm}/v1",
        nodes=tuple(nodes),
        serving=serving,
        front=front,
        mitigations=mitigations,
    )


def _trap_facts(inventory: Inventory, facts: dict[str, NodeFacts], runtime: Runtime) -> TrapFacts:
    """What the known traps' conditions read: the image's vLLM, multicast per node."""
    return TrapFacts(
        vllm_version=runtime.vllm_version,
        accelerator=inventory.accelerator,
        multicast={
            name: (f.fabric.multicast.verdict, f.fabric.multicast.explain())
            for name, f in facts.items()
            if f.fabric is not None
        },
        nodes=tuple(n.node_name for n in inventory.nodes),
        image_has_ray=runtime.image_has_ray,
        turned_off=inventory.traps_off,
    )


def _mitigations(
    inventory: Inventory, traps: TrapFacts, serving: ServingConfig | None, tensor_parallel: int
) -> tuple[Mitigation, ...]:
    """The traps that apply: to the one model, or to each model of a routed cluster."""
    if serving is None:
        model = ModelShape(tensor_parallel, tuple(inventory.primary_model.args))
        return choose_mitigations(traps, model)
    by_name = {m.served: m for m in inventory.model_list}
    return tuple(
        mitigation
        for entry in serving.models
        for mitigation in choose_mitigations(
            traps,
            ModelShape(entry.tensor_parallel, tuple(by_name[entry.served].args), entry.served),
        )
    )


def _mitigated(serve: ServeSpec | None, mitigations: tuple[Mitigation, ...]) -> ServeSpec | None:
    """The `vllm serve` of a one-model cluster with the mitigations merged into its argv (every
    node's: vLLM's own multi-node mode builds each node's config from its own arguments)."""
    if serve is None or serve.argv[:2] != ("vllm", "serve"):
        return serve
    return replace(serve, argv=tuple(mitigated_argv(serve.argv, mitigations)))


def declared_facts(inventory: Inventory) -> dict[str, NodeFacts]:
    """Facts taken from the inventory alone, for `plan --offline` (no host is contacted)."""
    problems = []
    facts = {}
    for node in inventory.nodes:
        # with gpu_ids only, the node has at least the GPUs they name
        found = node.gpus or (max(node.gpu_ids) + 1 if node.gpu_ids else None)
        if inventory.accelerator == "nvidia" and found is None:
            problems.append(node.node_name)
        gpus = (found or 0) if inventory.accelerator == "nvidia" else 0
        facts[node.node_name] = NodeFacts(
            address=node.address, gpu_count=gpus, interface=inventory.network.interface
        )
    if problems:
        raise PlanError(
            f"an offline plan needs the GPU count of every node; missing on {', '.join(problems)}",
            fix="declare gpus: N on those nodes in the inventory, or plan without --offline",
        )
    return facts


def _parallelism(inventory: Inventory, counts: dict[str, int]) -> tuple[int, int]:
    nodes = len(inventory.nodes)
    model = inventory.primary_model
    if inventory.accelerator == "cpu":
        tensor = 1 if model.tensor_parallel == "auto" else model.tensor_parallel
        pipeline = nodes if model.pipeline_parallel == "auto" else model.pipeline_parallel
        return tensor, pipeline
    if len(set(counts.values())) > 1:
        detail = ", ".join(f"{name}={count}" for name, count in counts.items())
        raise PlanError(
            f"nodes have different GPU counts ({detail}); TP = GPUs per node needs them equal",
            fix="fix or remove the odd node, or set model.tensor_parallel and pipeline_parallel",
        )
    per_node = next(iter(counts.values()))
    if per_node == 0:
        raise PlanError("no GPUs found on the nodes", fix="use accelerator: cpu, or fix the GPUs")
    tensor = per_node if model.tensor_parallel == "auto" else model.tensor_parallel
    pipeline = nodes if model.pipeline_parallel == "auto" else model.pipeline_parallel
    total = per_node * nodes
    if tensor * pipeline != total:
        raise PlanError(
            f"TP x PP = {tensor} x {pipeline} = {tensor * pipeline}, but the cluster has {total} GPUs",
            fix="set model.tensor_parallel and pipeline_parallel so that their product is the GPU count",
        )
    return tensor, pipeline


def _environment(
    inventory: Inventory, facts: NodeFacts, ray: bool, rdma: RdmaSetup | None = None
) -> dict[str, str]:
    # NCCL_IB_HCA / NCCL_IB_GID_INDEX from the facts, unless the inventory's env sets them
    environment = {**(rdma.environment if rdma else {}), **inventory.env}
    if token_on_nodes(inventory):  # only a model that each node downloads needs it there
        environment["HF_TOKEN_PATH"] = f"{SECRETS_PATH}/{HF_TOKEN_FILE}"  # huggingface_hub's
    environment["VLLM_HOST_IP"] = facts.address
    if served_offline(inventory):
        # every hub model is sent into the cache (source: or downloaded once): vLLM reads it there
        environment.setdefault("HF_HUB_OFFLINE", "1")
    if ray:
        # what vLLM's run_cluster.sh sets for multi-NIC hosts, so Ray and vLLM agree on it
        environment["RAY_NODE_IP_ADDRESS"] = facts.address
        # every Ray process, and every Ray client vcluster runs in the container, needs it
        environment["RAY_AUTH_MODE"] = "token"
        environment["RAY_AUTH_TOKEN_PATH"] = f"{SECRETS_PATH}/{RAY_TOKEN_FILE}"
    interface = inventory.network.interface or facts.interface
    if interface:
        environment["GLOO_SOCKET_IFNAME"] = interface
        if inventory.accelerator == "nvidia":
            environment["NCCL_SOCKET_IFNAME"] = interface
    return dict(sorted(environment.items()))


def _secret_files(inventory: Inventory, role: Role, ray: bool) -> dict[str, SecretRef]:
    """The container's secret files: Ray's token, the agents' token, the hub token, and on the
    head the users' API key (the router reads it; vLLM behind the router needs none)."""
    secrets: dict[str, SecretRef] = {RAY_TOKEN_FILE: inventory.ray_token} if ray else {}
    if inventory.routed:
        secrets[AGENT_TOKEN_FILE] = SecretRef("file", str(agent_token_path(inventory.cluster)))
    if token_on_nodes(inventory) and inventory.secrets.hf_token is not None:
        secrets[HF_TOKEN_FILE] = inventory.secrets.hf_token
    if inventory.secrets.api_key is not None and role == "head":
        secrets[API_KEY_FILE] = inventory.secrets.api_key
    return secrets


def _ray_command(
    inventory: Inventory, role: Role, facts: NodeFacts, head: NodeFacts
) -> tuple[str, ...]:
    port = inventory.ports.ray
    if role == "head":
        command = [
            "ray",
            "start",
            "--head",
            f"--port={port}",
            f"--dashboard-host={inventory.ray.dashboard_host}",
        ]
    else:
        command = ["ray", "start", f"--address={head.address}:{port}"]
    command += [
        f"--node-ip-address={facts.address}",
        f"--metrics-export-port={inventory.ports.ray_metrics}",
        "--disable-usage-stats",
        "--block",
    ]
    return tuple(command)


def _supervisor_spec(
    inventory: Inventory,
    runtime: Runtime,
    role: Role,
    facts: NodeFacts,
    all_facts: dict[str, NodeFacts],
) -> SupervisorSpec:
    head = all_facts[inventory.head.node_name]
    if runtime.executor != "mp" or inventory.routed:
        # With several models the router watches each model's ranks, and restarts them.
        # vLLM's Ray executor sees its own workers die; Ray's connections are not ranks.
        return SupervisorSpec(peers=(), wait_for=None)
    others = tuple(f.address for f in all_facts.values() if f.address != facts.address)
    # Without Ray, a worker's vLLM itself waits for the head's rendezvous port.
    wait_for = None if role == "head" or not runtime.ray else (head.address, inventory.ports.ray)
    serving = (head.address, inventory.ports.vllm)
    return SupervisorSpec(peers=others, wait_for=wait_for, serving=serving)


class _ContainerFields(TypedDict):
    """The fields of a `ContainerSpec` that its spec hash covers: all but the labels."""

    name: str
    image: str
    command: tuple[str, ...]
    supervisor: SupervisorSpec
    environment: dict[str, str]
    secret_files: dict[str, SecretRef]
    mounts: tuple[Mount, ...]
    gpus: Literal["all"] | tuple[int, ...] | None


def _container_spec(
    inventory: Inventory,
    runtime: Runtime,
    node: Node,
    role: Role,
    facts: NodeFacts,
    all_facts: dict[str, NodeFacts],
    serving: ServingConfig | None,
) -> ContainerSpec:
    head = all_facts[inventory.head.node_name]
    rdma = _rdma(inventory, facts)
    spec: _ContainerFields = {
        "name": container_name(inventory.cluster),
        "image": runtime.image,
        "command": _ray_command(inventory, role, facts, head) if runtime.ray else (),
        "supervisor": _supervisor_spec(inventory, runtime, role, facts, all_facts),
        "environment": _environment(inventory, facts, runtime.ray, rdma),
        "secret_files": _secret_files(inventory, role, runtime.ray),
        "mounts": (Mount(inventory.model_cache, CONTAINER_CACHE_PATH),),
        "gpus": _gpus(inventory, node),
    }
    digest_input = json.dumps(
        {
            **spec,
            "secret_files": {n: str(r) for n, r in spec["secret_files"].items()},
            "supervisor_code": hashlib.sha256(supervisor_source().encode()).hexdigest(),
            "restart_policy": RESTART_POLICY,
            **_rdma_container_fields(rdma),  # nothing without HCAs: earlier hashes stay
        },
        default=lambda o: asdict(o),
        sort_keys=True,
    )
    labels = {
        LABEL_CLUSTER: inventory.cluster,
        LABEL_NODE: node.node_name,
        LABEL_ROLE: role,
        LABEL_SPEC_HASH: hashlib.sha256(digest_input.encode()).hexdigest()[:16],
        LABEL_VERSION: __version__,
        LABEL_RAY: "yes" if runtime.ray else "no",
        LABEL_EXECUTOR: runtime.executor,
    }
    return ContainerSpec(labels=labels, **spec, **_rdma_container_fields(rdma))


def _rdma(inventory: Inventory, facts: NodeFacts) -> RdmaSetup | None:
    """NCCL over InfiniBand/RoCE between the nodes, when this node has active HCA ports (and
    the cluster has several nodes, and the inventory's env does not turn IB off)."""
    if (
        inventory.accelerator != "nvidia"
        or len(inventory.nodes) < 2
        or facts.fabric is None
        or inventory.env.get("NCCL_IB_DISABLE") == "1"
    ):
        return None
    return rdma_setup(facts.fabric.infiniband, inventory.network.ib_hcas)


class _RdmaFields(TypedDict, total=False):
    devices: tuple[str, ...]
    ulimits: tuple[Ulimit, ...]
    cap_add: tuple[str, ...]


def _rdma_container_fields(rdma: RdmaSetup | None) -> _RdmaFields:
    """The container's devices, memlock limit and IPC_LOCK for InfiniBand/RoCE; none without."""
    if rdma is None:
        return {}
    return {"devices": rdma.devices, "ulimits": (MEMLOCK_UNLIMITED,), "cap_add": ("IPC_LOCK",)}


def _gpus(inventory: Inventory, node: Node) -> Literal["all"] | tuple[int, ...] | None:
    if inventory.accelerator != "nvidia":
        return None
    return tuple(sorted(node.gpu_ids)) if node.gpu_ids is not None else "all"


def _serving_spec(serving: ServingConfig, role: Role, node: str) -> ServeSpec:
    """The router (head) or agent (other nodes) that the node's supervisor keeps running."""
    argv = serving_argv(serving.state_dir, "router" if role == "head" else "agent", node)
    return ServeSpec(argv=tuple(argv), headless=role == "worker", watch_titled=False)


def _serve_spec(
    inventory: Inventory,
    executor: Literal["ray", "mp"],
    role: Role,
    rank: int,
    head: NodeFacts,
    tensor_parallel: int,
    pipeline_parallel: int,
    front: ServingConfig | None,
) -> ServeSpec | None:
    if executor == "ray" and role == "worker":
        return None
    argv = ["vllm", "serve", inventory.container_model_path()]
    argv += ["--tensor-parallel-size", str(tensor_parallel)]
    argv += ["--pipeline-parallel-size", str(pipeline_parallel)]
    argv += ["--distributed-executor-backend", executor]
    if executor == "mp":
        argv += ["--nnodes", str(len(inventory.nodes)), "--node-rank", str(rank)]
        argv += ["--master-addr", head.address, "--master-port", str(inventory.ports.master)]
    if role == "worker":
        argv.append("--headless")
        return ServeSpec(argv=(*argv, *inventory.primary_model.args), headless=True)
    assert front is not None
    # on loopback: the router in front is the users' endpoint (vLLM's key covers only /v1)
    argv += ["--host", "127.0.0.1", "--port", str(front.models[0].api_port)]
    argv += ["--served-model-name", inventory.primary_model.served]
    argv += inventory.primary_model.args
    front_argv = serving_argv(front.state_dir, "front", inventory.head.node_name)
    return ServeSpec(argv=tuple(argv), front=tuple(front_argv))
