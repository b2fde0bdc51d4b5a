"""Every table a person reads: the checks' results, `status`, the collective check's figures.

The data stays in its own layer (`decide/checks/`, `report/status.py`,
`decide/collective_report.py`) with its JSON form; this module only renders it for a terminal.
"""

from __future__ import annotations

import datetime as dt

from rich.markup import escape
from rich.table import Table

from cluster.decide.checks import CheckResult, Status
from cluster.decide.collective_report import CollectiveRun, bandwidth_text, size_text
from cluster.report.status import ClusterStatus, NodeStatus

_STYLES = {Status.PASS: "green", Status.WARN: "yellow", Status.FAIL: "bold red", Status.SKIP: "dim"}


def results_table(results: list[CheckResult]) -> Table:
    """The results as a rich table: status, check, node, detail, and the fix when not PASS."""
    table = Table(show_lines=False)
    for column in ("status", "check", "node", "detail", "fix"):
        table.add_column(column, overflow="fold")
    for result in results:
        table.add_row(
            f"[{_STYLES[result.status]}]{result.status.value}[/]",
            escape(result.name),
            escape(result.node or "cluster"),
            escape(result.detail),  # details hold `ray[default]`, paths, ...: text, not markup
            escape(result.remedy or "") if result.status is not Status.PASS else "",
        )
    return table


# --- status ---------------------------------------------------------------------------------


def uptime(started_at: str | None, now: dt.datetime | None = None) -> str:
    """A short age like `3h12m` from Docker's StartedAt timestamp."""
    if not started_at or started_at.startswith("0001"):
        return "-"
    started = dt.datetime.fromisoformat(started_at[:26].rstrip("Z") + "+00:00")
    seconds = int(((now or dt.datetime.now(dt.UTC)) - started).total_seconds())
    hours, rest = divmod(max(seconds, 0), 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _mark(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "NO")


def _vllm_cell(node: NodeStatus) -> str:
    if node.vllm_process is None or node.vllm_process or node.vllm_state is None:
        return _mark(node.vllm_process)
    return f"NO ({node.vllm_state})"


def status_view(status: ClusterStatus) -> list[Table | str]:
    """The human view of `status`: a node table, then the cluster and vLLM lines."""
    table = Table(title=f"cluster {status.cluster}")
    columns = (
        "node",
        "address",
        "role",
        "ssh",
        "container",
        "up",
        "image",
        "ray",
        "vllm",
        "restarts",
    )
    for column in columns:
        table.add_column(column)
    for node in status.nodes:
        table.add_row(
            node.name,
            node.address,
            node.role,
            "ok" if node.reachable else "UNREACHABLE",
            node.container or ("-" if not node.reachable else "NONE"),
            uptime(node.started_at),
            (node.image_id or "-").removeprefix("sha256:")[:12],
            _mark(node.ray_alive) if node.reachable else "-",
            _vllm_cell(node),
            "-" if node.vllm_restarts is None else str(node.vllm_restarts),
        )
    resources = ", ".join(f"{v:g} {k}" for k, v in status.ray_resources.items() if v)
    ray_line = f"ray: {status.ray_nodes_alive}/{status.ray_nodes_expected} nodes alive" + (
        f", {resources}" if resources else ""
    )
    if status.ray_error:
        ray_line += f" ({status.ray_error})"
    if not status.ray_cluster:
        ray_line = "ray: not applicable (no Ray cluster: vLLM's own multi-node mode)"
    vllm = status.vllm
    if vllm.error and not vllm.health:
        vllm_line = f"vllm: DOWN ({vllm.error})"
    else:
        load = (
            f"; running {vllm.requests_running:g}, waiting {vllm.requests_waiting:g}"
            if vllm.requests_running is not None and vllm.requests_waiting is not None
            else ""
        )
        kv = f"; KV cache {vllm.kv_cache_usage:.0%}" if vllm.kv_cache_usage is not None else ""
        vllm_line = (
            f"vllm: {'healthy' if vllm.health else 'UNHEALTHY'} at {status.endpoint}, "
            f"models {', '.join(vllm.models) or 'none'}{load}{kv}"
        )
    gpu_table = _gpu_table(status)
    problems = [f"{n.name}: {n.error}" for n in status.nodes if n.error]
    problems += [
        f"{n.name}: vLLM restarted {n.vllm_restarts} time(s), last because {n.vllm_last_exit}"
        for n in status.nodes
        if n.vllm_restarts and n.vllm_last_exit
    ]
    problems += [f"{n.name}: GPUs: {n.gpu_problem}" for n in status.nodes if n.gpu_problem]
    files_lines = [
        f"{n.name}: model files " + ", ".join(f"{m} {state}" for m, state in n.model_files.items())
        for n in status.nodes
        if n.model_files
    ]
    verdict = "healthy" if status.healthy else "DEGRADED"
    parts: list[Table | str] = [table]
    if gpu_table is not None:
        parts.append(gpu_table)
    image_line = [f"image: {status.image.summary()}"] if status.image else []
    models_lines = [
        f"model {m.name}: {m.shown_state}"
        + (f" on {m.where}" if m.placement else "")
        + (
            f", {m.host_memory_bytes / 1024**3:.1f} GiB host memory held"
            if m.state == "sleeping" and m.host_memory_bytes is not None
            else ""
        )
        + f", {m.requests} request(s), {m.activations} activation(s)"
        + (f", last start {m.last_activation_s:g} s" if m.last_activation_s is not None else "")
        + (f", last wake {m.last_wake_s:g} s ({m.wakes} wake(s))" if m.wakes else "")
        + (f" ({m.failure})" if m.failure and m.state != "loaded" else "")
        + (f" (last wake failed, started cold: {m.wake_failure})" if m.wake_failure else "")
        for m in status.models
    ]
    if status.models_error:
        models_lines.append(f"models: the router did not answer ({status.models_error})")
    return [
        *parts,
        *image_line,
        ray_line,
        vllm_line,
        *models_lines,
        *files_lines,
        *problems,
        f"cluster {status.cluster}: {verdict}",
    ]


def _value(value: float | None, unit: str = "") -> str:
    return "-" if value is None else f"{value:g}{unit}"


def _gpu_table(status: ClusterStatus) -> Table | None:
    """One row per GPU of every node; None in cpu mode or when no node listed a GPU."""
    if status.accelerator == "cpu" or not any(n.gpus for n in status.nodes):
        return None
    table = Table(title="GPUs")
    for column in ("node", "gpu", "model", "util", "memory", "temp", "power", "ecc", "errors"):
        table.add_column(column)
    for node in status.nodes:
        for gpu in node.gpus:
            memory = (
                f"{gpu.memory_used_mib}/{gpu.memory_total_mib} MiB"
                if gpu.memory_used_mib is not None and gpu.memory_total_mib is not None
                else "-"
            )
            table.add_row(
                node.name,
                str(gpu.index),
                gpu.name or "-",
                _value(gpu.utilization_pct, "%"),
                memory,
                _value(gpu.temperature_c, "C"),
                _value(gpu.power_draw_w, "W"),
                _value(gpu.ecc_uncorrected),
                ", ".join(gpu.errors) or "-",
            )
    return table


# --- the collective check -------------------------------------------------------------------


def figures_table(run: CollectiveRun) -> Table:
    """The measurements as nccl-tests prints them: size, time, algbw, busbw, correct."""
    table = Table(title="all-reduce (float32, sum)")
    for column in ("size", "scope", "group", "ranks", "time", "algbw", "busbw", "sums"):
        table.add_column(column, justify="right" if column in ("size", "ranks", "time") else "left")
    for m in sorted(run.measurements, key=lambda m: (m.scope, m.group, m.size)):
        table.add_row(
            size_text(m.size),
            m.scope,
            m.group,
            str(m.ranks),
            f"{m.seconds * 1e6:.0f} us",
            bandwidth_text(m.algbw),
            bandwidth_text(m.busbw),
            "ok" if m.correct else "WRONG",
        )
    return table
