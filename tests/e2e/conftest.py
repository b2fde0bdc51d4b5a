"""The 2-node sandbox every end-to-end test runs on, brought up once through the CLI, and the
clusters the stories run on it, each brought up only when the running one is another.

The tests run in stages (each test's `stage` marker; within a stage, in file order), so that a
cluster is brought up once for every story that needs it, and what replaces or removes it
comes last (docs/testing.md, "The e2e tier: before and after"):

- `bare`: no cluster yet (`check`, the exporter, the sandbox itself, `models pull`);
- `real`: the session's cluster, real vLLM (CPU) serving the tiny model from the Hugging Face
  cache with pipeline parallel 2 across both nodes (`cluster`);
- `standin`: the same cluster with the stand-in vLLM in vLLM's place (`standin_cluster`), for
  stories about vcluster's own behaviour (tests/support/standin_node.py);
- `down`: `vcluster down` and what it leaves;
- `routed`, `variants`: clusters of their own inventories (several models; an image without
  Ray), brought up by their modules;
- `last`: `vcluster sandbox down`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from cluster.decide.inventory import Inventory, load_inventory
from cluster.sandbox.model import SECOND_MODEL_NAME, ensure_tiny_model
from tests.support.cli import UP_TIMEOUT_S, vcluster
from tests.support.standin_node import install_standin, write_standin_inventory

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SANDBOX_UP_TIMEOUT_S = 3600  # a cold machine builds the images first
SANDBOX = "e2e"  # its own name, network and nodes: a developer's sandbox may be up meanwhile
STAGES = ("bare", "real", "standin", "down", "routed", "variants", "last")
HUB_ID = "vcluster-sandbox/tiny-from-source"
"""The session's model: a hub ID, sent from a folder here into every node's Hugging Face cache
and served with the hub offline (cluster/steps/model_files.py)."""
SERVED = "tiny-llama"


def _sandbox(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cluster", "sandbox", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        check=False,
    )


def stage_of(item: pytest.Item) -> tuple[float, bool]:
    """The test's stage, and whether it asked to come after the stage's other tests
    (`stage(name, last=True)`: a fault that leaves the cluster restarting); a test without a
    stage runs after the others but before `last` (its fixtures bring up what it asks for)."""
    marker = item.get_closest_marker("stage")
    if marker is None:
        return STAGES.index("last") - 0.5, False
    if marker.args[0] not in STAGES:
        raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.stage takes one of {STAGES}")
    return STAGES.index(marker.args[0]), bool(marker.kwargs.get("last"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test in this folder runs vcluster on the sandbox (minutes in all): mark it `slow`,
    and run them stage by stage (stable: file order within a stage)."""
    places = [i for i, item in enumerate(items) if HERE in item.path.parents]
    for i in places:
        items[i].add_marker(pytest.mark.slow)
    ordered = sorted((items[i] for i in places), key=stage_of)
    for i, item in zip(places, ordered, strict=True):
        items[i] = item


@pytest.fixture(scope="session")
def sandbox_inventory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    existing = os.environ.get("VCLUSTER_E2E_INVENTORY")
    if existing:  # a developer's sandbox, brought up by hand: used, not removed
        yield Path(existing)
        return
    workdir = tmp_path_factory.mktemp("sandbox")
    up = _sandbox(
        "up", "--nodes", "2", "--name", SANDBOX, "--workdir", str(workdir),
        "--node-storage", "memory", timeout=SANDBOX_UP_TIMEOUT_S,
    )  # fmt: skip
    assert up.returncode == 0, f"sandbox up failed:\n{up.stdout}\n{up.stderr}"
    inventory = workdir / "inventory.yaml"
    assert inventory.exists(), up.stdout
    yield inventory
    down = _sandbox("down", "--name", SANDBOX, timeout=600)
    assert down.returncode == 0, f"sandbox down failed:\n{down.stdout}\n{down.stderr}"


@pytest.fixture(scope="session")
def session_inventory(sandbox_inventory: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sandbox's inventory serving the tiny model by hub ID from a folder on this machine
    (as `tiny-llama`): `up` sends it into every node's cache, vLLM reads it with the hub off."""
    document = yaml.safe_load(sandbox_inventory.read_text())
    document["model"] = {
        **document["model"],
        "name": HUB_ID,
        "served_name": SERVED,
        "source": str(ensure_tiny_model(name=SECOND_MODEL_NAME)),
    }
    target = tmp_path_factory.mktemp("session") / "inventory.yaml"
    target.write_text(yaml.safe_dump(document, sort_keys=False))
    return target


@pytest.fixture(scope="session")
def standin_inventory(session_inventory: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's inventory with the stand-in vLLM in vLLM's place (same model, same nodes)."""
    install_standin(session_inventory)
    target = tmp_path_factory.mktemp("standin") / "inventory.yaml"
    return write_standin_inventory(session_inventory, target)


class SandboxCluster:
    """Which inventory's cluster runs on the sandbox: `vcluster up` only when it changes (with
    `--recreate`: the containers of another inventory are replaced)."""

    def __init__(self) -> None:
        self.running: Path | None = None
        self.brought_up: dict[Path, subprocess.CompletedProcess[str]] = {}
        """The `up` that brought each inventory's cluster up last."""

    def serve(self, inventory: Path) -> Inventory:
        if self.running != inventory:
            up = vcluster("up", "--recreate", str(inventory), timeout=UP_TIMEOUT_S)
            assert up.returncode == 0, f"{up.stdout}\n{up.stderr}"
            self.running = inventory
            self.brought_up[inventory] = up
        return load_inventory(inventory)

    def changed(self) -> None:
        """A test removed or replaced the cluster: the next `serve` brings it up."""
        self.running = None


@pytest.fixture(scope="session")
def sandbox_cluster() -> SandboxCluster:
    return SandboxCluster()


@pytest.fixture
def cluster(sandbox_cluster: SandboxCluster, session_inventory: Path) -> Inventory:
    """The session's cluster with real vLLM, brought up (or found up) by `vcluster up`."""
    return sandbox_cluster.serve(session_inventory)


@pytest.fixture
def standin_cluster(sandbox_cluster: SandboxCluster, standin_inventory: Path) -> Inventory:
    """The session's cluster with the stand-in vLLM, brought up by `vcluster up`."""
    return sandbox_cluster.serve(standin_inventory)
