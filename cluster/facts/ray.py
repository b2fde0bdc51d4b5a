"""Ray's view of the cluster: which nodes are alive, with what resources.

The query runs inside the head container (`python3 -c`, Ray's own client API), so it needs
nothing on the controller; its output is JSON, parsed here by a pure function.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

RAY_FIXED_METRICS_PORTS = (44217, 44227)
"""Ray's defaults for the autoscaler's and the dashboard's Prometheus metrics
(AUTOSCALER_METRIC_PORT, DASHBOARD_METRIC_PORT in ray_constants)."""

# Prints one JSON list of Ray's nodes. The address comes in argv[1], never pasted into the code.
# Ray's GCS node table is read without `ray.init` (0.5 s instead of 1.3 s: no driver joins the
# cluster); through Ray's private API, so where that API differs it falls back to `ray.init`.
RAY_NODES_SCRIPT = """\
import json, sys
import ray
try:
    from ray._private.state import GlobalState
    from ray._raylet import GcsClientOptions
    state = GlobalState()
    state._initialize_global_state(GcsClientOptions.create(
        sys.argv[1], None, allow_cluster_id_nil=True, fetch_cluster_id_if_nil=False))
    table = state.node_table
except (ImportError, AttributeError, TypeError):
    ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
    table = ray.nodes
nodes = [
    {"address": n["NodeManagerAddress"], "alive": bool(n["Alive"]),
     "resources": n.get("Resources", {})}
    for n in table()
]
print("VCLUSTER-RAY-NODES " + json.dumps(nodes))
"""
_MARKER = "VCLUSTER-RAY-NODES "


class RayQueryError(ValueError):
    """The output of the Ray query could not be read."""


@dataclass(frozen=True)
class RayNode:
    address: str
    alive: bool
    gpus: float
    cpus: float


def ray_nodes_argv(head_address: str, ray_port: int) -> list[str]:
    """The command, run in the head container, that lists Ray's nodes."""
    return ["python3", "-c", RAY_NODES_SCRIPT, f"{head_address}:{ray_port}"]


def parse_ray_nodes(output: str) -> list[RayNode]:
    """Ray's nodes from the query's output (Ray may print warnings around the marked line)."""
    for line in output.splitlines():
        if line.startswith(_MARKER):
            entries = json.loads(line.removeprefix(_MARKER))
            return [
                RayNode(
                    address=entry["address"],
                    alive=entry["alive"],
                    gpus=float(entry["resources"].get("GPU", 0)),
                    cpus=float(entry["resources"].get("CPU", 0)),
                )
                for entry in entries
            ]
    raise RayQueryError(f"no Ray node list in the output: {output.strip()[-300:]!r}")


def alive_by_address(nodes: list[RayNode]) -> dict[str, RayNode]:
    """The alive node for each address (a restarted node leaves a dead entry behind)."""
    return {n.address: n for n in nodes if n.alive}
