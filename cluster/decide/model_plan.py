"""The models' side of the plan (pure): each node's devices, each model's parallelism and argv,
and the `ServingConfig` the router and agents run on when the cluster serves several models.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import PurePosixPath

from cluster.decide.inventory import Inventory, Model
from cluster.decide.traps import ModelShape, TrapFacts, choose_mitigations, mitigated_argv
from cluster.errors import VclusterError
from cluster.remote.serving.bundle import BUNDLE_NAME
from cluster.remote.serving.catalog import (
    DEFAULT_SLEEPERS_PER_DEVICE,
    ModelEntry,
    NodeDevices,
    ServingConfig,
)
from cluster.remote.serving.placement import place, sleepers_per_device

SERVING_CONFIG_NAME = "serving.json"
MODEL_LOG_DIR = "/var/log/vcluster-models"
SLEEPERS_HOST_MEMORY_SHARE = 0.5
"""The share of a node's available host memory that the weights of level-1 sleepers may take
together, by default (the rest stays for the page cache, the ranks and the containers)."""
LEVEL_1_HOST_MEMORY_PER_WEIGHT = 1.85
"""Host memory a level-1 sleeper adds per byte of its weights: measured +6788 MiB of resident
memory for 3679 MiB of weights (vLLM 0.26.0 on an H200, tests/fixtures/sleep/)."""


class ModelPlanError(VclusterError):
    """A model cannot be planned on these nodes."""


def node_devices(inventory: Inventory, gpu_counts: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
    """The devices vcluster may use on each node: `gpu_ids`, or every GPU found (one slot on
    a CPU node). A `gpu_ids` entry the node does not have is an error naming it."""
    devices: dict[str, tuple[int, ...]] = {}
    problems = []
    for node in inventory.nodes:
        name = node.node_name
        if inventory.accelerator == "cpu":
            devices[name] = tuple(node.gpu_ids or (0,))
            continue
        found = gpu_counts[name]
        if node.gpu_ids is None:
            devices[name] = tuple(range(found))
            continue
        absent = [i for i in node.gpu_ids if i >= found]
        if absent:
            problems.append(f"{name} has no GPU {', '.join(map(str, absent))} (it has {found})")
        devices[name] = tuple(sorted(node.gpu_ids))
    if problems:
        raise ModelPlanError(
            "gpu_ids name GPUs that are not there: " + "; ".join(problems),
            fix="list indices that `nvidia-smi -L` shows on that node",
        )
    return devices


def model_parallelism(
    inventory: Inventory, model: Model, devices: Mapping[str, tuple[int, ...]]
) -> tuple[int, int]:
    """(TP, PP) of a model on several-model clusters: as given, else the whole cluster."""
    per_node = min(len(d) for d in devices.values())
    default_tp = 1 if inventory.accelerator == "cpu" else per_node
    tensor = default_tp if model.tensor_parallel == "auto" else model.tensor_parallel
    pipeline = len(devices) if model.pipeline_parallel == "auto" else model.pipeline_parallel
    return tensor, pipeline


def sleep_levels(
    inventory: Inventory,
    devices: Mapping[str, tuple[int, ...]],
    weights_bytes: Mapping[str, int] | None = None,
    host_available_bytes: Mapping[str, int] | None = None,
) -> dict[str, int | None]:
    """Each model's sleep level (None: stopped when it gives way), by served name.

    As the inventory says, else: none on the CPU platform (vLLM has no sleep mode there) and
    for a model kept loaded; level 1 while what every level-1 model holds asleep (its weights
    x `LEVEL_1_HOST_MEMORY_PER_WEIGHT`) fits in the share `SLEEPERS_HOST_MEMORY_SHARE` of the
    smallest node's available host memory (each node holds 1/PP of a model's weights, and any
    node may hold a rank), else level 2.
    An unknown size (no facts) means level 2: it needs no host memory.
    """
    weights = weights_bytes or {}
    available = host_available_bytes or {}
    budget = min(available.values()) * SLEEPERS_HOST_MEMORY_SHARE if available else 0.0
    per_node = {
        m.served: weights[m.served]
        * LEVEL_1_HOST_MEMORY_PER_WEIGHT
        / model_parallelism(inventory, m, devices)[1]
        for m in inventory.model_list
        if m.served in weights
    }
    held = sum(per_node.get(m.served, 0.0) for m in inventory.model_list if m.sleep == 1)
    levels: dict[str, int | None] = {}
    for model in inventory.model_list:
        if model.sleep == "off" or inventory.keeps_loaded(model):
            levels[model.served] = None
        elif model.sleep in (1, 2):
            levels[model.served] = int(model.sleep)
        elif inventory.accelerator == "cpu":
            levels[model.served] = None
        elif model.served in per_node and held + per_node[model.served] <= budget:
            held += per_node[model.served]
            levels[model.served] = 1
        else:
            levels[model.served] = 2
    return levels


def serving_config(
    inventory: Inventory,
    addresses: Mapping[str, str],
    devices: Mapping[str, tuple[int, ...]],
    state_dir: str,
    traps: TrapFacts | None = None,
    *,
    weights_bytes: Mapping[str, int] | None = None,
    host_available_bytes: Mapping[str, int] | None = None,
    gpu_memory_gib: Mapping[str, float] | None = None,
) -> ServingConfig:
    """What the router and agents run on; an error for a model that can never load.
    `traps`: the facts vLLM's known traps are judged on (cluster/decide/traps.py).
    `weights_bytes` (by served name), `host_available_bytes` and `gpu_memory_gib` (by node):
    what each model's sleep level and each GPU's room for sleepers are decided on."""
    nodes = _serving_nodes(inventory, addresses, devices, gpu_memory_gib)
    free = {n.name: list(n.devices) for n in nodes}
    levels = sleep_levels(inventory, devices, weights_bytes, host_available_bytes)
    models = []
    for index, model in enumerate(inventory.model_list):
        tensor, pipeline = model_parallelism(inventory, model, devices)
        if place(nodes, free, tensor, pipeline) is None:
            layout = ", ".join(f"{n.name}: {len(n.devices)}" for n in nodes)
            raise ModelPlanError(
                f"model {model.served!r} needs {pipeline} node(s) with {tensor} device(s) each; "
                f"the nodes give {layout}: it can never load",
                fix="lower its tensor_parallel or pipeline_parallel, or give the nodes more GPUs",
            )
        models.append(
            ModelEntry(
                served=model.served,
                argv=tuple(model_argv(inventory, model, tensor, pipeline, traps)),
                tensor_parallel=tensor,
                pipeline_parallel=pipeline,
                keep_loaded=inventory.keeps_loaded(model),
                unload_after_s=model.unload_after_s,
                api_port=inventory.ports.models + 2 * index,
                master_port=inventory.ports.models + 2 * index + 1,
                sleep=levels[model.served],
            )
        )
    return _serving_config(inventory, tuple(models), nodes, state_dir)


def front_config(
    inventory: Inventory,
    addresses: Mapping[str, str],
    devices: Mapping[str, tuple[int, ...]],
    state_dir: str,
    parallelism: tuple[int, int],
) -> ServingConfig:
    """What the router in front of a one-model cluster's vLLM runs on: the model, `external`
    (run by the head container's supervisor on loopback, at `ports.models`)."""
    nodes = _serving_nodes(inventory, addresses, devices)
    model = inventory.primary_model
    entry = ModelEntry(
        served=model.served,
        argv=(),
        tensor_parallel=parallelism[0],
        pipeline_parallel=parallelism[1],
        keep_loaded=True,
        unload_after_s=None,
        api_port=inventory.ports.models,
        master_port=inventory.ports.master,
        external=True,
    )
    return _serving_config(inventory, (entry,), nodes, state_dir)


def _serving_config(
    inventory: Inventory,
    models: tuple[ModelEntry, ...],
    nodes: tuple[NodeDevices, ...],
    state_dir: str,
) -> ServingConfig:
    return ServingConfig(
        cluster=inventory.cluster,
        accelerator=inventory.accelerator,
        models=models,
        nodes=nodes,
        port=inventory.ports.vllm,
        agent_port=inventory.ports.agent,
        request_wait_s=inventory.router.request_wait_s,
        start_timeout_s=inventory.router.start_timeout_s,
        state_dir=state_dir,
        log_dir=MODEL_LOG_DIR,
    )


def _serving_nodes(
    inventory: Inventory,
    addresses: Mapping[str, str],
    devices: Mapping[str, tuple[int, ...]],
    gpu_memory_gib: Mapping[str, float] | None = None,
) -> tuple[NodeDevices, ...]:
    head = inventory.head.node_name
    memory = gpu_memory_gib or {}

    def sleepers(name: str) -> int:
        if name not in memory:
            return DEFAULT_SLEEPERS_PER_DEVICE
        return sleepers_per_device(memory[name])

    return tuple(
        NodeDevices(
            n.node_name,
            addresses[n.node_name],
            devices[n.node_name],
            n.node_name == head,
            sleepers(n.node_name),
        )
        for n in inventory.head_first
    )


def model_argv(
    inventory: Inventory,
    model: Model,
    tensor: int,
    pipeline: int,
    traps: TrapFacts | None = None,
) -> list[str]:
    """`vllm serve` for a model, without what depends on its placement (the agent adds it),
    with the mitigations of the known traps that apply to it (given `traps`)."""
    argv = [
        "vllm",
        "serve",
        inventory.container_model_path(model),
        "--served-model-name",
        model.served,
        "--tensor-parallel-size",
        str(tensor),
        "--pipeline-parallel-size",
        str(pipeline),
        "--distributed-executor-backend",
        "mp",
        *model.args,
    ]
    if traps is None:
        return argv
    shape = ModelShape(tensor, tuple(model.args), model.served)
    return mitigated_argv(argv, choose_mitigations(traps, shape))


def serving_argv(state_dir: str, role: str, node: str) -> list[str]:
    """The router's (head) or agent's command line in a node's container."""
    directory = PurePosixPath(state_dir)
    return [
        "python3",
        str(directory / BUNDLE_NAME),
        role,
        str(directory / SERVING_CONFIG_NAME),
        node,
    ]
