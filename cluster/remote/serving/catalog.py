"""What the router and the agents are told by `vcluster up`: the models, the nodes, the ports.

`up` writes it as JSON into every node's container. Nothing in it is secret: the tokens and the
users' key are files of the state folder's `secrets/` (`read_secret`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

AGENT_TOKEN_ENV = "VCLUSTER_AGENT_TOKEN"  # noqa: S105 (a variable name)
"""Where an agent puts the cluster's internal token for its ranks' processes (never in the
container's environment): the models' own API servers take it as key."""
ROUTER_SOCKET = "router.sock"
"""In the state folder: the router's API without a key, for `vcluster models` (docker exec)."""
API_KEY_ENV = "VLLM_API_KEY"
"""The variable vLLM reads its API key from: a model rank gets the agent token in it."""
SECRETS_DIR = "secrets"
"""In the state folder: the cluster's secrets, one owner-only file each, written by `up`
through the Docker API, so that none is in the container's environment (`docker inspect`)."""
AGENT_TOKEN_FILE = "agent-token"  # noqa: S105 (a file name)
API_KEY_FILE = "api-key"
RAY_TOKEN_FILE = "ray-token"  # noqa: S105 (a file name)
HF_TOKEN_FILE = "hf-token"  # noqa: S105 (a file name)
DEFAULT_SLEEPERS_PER_DEVICE = 2
"""How many sleeping models a device holds beside its awake one when the plan gives no figure:
`placement.sleepers_per_device` of an 80 GiB GPU at vLLM's default 0.9 memory use and
`placement.SLEEPER_GPU_GIB` a sleeper is 5; 2 leaves room for larger sleepers (TP, graphs)."""


def read_secret(state_dir: str, name: str) -> str | None:
    """A secret file of the container's state folder, or None when there is none (or empty)."""
    try:
        with open(f"{state_dir}/{SECRETS_DIR}/{name}", encoding="utf-8") as handle:
            return handle.read().strip() or None
    except FileNotFoundError:
        return None


@dataclass(frozen=True)
class NodeDevices:
    """A node as the placement sees it: its devices (GPU indices, or CPU slots)."""

    name: str
    address: str
    devices: tuple[int, ...]
    head: bool = False
    sleepers: int = DEFAULT_SLEEPERS_PER_DEVICE
    """How many sleeping models each of its devices holds beside the awake one (their CUDA
    context and buffers stay on the GPU): `placement.sleepers_per_device` of its memory."""

    def visible_index(self, device: int) -> int:
        """The device's index inside the container, which sees only the cluster's GPUs."""
        return sorted(self.devices).index(device)


@dataclass(frozen=True)
class ModelEntry:
    """One model: its `vllm serve` argv without placement, its parallelism and its ports."""

    served: str
    argv: tuple[str, ...]
    tensor_parallel: int
    pipeline_parallel: int
    keep_loaded: bool
    unload_after_s: float | None
    api_port: int
    master_port: int
    external: bool = False
    """Started and healed by the head container's supervisor, on loopback (the one model of a
    cluster that serves one): the router only passes requests to it."""
    sleep: int | None = None
    """vLLM's sleep level (1: weights to host memory, 2: weights dropped) the model is put to
    when it gives way, its ranks started with sleep mode; None: it is stopped instead."""

    @property
    def devices_needed(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel


@dataclass(frozen=True)
class ServingConfig:
    """Everything the router and the agents need; the same on every node."""

    cluster: str
    accelerator: str  # nvidia | cpu
    models: tuple[ModelEntry, ...]
    nodes: tuple[NodeDevices, ...]
    port: int  # the endpoint's
    agent_port: int
    request_wait_s: float
    start_timeout_s: float
    state_dir: str
    log_dir: str

    @property
    def head(self) -> NodeDevices:
        return next(n for n in self.nodes if n.head)

    def model(self, served: str) -> ModelEntry | None:
        return next((m for m in self.models if m.served == served), None)

    def node(self, name: str) -> NodeDevices:
        return next(n for n in self.nodes if n.name == name)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ServingConfig:
        data = json.loads(text)
        return cls(
            **{
                **data,
                "models": tuple(
                    ModelEntry(**{**m, "argv": tuple(m["argv"])}) for m in data["models"]
                ),
                "nodes": tuple(
                    NodeDevices(**{**n, "devices": tuple(n["devices"])}) for n in data["nodes"]
                ),
            }
        )
