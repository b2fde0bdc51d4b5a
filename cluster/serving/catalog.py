"""What the router and the agents are told by `vcluster up`: the models, the nodes, the ports.

`up` writes it as JSON into the head container (router.json) and every node's container
(agent.json). Nothing in it is secret: tokens reach the processes in their environment.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

AGENT_TOKEN_ENV = "VCLUSTER_AGENT_TOKEN"  # noqa: S105 (a variable name)
"""The cluster's internal token: agents require it, the models' own API servers take it as key."""
ROUTER_SOCKET = "router.sock"
"""In the state folder: the router's API without a key, for `vcluster models` (docker exec)."""
API_KEY_ENV = "VLLM_API_KEY"
"""The users' API key, which the router checks (the same variable vLLM itself reads)."""


@dataclass(frozen=True)
class NodeDevices:
    """A node as the placement sees it: its devices (GPU indices, or CPU slots)."""

    name: str
    address: str
    devices: tuple[int, ...]
    head: bool = False

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
