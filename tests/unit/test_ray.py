"""Ray's node list, as the head container prints it (captured on the 2-node sandbox)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.ray import RayQueryError, alive_by_address, parse_ray_nodes, ray_nodes_argv

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
