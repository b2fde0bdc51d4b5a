"""The 2-node sandbox every end-to-end test runs on, brought up once through the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.decide.inventory import Inventory, load_inventory
from tests.support.cli import UP_TIMEOUT_S, vcluster

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SANDBOX_UP_TIMEOUT_S = 3600  # a cold machine builds the images first
SANDBOX = "e2e"  # its own name, network and nodes: a developer's sandbox may be up meanwhile


def _sandbox(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cluster", "sandbox", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        check=False,
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test in this folder runs vcluster on the sandbox (minutes each): mark it `slow`."""
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def sandbox_inventory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    existing = os.environ.get("VCLUSTER_E2E_INVENTORY")
    if existing:  # a developer's sandbox, brought up by hand: used, not removed
        yield Path(existing)
        return
    workdir = tmp_path_factory.mktemp("sandbox")
    up = _sandbox(
        "up", "--nodes", "2", "--name", SANDBOX, "--workdir", str(workdir),
        timeout=SANDBOX_UP_TIMEOUT_S,
    )  # fmt: skip
    assert up.returncode == 0, f"sandbox up failed:\n{up.stdout}\n{up.stderr}"
    inventory = workdir / "inventory.yaml"
    assert inventory.exists(), up.stdout
    yield inventory
    down = _sandbox("down", "--name", SANDBOX, timeout=600)
    assert down.returncode == 0, f"sandbox down failed:\n{down.stdout}\n{down.stderr}"


@pytest.fixture(scope="module")
def cluster(sandbox_inventory: Path) -> Inventory:
    """The sandbox's cluster, brought up (or found up) by `vcluster up` for the module."""
    up = vcluster("up", str(sandbox_inventory), timeout=UP_TIMEOUT_S)
    assert up.returncode == 0, f"{up.stdout}\n{up.stderr}"
    return load_inventory(sandbox_inventory)
