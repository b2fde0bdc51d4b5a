"""`vcluster exporter`: Prometheus metrics of the cluster, refreshed in the background.

A scrape never waits for the hosts: it returns the last snapshot. Snapshots are taken on an
interval by one thread, all hosts in parallel, with SSH timeouts bounded by the interval, so a
slow or dead node delays nothing past it and is reported as down while the others are served.
Should a refresh still get stuck (a bug, or a timeout that does not hold), the snapshot is not
served as current: past `STALE_AFTER_INTERVALS` intervals every node reads as down, and the log
shows where the refresh thread waits.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import threading
import time
import traceback
from collections.abc import Iterator

from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from cluster.decide.inventory import Inventory
from cluster.nodes.session import Session
from cluster.report.metrics import cluster_metrics
from cluster.report.status import ClusterStatus, VllmStatus, gather_status

log = logging.getLogger(__name__)
DEFAULT_INTERVAL_S = 15.0
DEFAULT_ADDRESS = "127.0.0.1"
"""The exporter has no authentication: it listens on loopback unless `--address` says where."""
DEFAULT_PORT = 9400
STALE_AFTER_INTERVALS = 4


def bounded(inventory: Inventory, interval_s: float) -> Inventory:
    """The inventory with SSH timeouts that fit in one refresh interval."""
    ssh = inventory.ssh.model_copy(
        update={
            "connect_timeout": min(inventory.ssh.connect_timeout, interval_s / 3),
            "command_timeout": min(inventory.ssh.command_timeout, interval_s / 2),
        }
    )
    return inventory.model_copy(update={"ssh": ssh})


class ClusterCollector(Collector):
    """Holds the latest snapshot; `collect` serves it as metrics."""

    def __init__(self, inventory: Inventory, interval_s: float = DEFAULT_INTERVAL_S) -> None:
        self.inventory = bounded(inventory, interval_s)
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._snapshot: tuple[ClusterStatus, float, float] | None = None
        self._stop = threading.Event()
        self._refresher: int | None = None  # thread id of `run_forever`
        self._stale_reported = False

    def refresh(self) -> ClusterStatus:
        """Take one snapshot of the cluster now."""
        started = time.monotonic()
        with Session(self.inventory) as session:
            status = gather_status(self.inventory, session)
        with self._lock:
            self._snapshot = (status, time.time(), time.monotonic() - started)
        return status

    def run_forever(self) -> None:
        """Refresh every interval until `stop`; an error keeps the last snapshot."""
        self._refresher = threading.get_ident()
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.refresh()
            except Exception:  # a bug must not stop the exporter; the log says what
                log.exception("refreshing the cluster status failed")
            self._stop.wait(max(0.0, self.interval_s - (time.monotonic() - started)))

    def stop(self) -> None:
        self._stop.set()

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            snapshot = self._snapshot
        if snapshot is None:
            return iter(())
        status, refreshed_at, took_s = snapshot
        age_s = time.time() - refreshed_at
        if age_s > STALE_AFTER_INTERVALS * self.interval_s:
            self._report_stale(age_s)
            status = stale(status, age_s)
        else:
            self._stale_reported = False
        return iter(cluster_metrics(status, refreshed_at, took_s))

    def _report_stale(self, age_s: float) -> None:
        if self._stale_reported:
            return
        self._stale_reported = True
        frame = sys._current_frames().get(self._refresher or -1)
        where = "".join(traceback.format_stack(frame)) if frame is not None else "(not running)"
        log.warning(
            "no status refresh finished for %.0f s; the refresh waits at:\n%s", age_s, where
        )


def stale(status: ClusterStatus, age_s: float) -> ClusterStatus:
    """`status` with every node down: what is known of them is `age_s` seconds old."""
    error = f"no status refresh finished for {age_s:.0f} s (see the exporter's log)"
    nodes = tuple(
        dataclasses.replace(
            node,
            reachable=False,
            error=error,
            container=None,
            gpus=(),
            gpu_problem=None,
            ray_alive=None if node.ray_alive is None else False,
            vllm_process=None if node.vllm_process is None else False,
        )
        for node in status.nodes
    )
    return dataclasses.replace(
        status, nodes=nodes, vllm=VllmStatus(error=error), ray_nodes_alive=0, ray_resources={}
    )
