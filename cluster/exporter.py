"""`vcluster exporter`: Prometheus metrics of the cluster, refreshed in the background.

A scrape never waits for the hosts: it returns the last snapshot. Snapshots are taken on an
interval by one thread, all hosts in parallel, with SSH timeouts bounded by the interval, so a
slow or dead node delays nothing past it and is reported as down while the others are served.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from cluster.inventory import Inventory
from cluster.metrics import cluster_metrics
from cluster.session import Session
from cluster.status import ClusterStatus, gather_status

log = logging.getLogger(__name__)
DEFAULT_INTERVAL_S = 15.0


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
        return iter(cluster_metrics(*snapshot))
