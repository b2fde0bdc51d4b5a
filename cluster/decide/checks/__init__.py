"""Preflight and topology rules: pure functions from facts to PASS / WARN / FAIL / SKIP results.

Each rule reads the inventory and the facts of every node (one probe per host) and returns
results that name the node (None: the whole cluster), say what was found in one line, and
give the remedy. `run_checks` runs the rules that need only the probe's facts; the others take
data gathered by other steps (image IDs, model presence, reachability, Ray). `up` stops on any
FAIL before changing anything; `vcluster check` prints them all (`cluster/cli/tables.py`).

One module per rule family: `hosts`, `gpus`, `traps`, `fabric`, `network`, `images`, `models`,
`ray_nodes`; `result` holds the result model.
"""

from __future__ import annotations

from cluster.decide.checks.fabric import check_infiniband
from cluster.decide.checks.gpus import (
    check_driver_version,
    check_gpu_errors,
    check_gpus,
    check_gpus_idle,
    check_topology,
)
from cluster.decide.checks.hosts import (
    GIB,
    check_cache_disk,
    check_clock_skew,
    check_docker,
    check_nvidia_runtime,
    check_shared_memory,
    check_ssh,
)
from cluster.decide.checks.images import check_image, check_runtime
from cluster.decide.checks.models import check_model_files, check_model_present
from cluster.decide.checks.network import (
    check_api_key,
    check_head_ports,
    check_route_to_head,
    check_workers_reach_head,
    head_port,
    uses_ray,
)
from cluster.decide.checks.ray_nodes import check_ray_nodes
from cluster.decide.checks.result import (
    CheckInput,
    CheckResult,
    Rule,
    Status,
    exit_code,
    failed,
    results_as_dicts,
)
from cluster.decide.checks.traps import check_known_traps

__all__ = [
    "GIB",
    "RULES",
    "CheckInput",
    "CheckResult",
    "Rule",
    "Status",
    "check_api_key",
    "check_cache_disk",
    "check_clock_skew",
    "check_docker",
    "check_driver_version",
    "check_gpu_errors",
    "check_gpus",
    "check_gpus_idle",
    "check_head_ports",
    "check_image",
    "check_infiniband",
    "check_known_traps",
    "check_model_files",
    "check_model_present",
    "check_nvidia_runtime",
    "check_ray_nodes",
    "check_route_to_head",
    "check_runtime",
    "check_shared_memory",
    "check_ssh",
    "check_topology",
    "check_workers_reach_head",
    "exit_code",
    "failed",
    "head_port",
    "results_as_dicts",
    "run_checks",
    "uses_ray",
]

RULES: tuple[Rule, ...] = (
    check_api_key,
    check_ssh,
    check_docker,
    check_nvidia_runtime,
    check_gpus,
    check_driver_version,
    check_gpu_errors,
    check_gpus_idle,
    check_topology,
    check_known_traps,
    check_infiniband,
    check_shared_memory,
    check_cache_disk,
    check_head_ports,
    check_route_to_head,
    check_clock_skew,
)
"""The rules that need only the probe's facts, in the order they are shown."""


def run_checks(given: CheckInput) -> list[CheckResult]:
    """Every rule's results, in rule order."""
    return [result for rule in RULES for result in rule(given)]
