"""Benchmark: `vcluster status` against `ssh HOST true` fanned out in parallel (not a test).

    flock /tmp/vcluster-e2e.lock .venv/bin/python bench/status --sandbox [--keep]
    .venv/bin/python bench/status [--hosts 32] [--runs 3] [--inventory SANDBOX_INVENTORY]

Lab part: 32 hosts of the SSH lab (tests/support/ssh_lab.py; real sshd per network namespace),
their `docker` CLI pointed at this machine's vcluster daemon (the lab hosts share its file
system, as in tests/integration/test_lock_and_docker.py); no vcluster container, Ray or vLLM
there, so each node costs its SSH connection and the status script (nvidia-smi absent,
`docker inspect`, no `docker exec`), and the head's Ray query stops at `docker inspect`.
Sandbox part: with `--sandbox`, a 2-node sandbox `bench-st` brought up and served first (not
measured; under the e2e lock), or with `--inventory` any running sandbox cluster: the whole
`vcluster status` command, Python start-up included, and `gather_status` alone.
Each figure is a median of `runs`, a fresh session each time (connections included).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# `python bench/status` puts only this folder on sys.path; the root gives `cluster` and the lab.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cluster.decide.inventory import load_inventory
from cluster.nodes.session import Session
from cluster.report.status import gather_status
from cluster.sandbox.dockerd import ensure_local_docker
from cluster.sandbox.sandbox import sandbox_down, sandbox_up
from cluster.steps.base import SilentReporter
from cluster.steps.down import down
from cluster.steps.up import up
from tests.support.ssh_lab import SshLab, cleanup_stale

LAB_PREFIX = "bstat"
SANDBOX = "bench-st"
LAB_TARGET_S = 1.5
SANDBOX_TARGET_S = 1.0


def median_of(runs: int, action: Callable[[], object]) -> tuple[float, list[float]]:
    times = []
    for _ in range(runs):
        started = time.monotonic()
        action()
        times.append(time.monotonic() - started)
    return statistics.median(times), times


def ssh_true_fanout(argvs: list[list[str]]) -> None:
    """`ssh HOST true` to every host at once (OpenSSH, a new connection each)."""
    with ThreadPoolExecutor(max_workers=len(argvs)) as pool:
        codes = list(pool.map(lambda a: subprocess.run(a, capture_output=True).returncode, argvs))
    if any(codes):
        raise SystemExit(f"ssh HOST true failed: exit codes {codes}")


def lab_inventory(lab: SshLab, path: Path) -> Path:
    nodes = "\n".join(
        f"  - {{name: {h.name}, address: {h.address}{', role: head' if i == 0 else ''}}}"
        for i, h in enumerate(lab.hosts)
    )
    path.write_text(
        f"cluster: bench-status\nimage: vcluster/vllm-cpu:0.32.0\naccelerator: cpu\n"
        f"ssh: {{user: root, key_file: {lab.client_key}, known_hosts: {lab.known_hosts}}}\n"
        f"nodes:\n{nodes}\nmodel_cache: /tmp/vcluster-bench-status-cache\n"
        f"model: {{name: /tmp/vcluster-bench-status-cache/models/tiny, served_name: tiny}}\n"
    )
    return path


def lab_figures(hosts: int, runs: int) -> None:
    docker_host = ensure_local_docker().host
    cleanup_stale(LAB_PREFIX)
    with tempfile.TemporaryDirectory() as workdir, SshLab(Path(workdir), hosts, LAB_PREFIX) as lab:
        inventory = load_inventory(lab_inventory(lab, Path(workdir) / "inventory.yaml"))

        def status() -> None:
            with Session(inventory) as session:
                result = gather_status(inventory, session, docker_host=docker_host)
            unreachable = [n.name for n in result.nodes if not n.reachable or n.error]
            if unreachable:
                raise SystemExit(f"status failed on {unreachable}: {result.nodes[0].error}")

        argvs = [lab.ssh_command(h, "true") for h in lab.hosts]
        ssh_s, ssh_runs = median_of(runs, lambda: ssh_true_fanout(argvs))
        status_s, status_runs = median_of(runs, status)
    print(f"SSH lab, {hosts} hosts (Docker: this machine's daemon; no container/Ray/vLLM):")
    print(f"  ssh HOST true, all at once   {ssh_s:6.2f} s   runs {_runs(ssh_runs)}")
    print(f"  status (gather_status)       {status_s:6.2f} s   runs {_runs(status_runs)}"
          f"   target <= {LAB_TARGET_S} s: {'met' if status_s <= LAB_TARGET_S else 'MISSED'}")  # fmt: skip


def sandbox_figures(inventory_path: Path, runs: int) -> None:
    inventory = load_inventory(inventory_path)
    cli = [sys.executable, "-m", "cluster", "status", str(inventory_path)]
    argvs = [
        ["ssh", "-i", str(inventory.ssh.key_file), "-o", f"UserKnownHostsFile={inventory.ssh.known_hosts}",
         "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", f"root@{n.address}", "true"]
        for n in inventory.nodes
    ]  # fmt: skip

    def status_in_process() -> None:
        with Session(inventory) as session:
            gather_status(inventory, session)

    def status_cli() -> None:
        subprocess.run(cli, capture_output=True, check=False)

    ssh_s, ssh_runs = median_of(runs, lambda: ssh_true_fanout(argvs))
    inner_s, inner_runs = median_of(runs, status_in_process)
    cli_s, cli_runs = median_of(runs, status_cli)
    n = len(inventory.nodes)
    print(f"sandbox, {n} nodes serving ({inventory_path}):")
    print(f"  ssh HOST true, all at once   {ssh_s:6.2f} s   runs {_runs(ssh_runs)}")
    print(f"  status (gather_status)       {inner_s:6.2f} s   runs {_runs(inner_runs)}")
    print(f"  vcluster status (command)    {cli_s:6.2f} s   runs {_runs(cli_runs)}"
          f"   target <= {SANDBOX_TARGET_S} s: {'met' if cli_s <= SANDBOX_TARGET_S else 'MISSED'}")  # fmt: skip


def _runs(times: list[float]) -> str:
    return " ".join(f"{t:.2f}" for t in times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--inventory", type=Path, help="a running sandbox cluster's inventory")
    parser.add_argument("--sandbox", action="store_true", help="bring a 2-node sandbox up first")
    parser.add_argument("--keep", action="store_true", help="with --sandbox: leave it serving")
    args = parser.parse_args()
    logging.getLogger("paramiko").setLevel(logging.CRITICAL)
    if args.sandbox:
        print("sandbox up and serving (not measured) ...", file=sys.stderr, flush=True)
        sandbox = sandbox_up(2, Path(".work") / SANDBOX, SANDBOX, progress=lambda _: None)
        inventory = load_inventory(sandbox.inventory)
        up(inventory, SilentReporter())
        try:
            sandbox_figures(sandbox.inventory, args.runs)
        finally:
            if not args.keep:
                down(inventory, SilentReporter())
                sandbox_down(SANDBOX, progress=lambda _: None)
    elif args.inventory:
        sandbox_figures(args.inventory, args.runs)
    else:
        print("sandbox: skipped (no --inventory of a running sandbox cluster)")
    if args.hosts > 0:  # --hosts 0: the sandbox alone
        lab_figures(args.hosts, args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
