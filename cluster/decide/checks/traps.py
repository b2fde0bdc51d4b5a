"""The rule over vLLM's known traps (`cluster/decide/traps.py`) that apply to this cluster."""

from __future__ import annotations

from cluster.decide.checks.result import CheckInput, CheckResult, passes, warns
from cluster.decide.inventory import Model
from cluster.decide.traps import ModelShape, TrapFacts, choose_mitigations


def _model_tensor_parallel(given: CheckInput, model: Model) -> int:
    """The model's TP as the plan will make it: given, or the GPUs per node."""
    if model.tensor_parallel != "auto":
        return model.tensor_parallel
    if given.inventory.accelerator == "cpu":
        return 1
    counts = [
        len(node.gpu_ids) if node.gpu_ids is not None else len(given.facts[node.node_name].gpus)
        for node in given.inventory.nodes
        if node.node_name in given.facts
    ]
    return min(counts, default=1)


def check_known_traps(given: CheckInput) -> list[CheckResult]:
    """vLLM's known traps (cluster/decide/traps.py) that apply to this cluster: WARN with what `up`
    changes for each, or that the inventory turned it off."""
    inventory = given.inventory
    runtime = given.runtime
    facts = TrapFacts(
        vllm_version=runtime.vllm_version if runtime else None,
        accelerator=inventory.accelerator,
        multicast={
            name: (f.fabric.multicast.verdict, f.fabric.multicast.explain())
            for name, f in given.probed()
        },
        nodes=tuple(n.node_name for n in inventory.nodes),
        image_has_ray=runtime.image_has_ray if runtime else None,
    )
    results = []
    for model in inventory.model_list:
        shape = ModelShape(
            _model_tensor_parallel(given, model),
            tuple(model.args),
            model.served if inventory.routed else None,
        )
        for found in choose_mitigations(facts, shape):
            if found.fragment is None:
                results.append(
                    passes("known trap", None, f"{found.trap}: {found.why}; {found.action}")
                )
            elif found.trap in inventory.traps_off:
                results.append(
                    warns(
                        "known trap",
                        None,
                        f"{found.trap} is turned off (traps:), but applies: {found.why}",
                        f"{found.warn}; remove traps.{found.trap}, or add {found.action} to "
                        f"the model's args yourself ({found.source})",
                    )
                )
            else:
                done = (
                    f"`up` cannot add it ({found.skipped}): add {found.action} to the args"
                    if found.skipped
                    else f"`up` adds {found.action}"
                    + (f" (the user's own {', '.join(found.kept)} kept)" if found.kept else "")
                )
                results.append(
                    warns(
                        "known trap",
                        None,
                        f"{found.trap}: {found.why}",
                        f"{found.warn}. {done}; `traps: {{{found.trap}: off}}` turns it off. "
                        f"Source: {found.source}",
                    )
                )
    if not results:
        version = facts.vllm_version or "not known yet"
        results.append(passes("known trap", None, f"none applies (vLLM {version})"))
    return results
