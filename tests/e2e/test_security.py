"""Only the cluster can use its Ray: clients from another machine of the same network, without
the cluster's token, are refused by the Ray client server and by the GCS; vcluster's own Ray
steps (which run inside the containers, with the token) keep working; `check` lists every port.
The endpoint is vcluster's router: without the key every route but /health is refused, with it
only the OpenAI routes reach vLLM; no secret is in a container's environment.

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

pytestmark = [pytest.mark.e2e, pytest.mark.stage("real")]

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


DOORS = """\
import http.client, json, sys
host, port, key = sys.argv[1], int(sys.argv[2]), sys.argv[3]
paths = json.loads(sys.argv[4])
seen = {}
for path in paths:
    for method in ("GET", "POST"):
        for name, headers in (("none", {}), ("key", {"Authorization": "Bearer " + key})):
            connection = http.client.HTTPConnection(host, port, timeout=60)
            body = json.dumps({"model": "tiny-llama", "prompt": "hi", "max_tokens": 2,
                               "messages": [{"role": "user", "content": "hi"}]})
            connection.request(method, path, body=body if method == "POST" else None,
                               headers={"Content-Type": "application/json", **headers})
            reply = connection.getresponse()
            seen[f"{method} {path} {name}"] = [reply.status, reply.read().decode()[:200]]
            connection.close()
print(json.dumps(seen))
"""
DOOR_PATHS = [
    "/invocations", "/tokenize", "/detokenize", "/metrics", "/pause", "/resume", "/ping",
    "/version", "/load", "/server_info", "/reset_prefix_cache", "/sleep", "/wake_up",
    "/is_sleeping", "/collective_rpc", "/pooling", "/classify", "/score", "/rerank", "/docs",
    "/v1/load_lora_adapter", "/vcluster/models", "/vcluster/unload?model=tiny-llama",
    "/v1/../pause", "/v1/%2e%2e/pause", "/v1/%2E%2E/invocations", "/v1%2fmodels",
    "/v1/models", "/v1/chat/completions", "/v1/completions",
]  # fmt: skip


def test_without_the_key_every_route_of_the_endpoint_but_health_is_refused(cluster):
    key = cluster.secrets.api_key.resolve()
    result = from_another_machine(
        cluster, "python3", "-c", DOORS, cluster.head.address, str(cluster.ports.vllm), key,
        json.dumps([*DOOR_PATHS, "/health"]),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    seen = json.loads(result.stdout)
    for request, (status, body) in seen.items():
        method, path, given = request.split()
        if path == "/health":  # the one route without the key: GET only
            assert status == (200 if method == "GET" else 404), (request, body)
        elif given == "none":
            assert status in (400, 401), (request, status, body)
        elif "%" in path or "/.." in path:
            assert status == 400, (request, status, body)
        elif path in ("/v1/models", "/vcluster/models") and method == "GET":
            assert status == 200, (request, status, body)
        elif path in ("/v1/chat/completions", "/v1/completions") and method == "POST":
            assert status == 200 and "choices" in body, (request, status, body)
        elif path == "/vcluster/unload?model=tiny-llama":
            assert status in (404, 409), (request, status, body)
        else:  # vLLM's other routes never pass the router
            assert status in (404, 405), (request, status, body)


def test_no_secret_is_in_the_containers_environment(cluster):
    token = cluster.ray_token.resolve()
    key = cluster.secrets.api_key.resolve()
    inspected = vcluster("exec", str(cluster.source), "--", "cat", "/proc/1/environ")
    assert inspected.returncode == 0, inspected.stderr
    assert token not in inspected.stdout and key not in inspected.stdout
    assert "RAY_AUTH_TOKEN_PATH=/var/lib/vcluster/secrets/ray-token" in inspected.stdout
    mode = vcluster("exec", str(cluster.source), "--", "stat", "-c", "%a %U",
                    "/var/lib/vcluster/secrets", "/var/lib/vcluster/secrets/ray-token")  # fmt: skip
    assert mode.stdout.split("\n")[:2] == ["700 root", "400 root"], mode.stdout


def test_a_ray_client_without_the_token_is_refused(cluster):
    address = f"ray://{cluster.head.address}:10001"
    refused = from_another_machine(cluster, "python3", "-c", CLIENT, address)
    assert refused.returncode != 0 and "RAN" not in refused.stdout, refused.stdout
    token = cluster.ray_token.resolve()
    allowed = from_another_machine(cluster, "python3", "-c", CLIENT, address, token=token)
    if allowed.returncode != 0 and "Starting Ray client server failed" in allowed.stderr:
        # Ray's client proxy starts a server process per client; once in a CI run (2026-12-05)
        # that process ended at its start right after the refused client, and a second client
        # moments later ran. A second refusal of the token fails below, with Ray's own log.
        allowed = from_another_machine(cluster, "python3", "-c", CLIENT, address, token=token)
    assert allowed.returncode == 0 and "RAN 0" in allowed.stdout, allowed.stderr[
        -2000:
    ] + client_server_log(cluster)


def client_server_log(cluster) -> str:
    """The Ray client servers' error logs in the head container, for a failure's message."""
    script = "tail -n 20 /tmp/ray/session_latest/logs/ray_client_server_*.err 2>/dev/null"
    shown = vcluster("exec", str(cluster.source), "--", "sh", "-c", script)
    return "\nRay's client server logs:\n" + shown.stdout[-3000:]


def test_ray_status_without_the_token_is_refused(cluster):
    address = f"{cluster.head.address}:{cluster.ports.ray}"
    refused = from_another_machine(cluster, "ray", "status", f"--address={address}")
    assert refused.returncode != 0, refused.stdout
    assert "node_" not in refused.stdout
    token = cluster.ray_token.resolve()
    allowed = from_another_machine(cluster, "ray", "status", f"--address={address}", token=token)
    assert allowed.returncode == 0 and "node_" in allowed.stdout, allowed.stderr[-2000:]


def test_vclusters_own_ray_steps_work_with_the_token(cluster):
    status = vcluster("status", "--json", str(cluster.source))
    document = json.loads(status.stdout)
    assert document["ray_nodes_alive"] == 2, document
    listed = vcluster("exec", str(cluster.source), "--", "ray", "status")
    assert listed.returncode == 0 and listed.stdout.count("node_") >= 2, listed.stdout


def test_the_token_never_reaches_output_plans_or_argv(cluster):
    token = cluster.ray_token.resolve()
    plan = vcluster("plan", "--json", str(cluster.source))
    status = vcluster("status", "--json", str(cluster.source))
    processes = vcluster("exec", str(cluster.source), "--", "ps", "-eo", "args")
    for result in (plan, status, processes):
        assert token not in result.stdout + result.stderr
    assert "ray-token" in plan.stdout  # named, by reference


def test_check_lists_every_open_port_and_what_protects_it(cluster):
    result = vcluster("check", "--json", str(cluster.source))
    ports = {r["node"]: r for r in json.loads(result.stdout) if r["name"] == "ports"}
    head = ports[cluster.head.node_name]
    assert f"{cluster.ports.ray} Ray GCS (Ray token)" in head["detail"], head
    assert f"{cluster.ports.vllm} router (the endpoint) (API key)" in head["detail"], head
    assert f"{cluster.ports.models} vLLM API" not in head["detail"]  # on loopback only
    assert "8265" not in head["detail"]  # the dashboard listens on localhost only
    # the rendezvous has no authentication: the firewall keeps it for the cluster's nodes
    rendezvous = f"{cluster.ports.master} vLLM rendezvous (torch.distributed store) (cluster nodes"
    assert rendezvous in head["detail"], head
