"""The last collective check's figures, kept on the controller for `status` and the exporter."""

from __future__ import annotations

import json
import os
import time

from cluster.decide.checks.result import CheckResult, failed
from cluster.decide.collective_report import CollectiveRun, summary, transport_summary
from cluster.decide.state_paths import collective_run_path


def save_last_run(
    cluster: str, run: CollectiveRun, rows: list[CheckResult], seconds: float
) -> None:
    """The largest size's figures per group, each node's NCCL transport between the nodes, the
    verdict and the time: for the exporter and `status`."""
    path = collective_run_path(cluster)
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "finished_at": time.time(),
        "seconds": seconds,
        "ok": not failed(rows),
        "groups": summary(run),
        "transports": transport_summary(run),
    }
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")  # two runs never share it
    partial.write_text(json.dumps(document, indent=2))
    partial.replace(path)


def load_last_run(cluster: str) -> dict | None:
    """The last run's document, or None when there is none (or it is unreadable)."""
    try:
        data = json.loads(collective_run_path(cluster).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
