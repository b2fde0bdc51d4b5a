"""The docker CLI argv that `vcluster exec` and `vcluster logs` run on a node over SSH."""

from __future__ import annotations

from typing import Literal

from cluster.decide.model_plan import MODEL_LOG_DIR
from cluster.decide.plan import FRONT_LOG_PATH, VLLM_LOG_PATH

Component = Literal["vllm", "router", "models", "ray", "container"]
COMPONENTS: tuple[Component, ...] = ("vllm", "router", "models", "ray", "container")
RAY_LOGS = "/tmp/ray/session_latest/logs"
# Picks bash when the image has it; a constant script, no user value inside.
_LOGIN_SHELL = "command -v bash >/dev/null 2>&1 && exec bash -l || exec sh -l"


def exec_argv(container: str, command: list[str]) -> list[str]:
    """Run `command` in the container, or an interactive shell when it is empty."""
    if not command:
        return ["docker", "exec", "-it", container, "sh", "-c", _LOGIN_SHELL]
    return ["docker", "exec", container, *command]


def logs_argv(container: str, component: Component, *, tail: int, follow: bool) -> list[str]:
    """Show a component's log: vLLM's log file (the router's or agent's with several models),
    the router's in front of one model, the models' logs (several models), Ray's raylet/GCS
    logs, or the container's."""
    follow_flag = ["-f"] if follow else []
    if component == "container":
        return ["docker", "logs", "--tail", str(tail), *follow_flag, container]
    if component in ("vllm", "router"):
        path = VLLM_LOG_PATH if component == "vllm" else FRONT_LOG_PATH
        return ["docker", "exec", container, "tail", "-n", str(tail), *follow_flag, path]
    if component == "models":  # one file per model that ran on the node
        script = f'tail "$@" {MODEL_LOG_DIR}/*.log 2>/dev/null || echo "no model ran on this node"'
        tail_args = ["-n", str(tail), *follow_flag]
        return ["docker", "exec", container, "sh", "-c", script, "tail", *tail_args]
    # Ray: the raylet everywhere, the GCS server on the head only (its file is absent on workers).
    files = [f"{RAY_LOGS}/raylet.out", f"{RAY_LOGS}/gcs_server.out"]
    script = 'tail "$@" 2>/dev/null; true'
    tail_args = ["-n", str(tail), *follow_flag, *files]
    return ["docker", "exec", container, "sh", "-c", script, "tail", *tail_args]
