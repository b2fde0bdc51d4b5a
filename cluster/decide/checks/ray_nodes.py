"""The rule over Ray's view of the cluster once it runs."""

from __future__ import annotations

from collections.abc import Mapping

from cluster.decide.checks.result import CheckResult, fails, passes
from cluster.facts.host import HostFacts


def check_ray_nodes(
    facts: Mapping[str, HostFacts], ray_gpus: Mapping[str, float | None]
) -> list[CheckResult]:
    """Ray's view against the facts: every node alive in Ray with the GPUs nvidia-smi lists.

    `ray_gpus[node]` is the GPUs Ray reports for the node, None when Ray has no alive node there.
    """
    results = []
    for name, gpus in ray_gpus.items():
        listed = facts[name].gpu.gpu_count if name in facts else None
        if gpus is None:
            results.append(
                fails(
                    "ray nodes",
                    name,
                    "not alive in Ray",
                    "read the node container's log (`vcluster logs --node NAME`)",
                )
            )
        elif listed is not None and gpus != listed:
            results.append(
                fails(
                    "ray nodes",
                    name,
                    f"Ray sees {gpus:g} GPUs, nvidia-smi {listed}",
                    "check that the container got the GPUs (`--gpus all`, the nvidia runtime)",
                )
            )
        else:
            results.append(passes("ray nodes", name, f"alive with {gpus:g} GPUs"))
    return results
