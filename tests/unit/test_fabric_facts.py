"""Fabric facts: the multicast program, `nvidia-smi -q -x`'s fabric state, InfiniBand/RoCE from
sysfs, GPUDirect RDMA; what they change in the containers, and the HCA preflight.

Real captures: `fixtures/fabric/h100x1/` (a lent H100, 2026-12-05), `fixtures/gpu/*/nvidia-smi-q.xml`.
Constructed, not captured (see fixtures/fabric/README.md): the sysfs trees of
`fixtures/fabric/constructed/` (built from the kernel's documented layout), which the real
probe script reads here, and the multicast results of a try.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from cluster.cli.plan_text import render_text
from cluster.decide.checks import CheckInput, Status, check_infiniband
from cluster.decide.inventory import Inventory
from cluster.decide.plan import MEMLOCK_UNLIMITED, NodeFacts, build_plan
from cluster.facts.fabric import (
    INFINIBAND_SCRIPT,
    Gid,
    HcaPort,
    InfinibandFacts,
    Multicast,
    multicast_program,
    parse_fabric_state,
    parse_infiniband,
    parse_multicast,
    parse_nccl_ranks,
    rdma_setup,
    sockets_despite_hcas,
)
from cluster.facts.host import HostFacts, parse_probe
from cluster.facts.probe import probe_argv
from tests.support.probe_output import FABRIC, H200, H200X2, compose_probe, h200_sections, read

H100 = FABRIC / "h100x1"
CONSTRUCTED = FABRIC / "constructed"
PEERMEM = "nvidia_peermem 16384 0 - Live 0x0000000000000000\nib_uverbs 200704 2 rdma_ucm, Live 0x0"


def sysfs(tree: str) -> str:
    """The real probe script's output on a constructed tree (absolute paths, as on a host)."""
    base = (CONSTRUCTED / tree).resolve()
    done = subprocess.run(
        ["sh", "-c", INFINIBAND_SCRIPT, "sh", str(base / "sys"), str(base / "dev")],
        capture_output=True, text=True, check=True, timeout=30,
    )  # fmt: skip
    return done.stdout


def host(tree: str | None, modules: str = PEERMEM) -> HostFacts:
    """The 8 x H200 probe with the HCAs of a constructed tree (None: no HCA at all)."""
    infiniband = sysfs(tree) if tree else ""
    sections = {**h200_sections(), "infiniband": (0, infiniband, ""),
                "rdma-modules": (0 if modules else 1, modules, "")}  # fmt: skip
    return parse_probe(compose_probe(sections))


# --- the multicast program -----------------------------------------------------------------


def test_the_program_runs_on_python_3_8():
    ast.parse(multicast_program(), feature_version=(3, 8))


@pytest.mark.parametrize("mode", ["try", "read"])
def test_without_a_cuda_driver_it_says_so_and_exits_0(mode: str):
    if Path("/usr/lib/x86_64-linux-gnu/libcuda.so.1").exists():
        pytest.skip("this machine has a CUDA driver")
    done = subprocess.run([sys.executable, "-c", multicast_program(), mode],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0
    facts = parse_multicast(done.stdout, done.returncode, done.stderr)
    assert facts.problem.startswith("no CUDA driver")
    assert facts.verdict is Multicast.UNKNOWN


@pytest.fixture(scope="module")
def fake_driver(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/support/fake_libcuda.c built as libcuda.so.1: the driver API's signatures, with
    the argument checks the real driver makes (it answers CUDA_ERROR_INVALID_VALUE otherwise)."""
    if shutil.which("cc") is None:
        pytest.skip("needs a C compiler")
    directory = tmp_path_factory.mktemp("driver")
    source = Path(__file__).resolve().parents[1] / "support" / "fake_libcuda.c"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(directory / "libcuda.so.1"), str(source)],
                   check=True)  # fmt: skip
    return directory


def run_with_driver(driver: Path, mode: str = "try", **settings: str) -> Any:
    environment = {"PATH": "/usr/bin:/bin", "LD_LIBRARY_PATH": str(driver), **settings}
    done = subprocess.run([sys.executable, "-c", multicast_program(), mode], env=environment,
                          capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    return parse_multicast(done.stdout)


def test_the_try_binds_every_gpu_through_the_driver_api(fake_driver: Path):
    facts = run_with_driver(fake_driver)
    assert [g.bus_id for g in facts.gpus] == ["0000:00:06.0", "0000:00:07.0"]
    assert facts.tried and facts.failed_call is None
    binds = [(c.call, c.gpu) for c in facts.calls if c.call.startswith("cuMulticast")]
    assert binds == [
        ("cuMulticastGetGranularity", None), ("cuMulticastCreate", None),
        ("cuMulticastAddDevice", 0), ("cuMulticastAddDevice", 1),
        ("cuMulticastBindMem", 0), ("cuMulticastUnbind", 0),
        ("cuMulticastBindMem", 1), ("cuMulticastUnbind", 1),
    ]  # fmt: skip
    assert facts.verdict is Multicast.YES


def test_a_bind_the_driver_refuses_is_reported_with_its_code(fake_driver: Path):
    facts = run_with_driver(fake_driver, FAKE_CUDA_BIND_FAIL="1")
    assert facts.verdict is Multicast.NO
    assert (
        facts.failed_call.shown() == "cuMulticastBindMem on GPU 1: CUDA_ERROR_ILLEGAL_STATE (401)"
    )


def test_attribute_0_is_not_tried(fake_driver: Path):
    facts = run_with_driver(fake_driver, FAKE_CUDA_MULTICAST="0")
    assert not facts.tried and facts.calls == ()
    assert facts.not_tried == "the multicast attribute is not 1 on every GPU"
    assert facts.verdict is Multicast.NO


def test_read_mode_creates_nothing(fake_driver: Path):
    facts = run_with_driver(fake_driver, "read")
    assert facts.calls == () and facts.verdict is Multicast.UNKNOWN


def test_the_lent_h100_reads_attribute_0_in_read_mode():
    facts = parse_multicast(read(H100 / "multicast-read.txt"))
    assert facts.driver_version == 13000
    (gpu,) = facts.gpus
    assert (gpu.bus_id, gpu.name, gpu.attribute) == ("0000:00:06.0", "NVIDIA H100 80GB HBM3", 0)
    assert not facts.tried and facts.not_tried == "read mode"
    assert facts.verdict is Multicast.NO
    assert facts.explain() == "the driver's multicast attribute is 0 on GPU 0"


def test_a_try_that_bound_every_gpu_says_yes():
    facts = parse_multicast(read(CONSTRUCTED / "multicast-try-h200x8-bound.txt"))
    assert facts.verdict is Multicast.YES
    assert "created and bound" in facts.explain()


def test_attribute_1_with_a_failing_bind_says_no_and_names_the_call():
    facts = parse_multicast(read(CONSTRUCTED / "multicast-try-h200x2-bind-401.txt"))
    assert all(gpu.attribute == 1 for gpu in facts.gpus)
    assert facts.verdict is Multicast.NO
    assert facts.explain() == (
        "the attribute says 1, but cuMulticastBindMem on GPU 0: CUDA_ERROR_ILLEGAL_STATE (401)"
    )


def test_attribute_1_not_tried_is_unknown():
    line = read(CONSTRUCTED / "multicast-try-h200x8-bound.txt")
    untried = line.replace('"tried": true', '"tried": false').replace(
        '"mode": "try"', '"mode": "read"'
    )
    assert parse_multicast(untried).verdict is Multicast.UNKNOWN


def test_a_failing_cuinit_is_the_problem():
    output = ('VCLUSTER-MULTICAST {"driver": 13000, "error": null, "gpus": [], "init": '
              '{"code": 100, "name": "CUDA_ERROR_NO_DEVICE"}, "mode": "try", "not_tried": '
              '"no GPU", "steps": [], "tried": false}')  # fmt: skip
    facts = parse_multicast(output)
    assert facts.problem == "cuInit failed: CUDA_ERROR_NO_DEVICE (100)"
    assert facts.verdict is Multicast.UNKNOWN


@pytest.mark.parametrize(
    ("exit_code", "stdout", "stderr", "expected"),
    [
        (None, "python3", "", "python3 is not installed"),
        (124, "", "", "timed out"),
        (1, "", "Traceback ...\nSyntaxError: invalid syntax", "SyntaxError: invalid syntax"),
        (0, "VCLUSTER-MULTICAST {not json", "", "unreadable"),
    ],
)
def test_no_result_leaves_multicast_unknown_with_the_reason(
    exit_code: int | None, stdout: str, stderr: str, expected: str
):
    facts = parse_multicast(stdout, exit_code, stderr)
    assert expected in facts.problem
    assert facts.verdict is Multicast.UNKNOWN


# --- nvidia-smi -q -x ----------------------------------------------------------------------


def test_an_nvswitch_host_reports_its_fabric_registered():
    states = parse_fabric_state(read(H200 / "nvidia-smi-q.xml"))
    assert len(states) == 8
    assert {(s.state, s.status) for s in states} == {("Completed", "Success")}
    assert states[0].bus_id == "00000000:00:06.0" and states[0].product == "NVIDIA H200"


def test_the_lent_h100_has_no_fabric_and_is_passed_through():
    (state,) = parse_fabric_state(read(H100 / "nvidia-smi-q.xml"))
    assert (state.state, state.status, state.virtualization) == (None, None, "Pass-Through")


def test_the_h200_pair_says_completed_although_multicast_is_missing():
    # the fabric state alone is no proof: this pair's multicast pointer was null (tp-probe)
    states = parse_fabric_state(read(H200X2 / "nvidia-smi-q.xml"))
    assert {s.state for s in states} == {"Completed"}


def test_unreadable_xml_gives_no_states():
    assert parse_fabric_state("Failed to initialize NVML") == ()


# --- InfiniBand / RoCE from sysfs ----------------------------------------------------------


def test_infiniband_two_active_hcas_each_with_its_network_device():
    ib = parse_infiniband(sysfs("ib-two-hcas"))
    assert [p.name for p in ib.active_ports] == ["mlx5_0:1", "mlx5_1:1"]
    assert {p.link_layer for p in ib.ports} == {"InfiniBand"}
    assert ib.ports[0].rate_gbit == 400.0
    assert ib.netdevs == {"mlx5_0": ("ib0",), "mlx5_1": ("ib1",)}
    assert "uverbs0" in ib.device_files and "rdma_cm" in ib.device_files
    assert ib.ports[0].gids == ()  # the GID table is read for RoCE only


def test_roce_port_gid_table_and_a_port_that_is_down():
    ib = parse_infiniband(sysfs("roce-one-active"))
    active, down = ib.ports
    assert (active.state, active.physical_state, active.roce) == ("ACTIVE", "LinkUp", True)
    assert (down.state, down.physical_state, down.active) == ("DOWN", "Disabled", False)
    assert [(g.index, g.type) for g in active.gids] == [
        (0, "IB/RoCE v1"), (1, "RoCE v2"), (2, "IB/RoCE v1"), (3, "RoCE v2"),
    ]  # fmt: skip
    assert active.gids[3].netdev == "ens1f0np0"
    assert active.roce_v2_gid_index() == 3
    assert ib.netdevs["mlx5_1"] == ("ens1f1np1",)


def test_no_infiniband_at_all_prints_nothing(tmp_path: Path):
    done = subprocess.run(["sh", "-c", INFINIBAND_SCRIPT, "sh", str(tmp_path / "none")],
                          capture_output=True, text=True, check=True)  # fmt: skip
    assert done.stdout == ""
    assert parse_infiniband(done.stdout).ports == ()


def test_the_lent_h100_has_no_hca_but_an_rdma_cm_device():
    fabric = parse_probe(read(H100 / "probe.txt")).fabric
    assert fabric.infiniband.read and fabric.infiniband.ports == ()
    assert fabric.infiniband.device_files == ("rdma_cm",)
    assert fabric.modules == () and fabric.peer_memory is False
    assert fabric.summary() == "NVLink multicast no, no active HCA"


@pytest.mark.parametrize(
    ("gids", "index"),
    [
        ([("fe80:0000:0000:0000:0000:0000:0000:0001", "RoCE v2"),
          ("0000:0000:0000:0000:0000:ffff:0a00:0001", "IB/RoCE v1"),
          ("0000:0000:0000:0000:0000:ffff:0a00:0001", "RoCE v2")], 2),
        ([("fe80:0000:0000:0000:0000:0000:0000:0001", "RoCE v2"),
          ("2001:0db8:0000:0000:0000:0000:0000:0001", "RoCE v2")], 1),
        ([("fe80:0000:0000:0000:0000:0000:0000:0001", "RoCE v2")], None),
        ([("0000:0000:0000:0000:0000:ffff:0a00:0001", "IB/RoCE v1")], None),
    ],
)  # fmt: skip
def test_the_roce_v2_gid_prefers_an_ipv4_address_then_a_global_one(gids: list, index: int | None):
    port = HcaPort("mlx5_0", 1, "ACTIVE", "LinkUp", "Ethernet",
                   gids=tuple(Gid(i, gid, kind, "eth0") for i, (gid, kind) in enumerate(gids)))  # fmt: skip
    assert port.roce_v2_gid_index() == index


def test_the_probe_run_here_reads_every_fabric_section():
    done = subprocess.run(probe_argv(head_address="127.0.0.1", model_cache="/"),
                          capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
    fabric = parse_probe(done.stdout).fabric
    assert fabric.multicast.problem is not None  # no GPU here: the reason, not a verdict
    assert fabric.infiniband.read


# --- what the facts change: NCCL's settings and the containers ------------------------------


def test_infiniband_gives_nccl_the_exact_hca_ports():
    setup = rdma_setup(parse_infiniband(sysfs("ib-two-hcas")))
    assert setup.environment == {"NCCL_IB_HCA": "=mlx5_0:1,mlx5_1:1"}
    assert setup.devices == ("/dev/infiniband",)


def test_roce_gives_nccl_the_gid_index_and_leaves_the_down_port_out():
    setup = rdma_setup(parse_infiniband(sysfs("roce-one-active")))
    assert setup.environment == {"NCCL_IB_HCA": "=mlx5_0:1", "NCCL_IB_GID_INDEX": "3"}


def test_the_inventory_names_the_hcas_to_use():
    setup = rdma_setup(parse_infiniband(sysfs("ib-two-hcas")), ["mlx5_1"])
    assert setup.environment["NCCL_IB_HCA"] == "=mlx5_1:1"


def test_roce_ports_that_disagree_on_the_gid_index_leave_it_to_nccl():
    port = parse_infiniband(sysfs("roce-one-active")).ports[0]
    other = replace(
        port, hca="mlx5_2", gids=tuple(replace(g, index=g.index + 1) for g in port.gids)
    )
    setup = rdma_setup(InfinibandFacts(ports=(port, other)))
    assert "NCCL_IB_GID_INDEX" not in setup.environment
    assert "left to NCCL" in setup.note


def test_no_active_port_means_no_rdma_setup():
    assert rdma_setup(parse_infiniband("")) is None
    assert rdma_setup(parse_infiniband(sysfs("ib-two-hcas")), ["mlx5_9"]) is None


def inventory(nodes: int = 2, **changes: Any) -> Inventory:
    data: dict[str, Any] = {
        "cluster": "demo",
        "image": "vllm/vllm-openai:v0.26.0",
        "nodes": [{"name": f"n{i}", "address": f"10.0.0.{i + 1}"} for i in range(nodes)],
        "model_cache": "/data/hf",
        "model": {"name": "org/model"},
        "secrets": {"api_key": "env:USERS_KEY"},
        **changes,
    }
    return Inventory.model_validate(data)


def plan_with(inv: Inventory, hosts: list[HostFacts] | None) -> Any:
    facts = {
        n.node_name: NodeFacts(
            n.address, 8, "NVIDIA H200", "eth0", fabric=hosts[i].fabric if hosts else None
        )
        for i, n in enumerate(inv.nodes)
    }
    return build_plan(inv, facts)


def test_containers_get_the_hcas_memlock_and_ipc_lock_on_an_infiniband_cluster():
    inv = inventory()
    plan = plan_with(inv, [host("ib-two-hcas"), host("ib-two-hcas")])
    for node in plan.nodes:
        c = node.container
        assert c.devices == ("/dev/infiniband",)
        assert c.ulimits == (MEMLOCK_UNLIMITED,) and MEMLOCK_UNLIMITED.soft == -1
        assert c.cap_add == ("IPC_LOCK",)
        assert c.environment["NCCL_IB_HCA"] == "=mlx5_0:1,mlx5_1:1"
        assert c.environment["NCCL_SOCKET_IFNAME"] == "eth0"  # bootstrap stays on sockets
    text = render_text(plan)
    assert "--device /dev/infiniband --ulimit memlock=-1:-1 --cap-add IPC_LOCK" in text


def test_containers_without_hcas_are_as_before_and_keep_their_spec_hash():
    inv = inventory()
    without = plan_with(inv, [host(None), host(None)])
    unprobed = plan_with(inv, None)
    for node, before in zip(without.nodes, unprobed.nodes, strict=True):
        assert (node.container.devices, node.container.ulimits, node.container.cap_add) == (
            (), (), ())  # fmt: skip
        assert "NCCL_IB_HCA" not in node.container.environment
        assert node.container.spec_hash == before.container.spec_hash


def test_the_hcas_change_the_spec_hash():
    inv = inventory()
    plain = plan_with(inv, [host(None), host(None)])
    rdma = plan_with(inv, [host("ib-two-hcas"), host("ib-two-hcas")])
    assert plain.head.container.spec_hash != rdma.head.container.spec_hash


def test_one_node_needs_no_hca_in_its_container():
    plan = plan_with(inventory(nodes=1), [host("ib-two-hcas")])
    assert plan.head.container.devices == ()


def test_nccl_ib_disable_in_env_keeps_the_hcas_out():
    plan = plan_with(inventory(env={"NCCL_IB_DISABLE": "1"}),
                     [host("ib-two-hcas"), host("ib-two-hcas")])  # fmt: skip
    assert plan.head.container.devices == ()


def test_the_users_own_nccl_ib_hca_wins():
    plan = plan_with(inventory(env={"NCCL_IB_HCA": "mlx5_1"}),
                     [host("ib-two-hcas"), host("ib-two-hcas")])  # fmt: skip
    assert plan.head.container.environment["NCCL_IB_HCA"] == "mlx5_1"
    assert plan.head.container.devices == ("/dev/infiniband",)


# --- the HCA preflight ---------------------------------------------------------------------


def preflight(inv: Inventory, *hosts: HostFacts) -> list:
    facts = {n.node_name: h for n, h in zip(inv.nodes, hosts, strict=True)}
    return check_infiniband(CheckInput(inv, facts))


def statuses(results: list) -> list[tuple[str, str | None]]:
    return [(r.status.value, r.node) for r in results]


def test_active_hcas_on_every_node_pass():
    results = preflight(inventory(), host("ib-two-hcas"), host("ib-two-hcas"))
    assert statuses(results) == [("PASS", "n0"), ("PASS", "n1")]
    assert "mlx5_0:1 (InfiniBand, 400 Gb/sec (4X NDR))" in results[0].detail


def test_no_hca_anywhere_passes_with_sockets():
    (result,) = preflight(inventory(), host(None), host(None))
    assert result.status is Status.PASS and "TCP sockets" in result.detail


def test_a_node_without_active_hcas_among_nodes_with_them_fails_by_name():
    results = preflight(inventory(), host("ib-two-hcas"), host(None))
    failed = [r for r in results if r.status is Status.FAIL]
    assert [r.node for r in failed] == ["n1"]
    assert "n0: 2" in failed[0].detail and "ibstat" in failed[0].remedy


def test_a_named_hca_that_is_down_fails():
    inv = inventory(network={"ib_hcas": ["mlx5_1"]})
    results = preflight(inv, host("roce-one-active"), host("roce-one-active"))
    assert statuses(results) == [("FAIL", "n0"), ("FAIL", "n1")]
    assert "mlx5_1:1 DOWN/Disabled" in results[0].detail


def test_different_link_layers_fail():
    results = preflight(inventory(), host("ib-two-hcas"), host("roce-one-active"))
    (layers,) = [r for r in results if "link layer" in r.detail]
    assert layers.status is Status.FAIL
    (count,) = [r for r in results if "differ in number" in r.detail]
    assert count.status is Status.WARN


def test_no_gpudirect_rdma_module_is_a_warning():
    results = preflight(inventory(), host("ib-two-hcas", modules=""), host("ib-two-hcas"))
    (warning,) = results
    assert (warning.status, warning.node) == (Status.WARN, "n0")
    assert "nvidia_peermem" in warning.detail


def test_active_hcas_without_uverbs_devices_fail(tmp_path: Path):
    facts = host("ib-two-hcas")
    ib = replace(facts.fabric.infiniband, device_files=("rdma_cm",))
    broken = replace(facts, fabric=replace(facts.fabric, infiniband=ib))
    results = preflight(inventory(), broken, host("ib-two-hcas"))
    assert [r.status for r in results if r.node == "n0"] == [Status.FAIL]
    assert "ib_uverbs" in results[0].remedy


def test_one_node_and_ib_disabled_skip():
    assert preflight(inventory(nodes=1), host("ib-two-hcas"))[0].status is Status.SKIP
    disabled = inventory(env={"NCCL_IB_DISABLE": "1"})
    assert preflight(disabled, host(None), host(None))[0].status is Status.SKIP


# --- NCCL's own word on its transport ------------------------------------------------------


def test_two_ranks_taken_for_two_hosts_crossed_over_sockets():
    ranks = parse_nccl_ranks(read(H100 / "nccl-2hosts-socket.txt"))
    assert [(r.rank, r.nodes, r.network, r.between_nodes, r.gdr) for r in ranks] == [
        (0, 2, "Socket", "Socket", False),
        (1, 2, "Socket", "Socket", False),
    ]
    assert ranks[0].ib_devices == ()  # `NET/IB : No device found.`


def test_one_rank_says_its_network_but_crosses_nothing():
    (rank,) = parse_nccl_ranks(read(H100 / "nccl-1rank.txt"))
    assert (rank.network, rank.transports, rank.between_nodes) == ("Socket", (), None)


def test_sockets_on_a_node_with_active_hcas_is_named():
    ranks = parse_nccl_ranks(read(H100 / "nccl-2hosts-socket.txt"))
    assert sockets_despite_hcas(ranks, active_ports=2) == (
        "NCCL used TCP sockets (NET/Socket) between the nodes on rank(s) 0, 1, although this "
        "node has 2 active HCA port(s)"
    )
    assert sockets_despite_hcas(ranks, active_ports=0) is None


def test_infiniband_with_gpudirect_rdma():
    # constructed from NCCL's INFO formats (no lent machine has an HCA)
    log = "\n".join([
        "gpu-a:7:7 [0] NCCL INFO NET/IB : Using [0]mlx5_0:1/IB [1]mlx5_1:1/IB [RO]; OOB ib0:10.0.0.1<0>",
        "gpu-a:7:7 [0] NCCL INFO Using network IB",
        "gpu-a:7:7 [0] NCCL INFO comm 0x5 rank 0 nRanks 16 nNodes 2 localRanks 8 localRank 0 MNNVL 0",
        "gpu-a:7:7 [0] NCCL INFO Channel 00/0 : 0[0] -> 1[1] via P2P/CUMEM/read",
        "gpu-a:7:7 [0] NCCL INFO Channel 00/0 : 8[0] -> 0[0] [receive] via NET/IB/0/GDRDMA",
    ])  # fmt: skip
    (rank,) = parse_nccl_ranks(log)
    assert rank.ib_devices == ("mlx5_0:1", "mlx5_1:1")
    assert rank.transports == ("P2P", "NET/IB") and rank.between_nodes == "IB"
    assert rank.gdr is True
    assert sockets_despite_hcas([rank], active_ports=2) is None


def test_a_try_that_could_not_allocate_leaves_multicast_unknown():
    line = read(CONSTRUCTED / "multicast-try-h200x8-bound.txt").replace(
        '{"call": "cuMemCreate", "code": 0, "gpu": 3, "name": "CUDA_SUCCESS"}',
        '{"call": "cuMemCreate", "code": 2, "gpu": 3, "name": "CUDA_ERROR_OUT_OF_MEMORY"}',
    )
    facts = parse_multicast(line)
    assert facts.verdict is Multicast.UNKNOWN
    assert "could not run: cuMemCreate on GPU 3: CUDA_ERROR_OUT_OF_MEMORY (2)" in facts.explain()
