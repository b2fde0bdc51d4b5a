"""The sandbox's pure parts: node plan, known_hosts, inventory, recipes, the image archive name."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from cluster.decide.inventory import load_inventory
from cluster.sandbox.dockerd import LocalDocker, dockerd_argv
from cluster.sandbox.images import (
    docker_build_argv,
    missing_wheels,
    read_lock,
    recipe_hash,
    wheel_pin,
)
from cluster.sandbox.inventory_file import inventory_text
from cluster.sandbox.keys import HostKey, known_hosts_text
from cluster.sandbox.nodes import (
    NodeSettings,
    SandboxError,
    docker_data_argv,
    node_spec,
    plan_nodes,
)
from cluster.sandbox.storage import (
    DISK,
    GIB,
    MEMORY,
    NodeStorage,
    choose_node_storage,
    mem_total_bytes,
    tmpfs_size,
)
from cluster.sandbox.transfer import archive_path
from tests.support.probe_output import FIXTURES, read

KEY = HostKey(Path("/w/host-keys/node-1/k"), "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB node-1")


def test_nodes_get_fixed_addresses_from_11_and_names_that_carry_the_sandbox():
    nodes = plan_nodes("demo", 3, "172.30.4.0/24")
    assert [n.address for n in nodes] == ["172.30.4.11", "172.30.4.12", "172.30.4.13"]
    assert [n.name for n in nodes] == ["node-1", "node-2", "node-3"]
    assert nodes[0].container == "vcluster-demo-node-1"
    assert nodes[0].volume == "vcluster-demo-node-1-docker"


def test_more_nodes_than_the_subnet_holds_is_an_error():
    with pytest.raises(SandboxError):
        plan_nodes("demo", 10, "172.30.4.0/28")


def test_known_hosts_lists_each_address_with_its_key_and_no_comment():
    text = known_hosts_text([("172.30.0.11", KEY)])
    assert text == "172.30.0.11 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB\n"


ON_DISK = NodeStorage(DISK, 0, "asked for")
IN_MEMORY = NodeStorage(MEMORY, 6 * GIB, "asked for")
IMAGE_BYTES = 2_010_000_000  # the workload image's size on this kind of machine


def _spec(storage: NodeStorage = ON_DISK, **changes: str) -> str:
    node = plan_nodes("demo", 1, "172.30.0.0/24")[0]
    settings = NodeSettings("sha256:a", "ssh-ed25519 AAA user", storage, "sha256:w1")
    return node_spec(node, KEY, replace(settings, **changes))


def test_a_node_spec_changes_with_the_node_image_the_authorized_key_and_the_storage():
    assert _spec() == _spec()
    assert _spec() != _spec(node_image_id="sha256:b")
    assert _spec() != _spec(authorized="ssh-ed25519 BBB user")
    assert _spec() != _spec(IN_MEMORY)


def test_a_new_workload_image_restarts_nodes_in_memory_but_not_on_disk():
    assert _spec(IN_MEMORY) != _spec(IN_MEMORY, workload_image_id="sha256:w2")
    assert _spec(ON_DISK) == _spec(ON_DISK, workload_image_id="sha256:w2")


def test_a_node_keeps_its_docker_data_in_an_executable_tmpfs_or_on_its_own_volume():
    node = plan_nodes("demo", 1, "172.30.0.0/24")[0]
    assert docker_data_argv(node, IN_MEMORY) == [
        "--tmpfs", f"/var/lib/docker:exec,size={6 * GIB}",
    ]  # fmt: skip
    assert docker_data_argv(node, ON_DISK) == [
        "--mount", "type=volume,source=vcluster-demo-node-1-docker,target=/var/lib/docker",
    ]  # fmt: skip


def test_each_tmpfs_holds_three_times_the_image_in_whole_gib():
    assert tmpfs_size(IMAGE_BYTES) == 6 * GIB
    assert tmpfs_size(GIB) == 3 * GIB


def test_the_machines_memory_is_read_from_a_real_proc_meminfo():
    meminfo = read(FIXTURES / "meminfo" / "debian12-2core-24g.txt")
    assert mem_total_bytes(meminfo) == 24684096 * 1024


def test_auto_keeps_two_nodes_in_memory_on_the_projects_24_gib_machine():
    memory = mem_total_bytes(read(FIXTURES / "meminfo" / "debian12-2core-24g.txt"))
    chosen = choose_node_storage("auto", 2, IMAGE_BYTES, memory)
    assert (chosen.mode, chosen.tmpfs_bytes) == (MEMORY, 6 * GIB)
    assert chosen.describe() == "Docker data in memory (tmpfs of 6 GiB per node)"
    assert (
        chosen.reason == "2 node(s) need about 11 GiB, within 60% of this machine's memory (14 GiB)"
    )


def test_auto_puts_nodes_on_disk_when_they_would_take_more_than_60_percent_of_memory():
    memory = mem_total_bytes(read(FIXTURES / "meminfo" / "debian12-2core-24g.txt"))
    chosen = choose_node_storage("auto", 3, IMAGE_BYTES, memory)
    assert (chosen.mode, chosen.tmpfs_bytes) == (DISK, 0)
    assert chosen.reason == (
        "3 node(s) would need about 17 GiB, more than 60% of this machine's memory (14 GiB); "
        "--node-storage memory overrides"
    )


def test_auto_leaves_a_sandbox_on_disk_there_whatever_its_size():
    chosen = choose_node_storage("auto", 1, IMAGE_BYTES, 512 * GIB, running_mode=DISK)
    assert chosen.mode == DISK
    assert "the running nodes keep theirs on disk" in chosen.reason


def test_auto_moves_a_sandbox_in_memory_to_disk_only_when_it_outgrows_memory():
    memory = mem_total_bytes(read(FIXTURES / "meminfo" / "debian12-2core-24g.txt"))
    assert choose_node_storage("auto", 1, IMAGE_BYTES, memory, running_mode=MEMORY).mode == MEMORY
    assert choose_node_storage("auto", 4, IMAGE_BYTES, memory, running_mode=MEMORY).mode == DISK


def test_memory_or_disk_asked_for_is_what_the_nodes_get_whatever_the_machine():
    squeezed = choose_node_storage("memory", 16, IMAGE_BYTES, 8 * GIB)
    assert squeezed.mode == MEMORY
    assert squeezed.reason.startswith("--node-storage memory; 16 node(s) may need 92 GiB, over 60%")
    assert choose_node_storage("disk", 1, IMAGE_BYTES, 512 * GIB).mode == DISK
    assert choose_node_storage("memory", 1, IMAGE_BYTES, 512 * GIB, DISK).mode == MEMORY
    with pytest.raises(ValueError, match="auto, memory, disk"):
        choose_node_storage("ramdisk", 1, IMAGE_BYTES, 8 * GIB)


def test_the_written_inventory_validates_and_points_into_the_workdir(tmp_path):
    nodes = plan_nodes("demo", 2, "172.30.0.0/24")
    path = tmp_path / "inventory.yaml"
    path.write_text(
        inventory_text(
            "demo",
            "vcluster/vllm-cpu:0.32.0",
            nodes,
            key_file=tmp_path / "id_ed25519",
            known_hosts=tmp_path / "known_hosts",
            api_key_file=tmp_path / "api-key",
        )
    )
    inventory = load_inventory(path)
    assert inventory.accelerator == "cpu"
    assert inventory.head.address == "172.30.0.11"
    assert inventory.model.name == "/data/hf/models/tiny-llama"
    assert inventory.model.args[:2] == ["--dtype", "bfloat16"]
    assert inventory.ssh.known_hosts == str(tmp_path / "known_hosts")


def test_a_recipe_hash_ignores_order_but_not_content():
    assert recipe_hash([("a", b"1"), ("b", b"2")]) == recipe_hash([("b", b"2"), ("a", b"1")])
    assert recipe_hash([("a", b"1")]) != recipe_hash([("a", b"2")])


def test_the_wheelhouse_lacks_exactly_the_pins_no_wheel_satisfies():
    pins = read_lock("torch==2.13.0+cpu\nTyping_Extensions==4.15.0\nray==2.60.0\n")
    files = [
        "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl",
        "typing_extensions-4.15.0-py3-none-any.whl",
        "ray-2.59.0-cp311-cp311-manylinux2014_x86_64.whl",
    ]
    assert wheel_pin(files[0]) == ("torch", "2.13.0+cpu")
    assert missing_wheels(pins, files) == {"ray": "2.60.0"}


def test_one_archive_per_image_id_with_a_file_name_safe_name():
    path = archive_path("vcluster/vllm-cpu:0.32.0", "sha256:0123456789abcdef0123", Path("/c"))
    assert path == Path("/c/vcluster_vllm-cpu_0.32.0@0123456789abcdef.tar")


def test_vclusters_own_dockerd_keeps_its_data_under_the_fixed_root():
    argv = dockerd_argv("dockerd")
    assert argv[argv.index("--data-root") + 1] == "/var/lib/vcluster/docker"


def test_image_builds_ask_docker_to_remove_the_containers_of_failed_steps_too():
    local = LocalDocker("unix:///run/vcluster/docker.sock", Path("/var/lib/vcluster/docker"), True)
    argv = docker_build_argv(local, "vcluster/node:bookworm", Path("/src/images/node"), "abc",
                             {"BASE_IMAGE": "vcluster/base:bookworm"})  # fmt: skip
    assert argv[argv.index("build") :] == [
        "build", "--network", "host", "--force-rm", "--tag", "vcluster/node:bookworm",
        "--label", "io.vcluster.recipe=abc", "--build-arg", "BASE_IMAGE=vcluster/base:bookworm",
        "/src/images/node",
    ]  # fmt: skip
