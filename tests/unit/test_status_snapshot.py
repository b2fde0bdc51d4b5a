"""`status` asks each node in one exec (cluster/nodes/status_snapshot.py) and the head for Ray in
another (cluster/nodes/status_head.py); the parsers read what those scripts printed.

Fixtures: `fixtures/status/` was printed by the scripts on this development machine (no GPU)
against its local Docker daemon: a running sandbox node container (no supervisor in it), a
name with no container, a daemon socket that does not exist, and a small container labelled
like a vLLM-executor worker without Ray holding a supervisor state file.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.errors import VclusterError
from cluster.facts.gpu import GpuProblemKind
from cluster.nodes.status_head import HEAD_NOT_RUNNING, parse_ray_view, ray_view_argv
from cluster.nodes.status_snapshot import SNAPSHOT_SCRIPT, parse_snapshot, snapshot_argv

FIXTURES = Path(__file__).parents[1] / "fixtures" / "status"
RAY_FIXTURES = Path(__file__).parents[1] / "fixtures" / "ray"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def test_a_running_container_gives_its_state_and_the_hosts_gpu_facts():
    snapshot = parse_snapshot(
        fixture("running-node-no-supervisor.txt"), "vcluster-e2e-node-1", "node-1"
    )
    assert snapshot.state is not None
    assert snapshot.state.running
    assert snapshot.state.image_id.startswith("sha256:")
    assert snapshot.state.started_at.startswith("2026-")
    assert snapshot.supervised is None  # the head's state file was not there
    assert snapshot.facts.gpu.problem is not None
    assert snapshot.facts.gpu.problem.kind is GpuProblemKind.NVIDIA_SMI_MISSING


def test_a_worker_of_vllms_own_executor_reports_its_supervisor():
    snapshot = parse_snapshot(fixture("mp-worker-with-supervisor.txt"), "vcluster-x", "node-2")
    assert snapshot.state is not None
    assert snapshot.state.executor == "mp"
    assert snapshot.state.ray is False
    assert snapshot.supervised is not None
    assert (snapshot.supervised.state, snapshot.supervised.restarts) == ("running", 2)
    assert snapshot.supervised.last_exit_cause == "exit 1"


def test_no_container_is_none_not_an_error():
    snapshot = parse_snapshot(fixture("no-container.txt"), "vcluster-nothing", "node-1")
    assert snapshot.state is None
    assert snapshot.supervised is None


def test_a_docker_engine_that_does_not_answer_is_the_nodes_one_line_error():
    with pytest.raises(VclusterError) as raised:
        parse_snapshot(fixture("docker-not-answering.txt"), "vcluster-nothing", "node-2")
    line = raised.value.one_line()
    assert line.startswith("node-2: Docker did not answer (Cannot connect to the Docker daemon")
    assert "docker info" in line


def test_cut_off_output_is_an_error_not_an_empty_node():
    cut = fixture("no-container.txt").split("@@vcluster container")[0]
    with pytest.raises(VclusterError, match="cut off"):
        parse_snapshot(cut, "vcluster-nothing", "node-1")


def test_the_script_gets_every_value_as_an_argument():
    argv = snapshot_argv("vcluster-c; rm -rf /", head=False, default_executor="mp")
    assert argv[:3] == ["sh", "-c", SNAPSHOT_SCRIPT]
    assert "vcluster-c; rm -rf /" in argv[4:]
    assert "vcluster-c" not in SNAPSHOT_SCRIPT


def test_ray_view_of_a_missing_head_container_says_it_is_not_running():
    assert parse_ray_view(fixture("ray-no-container.txt")) == (set(), {}, HEAD_NOT_RUNNING)


def test_ray_view_of_a_container_without_ray_is_no_error():
    assert parse_ray_view(fixture("ray-no-ray-container.txt")) == (set(), {}, None)


def test_ray_view_sums_the_alive_nodes_resources():
    output = (RAY_FIXTURES / "nodes-sandbox-2.txt").read_text()
    alive, resources, error = parse_ray_view(output)
    assert error is None
    assert alive == {"172.30.0.11", "172.30.0.12"}
    assert resources == {"CPU": 4.0, "GPU": 0.0}


def test_ray_view_of_a_ray_that_does_not_answer_is_an_error():
    assert parse_ray_view("Traceback ...\nConnectionError: GCS\n")[2] == "Ray head not answering"


def test_ray_view_runs_the_ray_query_after_the_containers_arguments():
    argv = ray_view_argv("vcluster-c", "10.0.0.1", 6379)
    assert argv[-1] == "10.0.0.1:6379"
    assert argv[4] == "vcluster-c"
