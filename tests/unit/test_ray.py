"""Ray's node list, as the head container prints it (captured on the 2-node sandbox)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.facts.ray import RayQueryError, alive_by_address, parse_ray_nodes, ray_nodes_argv

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "ray"


def test_both_sandbox_nodes_are_read_with_their_cpus():
    nodes = parse_ray_nodes((FIXTURES / "nodes-sandbox-2.txt").read_text())
    assert [(n.address, n.alive, n.cpus, n.gpus) for n in nodes] == [
        ("172.30.0.11", True, 2.0, 0.0),
        ("172.30.0.12", True, 2.0, 0.0),
    ]


def test_warnings_around_the_list_are_ignored():
    real = (FIXTURES / "nodes-sandbox-2.txt").read_text()
    noisy = f"2026-11-25 WARNING worker.py:1 Ray is slow today\n{real}\n(raylet) shutting down\n"
    assert len(parse_ray_nodes(noisy)) == 2


def test_a_dead_entry_of_a_restarted_node_does_not_hide_the_live_one():
    real = (FIXTURES / "nodes-sandbox-2.txt").read_text()
    restarted = real.replace('"alive": true', '"alive": false', 1).replace(
        "[{", '[{"address": "172.30.0.11", "alive": true, "resources": {"CPU": 2.0}}, {', 1
    )
    alive = alive_by_address(parse_ray_nodes(restarted))
    assert set(alive) == {"172.30.0.11", "172.30.0.12"}


def test_output_without_the_list_is_an_error_naming_what_was_printed():
    with pytest.raises(RayQueryError, match="ConnectionError"):
        parse_ray_nodes("ConnectionError: could not connect to 172.30.0.11:6379\n")


def test_the_head_address_is_an_argument_not_part_of_the_script():
    argv = ray_nodes_argv("10.0.0.1", 6379)
    assert argv[-1] == "10.0.0.1:6379"
    assert "10.0.0.1" not in argv[2]


def test_a_real_h200_node_is_read_with_its_two_gpus_and_agrees_with_nvidia_smi():
    # vcluster's own query (RAY_NODES_SCRIPT) against Ray 2.60.0 with token authentication on a
    # lent 2 x H200 machine (tests/fixtures/ray/capture-h200.sh)
    from cluster.decide.checks import Status, check_ray_nodes
    from cluster.facts.host import parse_probe
    from tests.support.probe_output import H200X2, read

    [node] = parse_ray_nodes((FIXTURES / "h200x2" / "ray-nodes.txt").read_text())
    assert (node.address, node.alive, node.gpus, node.cpus) == ("192.0.2.2", True, 2.0, 32.0)
    facts = {"gpu-1": parse_probe(read(H200X2 / "probe.txt"))}  # nvidia-smi on the same machine
    [agrees] = check_ray_nodes(facts, {"gpu-1": node.gpus})
    assert agrees.status is Status.PASS and agrees.detail == "alive with 2 GPUs"
    [wrong] = check_ray_nodes(facts, {"gpu-1": 1.0})
    assert wrong.status is Status.FAIL and "Ray sees 1 GPUs, nvidia-smi 2" in wrong.detail
