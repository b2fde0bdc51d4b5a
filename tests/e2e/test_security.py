"""Only the cluster can use its Ray: clients from another machine of the same network, without
the cluster's token, are refused by the Ray client server and by the GCS; vcluster's own Ray
steps (which run inside the containers, with the token) keep working; `check` lists every port.

"Another machine" is a container on the sandbox's network that is not a node, running the
workload image (the same Ray release as the cluster). The same client WITH the token succeeds,
so a refusal below is the token's doing, not a network problem.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from cluster.sandbox.dockerd import ensure_local_docker
from cluster.sandbox.images import WORKLOAD_IMAGE
from cluster.sandbox.nodes import network_name
from tests.support.cli import vcluster

pytestmark = pytest.mark.e2e

CLIENT = """\
import sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR")
print("RAN", ray.get(ray.remote(lambda: __import__("os").getuid()).remote()))
"""


def from_another_machine(cluster, *argv: str, token: str | None = None, timeout: float = 120):
    """Run argv in a fresh container on the sandbox's network (not a node), as Ray's user."""
    local = ensure_local_docker()
    sandbox = cluster.cluster
    env = ["--env", "RAY_AUTH_MODE=token", "--env", "RAY_AUTH_TOKEN"] if token else []
    return subprocess.run(
        local.argv("run", "--rm", "--network", network_name(sandbox), *env,
                   "--entrypoint", argv[0], WORKLOAD_IMAGE, *argv[1:]),
        capture_output=True, text=True, timeout=timeout, check=False,
        env={**local.env(), **({"RAY_AUTH_TOKEN": token} if token else {})},
    )  # fmt: skip


def test_a_ray_client_without_the_token_is_refused(cluster):
    address = f"ray://{cluster.head.address}:10001"
    refused = from_another_machine(cluster, "python3", "-c", CLIENT, address)
    assert refused.returncode != 0 and "RAN" not in refused.stdout, refused.stdout
    token = cluster.ray_token.resolve()
    allowed = from_another_machine(cluster, "python3", "-c", CLIENT, address, token=token)
    assert allowed.returncode == 0 and "RAN 0" in allowed.stdout, allowed.stderr[-2000:]


def test_ray_status_without_the_token_is_refused(cluster):
    address = f"{cluster.head.address}:{cluster.ports.ray}"
    refused = from_another_machine(cluster, "ray", "status", f"--address={address}")
    assert refused.returncode != 0, refused.stdout
    assert "node_" not in refused.stdout
    token = cluster.ray_token.resolve()
    allowed = from_another_machine(cluster, "ray", "status", f"--address={address}", token=token)
    assert allowed.returncode == 0 and "node_" in allowed.stdout, allowed.stderr[-2000:]


def test_vclusters_own_ray_steps_work_with_the_token(cluster, sandbox_inventory):
    status = vcluster("status", "--json", str(sandbox_inventory))
    document = json.loads(status.stdout)
    assert document["ray_nodes_alive"] == 2, document
    listed = vcluster("exec", str(sandbox_inventory), "--", "ray", "status")
    assert listed.returncode == 0 and listed.stdout.count("node_") >= 2, listed.stdout


def test_the_token_never_reaches_output_plans_or_argv(cluster, sandbox_inventory):
    token = cluster.ray_token.resolve()
    plan = vcluster("plan", "--json", str(sandbox_inventory))
    status = vcluster("status", "--json", str(sandbox_inventory))
    processes = vcluster("exec", str(sandbox_inventory), "--", "ps", "-eo", "args")
    for result in (plan, status, processes):
        assert token not in result.stdout + result.stderr
    assert "RAY_AUTH_TOKEN" in plan.stdout  # named, by reference


def test_check_lists_every_open_port_and_what_protects_it(cluster, sandbox_inventory):
    result = vcluster("check", "--json", str(sandbox_inventory))
    ports = {r["node"]: r for r in json.loads(result.stdout) if r["name"] == "ports"}
    head = ports[cluster.head.node_name]
    assert f"{cluster.ports.ray} Ray GCS (Ray token)" in head["detail"], head
    assert f"{cluster.ports.vllm} vLLM API (API key)" in head["detail"], head
    assert "8265" not in head["detail"]  # the dashboard listens on localhost only
    assert f"{cluster.ports.master} vLLM rendezvous" in head["detail"], head
    assert head["status"] == "WARN" and head["remedy"]  # the rendezvous has no authentication
