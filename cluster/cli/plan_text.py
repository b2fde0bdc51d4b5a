"""`vcluster plan`'s text: what runs on each node, for a person to read (secrets appear as
references, never values). The plan itself and its JSON are `cluster/decide/plan.py`'s."""

from __future__ import annotations

import shlex
from typing import Literal

from cluster.decide.plan import SECRETS_PATH, ClusterPlan
from cluster.decide.secrets import MASK


def _gpus_flag(gpus: Literal["all"] | tuple[int, ...]) -> str:
    return gpus if gpus == "all" else "device=" + ",".join(map(str, gpus))


def render_text(plan: ClusterPlan) -> str:
    """A human-readable plan; secrets appear as references, never values."""
    lines = [
        f"cluster {plan.cluster}: {len(plan.nodes)} node(s), {plan.accelerator}, executor {plan.executor}",
        (
            f"models {', '.join(m.served for m in plan.serving.models)}, behind a router"
            if plan.serving is not None
            else f"model {plan.model} as {plan.served_model_name!r}: tensor parallel "
            f"{plan.tensor_parallel} x pipeline parallel {plan.pipeline_parallel}"
        ),
        f"endpoint {plan.endpoint}",
        f"image {plan.image}: {plan.runtime_reason}",
        f"image facts: {plan.image_facts or 'not gathered'}",
    ]
    lines += [f"known vLLM trap {m.line()}" for m in plan.mitigations]
    if plan.serving is not None:
        lines += [
            "",
            f"router on {plan.head.name}: {len(plan.serving.models)} model(s), each "
            "loaded when a request asks for it, unless kept loaded",
        ]
        for model in plan.serving.models:
            when = "kept loaded" if model.keep_loaded else "on demand"
            idle = (
                f", unloaded after {model.unload_after_s:g} s idle" if model.unload_after_s else ""
            )
            lines.append(
                f"  model {model.served!r}: TP {model.tensor_parallel} x PP "
                f"{model.pipeline_parallel}, {when}{idle}; ports {model.api_port}/{model.master_port}"
            )
            lines.append(f"    {shlex.join(model.argv)}")
        devices = "; ".join(f"{n.name} {list(n.devices)}" for n in plan.serving.nodes)
        lines.append(f"  devices: {devices}")
    for node in plan.nodes:
        c = node.container
        lines.append("")
        lines.append(f"[{node.role}] {node.name} ({node.host})")
        lines.append(f"  container {c.name}  image {c.image}  spec {c.spec_hash}")
        lines.append(
            f"  --network {c.network_mode} --ipc {c.ipc_mode}"
            + (f" --gpus {_gpus_flag(c.gpus)}" if c.gpus else "")
            + "".join(f" -v {m.source}:{m.target}" for m in c.mounts)
            + "".join(f" --device {d}" for d in c.devices)
            + "".join(f" --ulimit {u.name}={u.soft}:{u.hard}" for u in c.ulimits)
            + "".join(f" --cap-add {cap}" for cap in c.cap_add)
        )
        for name, value in c.environment.items():
            lines.append(f"  env {name}={value}")
        for name, ref in c.secret_files.items():
            lines.append(f"  secret file {SECRETS_PATH}/{name} = {MASK} (from {ref})")
        lines.append(f"  ray: {shlex.join(c.command)}" if c.command else "  ray: none")
        lines.append(
            f"  supervisor: restart policy {c.restart_policy}, "
            + ("the router/agent" if plan.routed else "vLLM")
            + " restarted when it dies"
            + (f"; ranks on {', '.join(c.supervisor.peers)}" if c.supervisor.peers else "")
        )
        if node.serve is not None:
            lines.append(f"  vllm: {shlex.join(node.serve.argv)}")
        if node.serve is not None and node.serve.front is not None:
            lines.append(
                f"  endpoint: vcluster's router on {node.facts.address}:{plan.endpoint_port}, "
                "in front of vLLM on 127.0.0.1 (API key on every route but /health)"
            )
    return "\n".join(lines)
