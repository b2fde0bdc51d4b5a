"""An image without Ray, as vLLM's own images are from vLLM 0.19.1 on, on the 2-node sandbox.

The sandbox's workload image minus Ray is put on both nodes. With the wheelhouse named in the
inventory, `up` derives a Ray-ready image on the head and forms the Ray cluster; with neither a
wheelhouse nor a reachable index it falls back to vLLM's own multi-node mode and says why; and
`executor: ray` then stops in preflight with the fix, changing nothing. Both serve the stand-in
vLLM (tests/support/standin_node.py): deriving the image, forming the Ray cluster or not, and
saying why are vcluster's. Real vLLM serves from the image without Ray in test_models.py.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster.decide.inventory import Inventory, load_inventory
from cluster.decide.ray_image import SOURCE_ID_LABEL
from cluster.nodes.session import Session
from cluster.sandbox.images import WHEELHOUSE, WORKLOAD_IMAGE_WITHOUT_RAY
from tests.support.cli import UP_TIMEOUT_S, vcluster
from tests.support.faults import seconds_to_first_chat
from tests.support.images import put_on_nodes
from tests.support.standin_node import install_standin, standin_model, with_standin_path

pytestmark = [pytest.mark.e2e, pytest.mark.stage("variants")]

UNREACHABLE_INDEX = "http://127.0.0.1:9/simple"  # port 9 (discard): nothing listens there
CHAT_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def variants(
    sandbox_inventory: Path, sandbox_cluster, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A folder for inventories naming the image without Ray, which every node then holds."""
    put_on_nodes(sandbox_inventory, WORKLOAD_IMAGE_WITHOUT_RAY)
    install_standin(sandbox_inventory)
    sandbox_cluster.changed()  # each test brings up its own variant
    return tmp_path_factory.mktemp("without-ray")


def variant(
    sandbox_inventory: Path, folder: Path, name: str, standin: bool = False, **changes: Any
) -> Path:
    data = yaml.safe_load(sandbox_inventory.read_text())
    data.update(image=WORKLOAD_IMAGE_WITHOUT_RAY, **changes)
    if standin:
        data = with_standin_path(data)
        data["model"] = standin_model(data["model"])
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def status_of(inventory: Path) -> dict:
    result = vcluster("status", "--json", str(inventory))
    assert "Traceback" not in result.stderr, result.stderr
    return json.loads(result.stdout)


def containers(inventory: Path) -> dict[str, str | None]:
    """Each node's vcluster container ID (None where there is none)."""
    loaded = load_inventory(inventory)
    with Session(loaded) as session:
        session.open().raise_if_failed("connecting")
        found = {}
        for node in loaded.nodes:
            listed = session.docker(node.node_name).containers.list(
                all=True, filters={"name": f"vcluster-{loaded.cluster}"}
            )
            found[node.node_name] = listed[0].id if listed else None
        return found


def untag_ray_ready_images(inventory: Inventory) -> None:
    """Take the Ray-ready images' tags off every node (a running container keeps its image)."""
    with Session(inventory) as session:
        session.open().raise_if_failed("connecting")
        for node in inventory.nodes:
            client = session.docker(node.node_name)
            for image in client.images.list(filters={"label": SOURCE_ID_LABEL}):
                for tag in image.tags:
                    client.images.remove(tag, force=True)  # untags an image in use


def answers_chat(inventory: Path) -> bool:
    loaded = load_inventory(inventory)
    return seconds_to_first_chat(loaded, time.monotonic(), CHAT_TIMEOUT_S) is not None


def test_up_derives_a_ray_ready_image_from_the_wheelhouse_and_forms_the_ray_cluster(
    sandbox_inventory: Path, variants: Path
):
    inventory = variant(sandbox_inventory, variants, "wheelhouse", standin=True,
                        ray={"wheelhouse": str(WHEELHOUSE)})  # fmt: skip
    up = vcluster("up", "--recreate", str(inventory), timeout=UP_TIMEOUT_S)
    assert up.returncode == 0, up.stderr
    assert "has no Ray: the cluster runs the Ray-ready vcluster/vllm-cpu-noray-ray:" in up.stderr
    assert "✓ Ray-ready image: " in up.stderr and "Ray 2.60.0" in up.stderr
    # built on the head, it reaches node-2 as the layers node-2 lacks (it holds the base image)
    said = " ".join(up.stdout.split())  # the console wraps long lines at spaces
    sent = re.search(r"image sent to node-2 \((\d+) of (\d+) layer\(s\)", said)
    assert sent is not None, up.stdout
    assert 0 < int(sent[1]) < int(sent[2]), sent[0]
    status = status_of(inventory)
    assert status["ray_cluster"] and status["ray_nodes_alive"] == 2, status
    assert status["image"]["has_ray"] and status["image"]["ray"] == "2.60.0"
    assert status["image"]["vllm"] == "0.32.0+cpu"
    ids = {node["image_id"] for node in status["nodes"]}
    assert ids == {status["image"]["image_id"]}, "one derived image ID on every node"
    assert answers_chat(inventory)
    again = vcluster("up", str(inventory), timeout=UP_TIMEOUT_S)  # converges: nothing to do
    assert again.returncode == 0, again.stderr
    assert "already up, nothing changed" in again.stdout, again.stderr


def test_without_a_wheelhouse_or_a_reachable_index_it_serves_in_vllms_own_mode_saying_why(
    sandbox_inventory: Path, variants: Path
):
    inventory = variant(sandbox_inventory, variants, "fallback", standin=True,
                        ray={"index_url": UNREACHABLE_INDEX})  # fmt: skip
    reuse = vcluster("plan", str(inventory))  # the Ray-ready image of the test before is there
    assert reuse.returncode == 0, reuse.stderr
    assert "the cluster runs its Ray-ready vcluster/vllm-cpu-noray-ray:" in reuse.stdout
    assert "built before (Ray cannot be added now: no ray.wheelhouse is set" in reuse.stdout
    untag_ray_ready_images(load_inventory(inventory))  # as on a site that never built one
    plan = vcluster("plan", str(inventory))
    assert plan.returncode == 0, plan.stderr
    assert "has no Ray, and Ray cannot be added (no ray.wheelhouse is set and the head " \
        f"cannot reach the package index {UNREACHABLE_INDEX}" in plan.stdout  # fmt: skip
    assert "ray: none" in plan.stdout and "--nnodes" in plan.stdout
    up = vcluster("up", "--recreate", str(inventory), timeout=UP_TIMEOUT_S)
    assert up.returncode == 0, up.stderr
    assert "vLLM's own multi-node mode" in up.stderr
    assert "✓ Ray token: not applicable: no Ray cluster" in up.stderr
    assert "✓ Waiting for every node in Ray: not applicable: no Ray cluster" in up.stderr
    status = status_of(inventory)
    assert status["ray_cluster"] is False and status["healthy"], status
    assert [node["ray_alive"] for node in status["nodes"]] == [None, None]
    assert status["image"]["has_ray"] is False
    table = vcluster("status", str(inventory))
    assert "ray: not applicable (no Ray cluster" in table.stdout
    assert answers_chat(inventory)


def test_executor_ray_without_ray_fails_in_preflight_with_the_fix_and_changes_nothing(
    sandbox_inventory: Path, variants: Path
):
    inventory = variant(sandbox_inventory, variants, "ray-executor", executor="ray",
                        ray={"index_url": UNREACHABLE_INDEX})  # fmt: skip
    before = containers(inventory)
    up = vcluster("up", "--recreate", str(inventory), timeout=UP_TIMEOUT_S)
    assert up.returncode == 1, up.stderr
    assert "✗ Preflight checks" in up.stderr and "Traceback" not in up.stderr
    error = next(line for line in up.stderr.splitlines() if "executor: ray" in line)
    assert WORKLOAD_IMAGE_WITHOUT_RAY in error and "vLLM 0.32.0+cpu" in error
    assert "(fix: set ray.wheelhouse" in error
    assert containers(inventory) == before
    check = vcluster("check", "--json", str(inventory))
    failed = [r for r in json.loads(check.stdout) if r["status"] == "FAIL"]
    assert [r["name"] for r in failed] == ["executor"] and check.returncode == 1
