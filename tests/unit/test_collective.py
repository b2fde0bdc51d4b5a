"""The collective check: its program's arithmetic, its output read back (real runs on a lent
2 x H200 machine and a lent H100, NCCL), and its verdicts, NCCL's transport between the nodes
among them.

InfiniBand/RoCE runs are constructed, not captured (no lent machine has an HCA): NCCL INFO lines
in NCCL's documented formats, marked `constructed` where they appear.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import resource
import subprocess
from pathlib import Path
from typing import Any

import pytest

from cluster.cli.tables import figures_table
from cluster.decide.checks import Status, failed
from cluster.decide.collective_report import (
    CollectiveRun,
    NodeHcas,
    nvlink_bandwidth,
    parse_events,
    read_run,
    summary,
    transport_summary,
    verdicts,
)
from cluster.decide.inventory import Inventory
from cluster.decide.plan import NodeFacts, build_plan
from cluster.facts.fabric import INFINIBAND_SCRIPT, HcaPort, parse_infiniband, parse_nccl_ranks
from cluster.facts.gpu import parse_topology
from cluster.facts.host import parse_probe
from cluster.remote import collective
from cluster.remote.collective import MARK, MIB, bus_bandwidth, iterations_for
from cluster.report.collective_store import load_last_run, save_last_run
from cluster.steps.collective import node_configs, node_hcas, program_source, sizes
from tests.support.probe_output import compose_probe, h200_sections

REPO = Path(__file__).resolve().parents[2]
H200X2 = REPO / "tests" / "fixtures" / "collective" / "h200x2"
NV18 = parse_topology((H200X2 / "topo-m.txt").read_text())
H200X8 = parse_topology((REPO / "tests" / "fixtures" / "gpu" / "h200x8" / "topo-m.txt").read_text())
H100 = REPO / "tests" / "fixtures" / "collective" / "h100x1"
FABRIC = REPO / "tests" / "fixtures" / "fabric"


def text(name: str) -> str:
    return (H200X2 / name).read_text()


def one_node_run() -> CollectiveRun:
    return read_run({"node-1": text("one-node-2-gpus.txt")})


def test_bus_bandwidth_is_nccl_tests_all_reduce_formula():
    assert bus_bandwidth(100.0, 2) == 100.0
    assert bus_bandwidth(100.0, 8) == 175.0
    assert bus_bandwidth(100.0, 1) == 100.0


def test_small_sizes_get_more_timed_iterations_than_large_ones():
    assert iterations_for(MIB) == 20 and iterations_for(1024 * MIB) == 2
    assert sizes(1024) == [MIB, 4 * MIB, 16 * MIB, 64 * MIB, 256 * MIB, 1024 * MIB]
    assert sizes(16) == [MIB, 4 * MIB, 16 * MIB]


def test_events_are_found_even_where_two_ranks_wrote_on_one_line():
    # an earlier version of the program wrote with print(): two ranks' lines ran together
    raw = text("interleaved-by-print.txt")
    first_line = raw.splitlines()[0]
    assert first_line.count(MARK) == 2
    events = parse_events(raw)
    assert [e["event"] for e in events].count("joined") == 2
    assert [e["event"] for e in events].count("result") == 12
    assert parse_events(f'{MARK}{{"event": "joi') == []  # cut off by a kill


def test_a_real_run_on_two_h200s_reads_back_every_size_right_and_joined():
    run = one_node_run()
    assert {(e.node, e.rank) for e in run.joined} == {("node-1", 0), ("node-1", 1)}
    assert not run.errors and not run.silent
    largest = max(run.measurements, key=lambda m: (m.size, m.scope))
    assert largest.size == 1024 * MIB and largest.ranks == 2 and largest.correct
    assert 250e9 < largest.busbw < 450e9  # NV18 between the two GPUs


def test_nvlink_allows_18_links_of_25_gb_s_on_h200_and_nothing_is_expected_over_pcie():
    assert nvlink_bandwidth(NV18, "NVIDIA H200") == (450e9, "NV18: 18 x 25 GB/s")
    assert nvlink_bandwidth(H200X8, "NVIDIA H200")[0] == 450e9  # type: ignore[index]
    assert nvlink_bandwidth(NV18, "NVIDIA B200")[0] == 900e9  # type: ignore[index]
    pcie = dataclasses.replace(NV18, links={(0, 0): "X", (0, 1): "PXB", (1, 0): "PXB", (1, 1): "X"})
    assert nvlink_bandwidth(pcie, "NVIDIA H200") is None
    assert nvlink_bandwidth(None, "NVIDIA H200") is None


def test_the_h200_run_passes_against_what_nvlink_allows_with_its_figures_in_json():
    rows = verdicts(one_node_run(), backend="nccl", nodes=["node-1"],
                    intra_limit={"node-1": nvlink_bandwidth(NV18, "NVIDIA H200")},
                    join_timeout_s=60)  # fmt: skip
    assert {r.status for r in rows} == {Status.PASS}
    intra = next(r for r in rows if r.detail.startswith("intra"))
    assert "1 GiB busbw 316.1 GB/s of 450.0 GB/s the links allow (NV18" in intra.detail
    figures = intra.to_dict()["data"]
    assert figures["expected_busbw"] == 450e9 and len(figures["sizes"]) == 6
    assert json.dumps(figures)  # the --json document carries it


def test_below_half_of_what_the_links_allow_is_a_warn_with_the_nvlink_fix():
    slow = dataclasses.replace(
        one_node_run(),
        measurements=tuple(
            dataclasses.replace(m, busbw=m.busbw / 4) for m in one_node_run().measurements
        ),
    )
    rows = verdicts(slow, backend="nccl", nodes=["node-1"],
                    intra_limit={"node-1": nvlink_bandwidth(NV18, "NVIDIA H200")},
                    join_timeout_s=60)  # fmt: skip
    assert {r.status for r in rows} == {Status.WARN}
    assert all("nvlink --status" in (r.remedy or "") for r in rows)


def test_two_nodes_of_one_gpu_each_give_the_inter_node_figure():
    run = read_run({"node-1": text("two-nodes-node-1.txt"), "node-2": text("two-nodes-node-2.txt")})
    rows = verdicts(run, backend="nccl", nodes=["node-1", "node-2"], intra_limit={},
                    join_timeout_s=60)  # fmt: skip
    assert [(r.status, r.node) for r in rows] == [(Status.PASS, "node-1")]
    assert "link speed unknown" in rows[0].detail  # lo has no speed in /sys/class/net


def test_a_node_that_never_joined_is_the_one_named_not_the_head_that_waited_for_it():
    run = read_run({"node-1": text("node-2-missing.txt"), "node-2": "Connection refused\n"})
    rows = verdicts(run, backend="nccl", nodes=["node-1", "node-2"], intra_limit={},
                    join_timeout_s=15)  # fmt: skip
    assert [(r.status, r.node) for r in rows] == [(Status.FAIL, "node-2")]
    assert "Connection refused" in rows[0].detail


def test_a_rank_that_cannot_reach_the_head_names_its_interface_address_and_the_port():
    error = {"event": "error", "stage": "join", "rank": 1, "node": "node-2", "interface": "eth0",
             "address": "172.30.0.12", "speed_mbps": 10000, "master": "172.30.0.11:29512",
             "error": "DistNetworkError: Connection reset by peer"}  # fmt: skip
    head = {"event": "error", "stage": "join", "rank": 0, "node": "node-1", "interface": "eth0",
            "address": "172.30.0.11", "speed_mbps": 10000, "master": "172.30.0.11:29512",
            "error": "DistStoreError: Timed out after 16 seconds waiting for clients. 1/2 clients joined."}  # fmt: skip
    run = read_run({"node-1": MARK + json.dumps(head), "node-2": MARK + json.dumps(error)})
    [row] = verdicts(run, backend="gloo", nodes=["node-1", "node-2"], intra_limit={},
                     join_timeout_s=15)  # fmt: skip
    assert (row.status, row.node) == (Status.FAIL, "node-2")
    assert "172.30.0.11:29512 over eth0 (172.30.0.12) within 15 s" in row.detail
    assert "TCP 29512" in (row.remedy or "") and "network.interface" in (row.remedy or "")


def test_wrong_sums_fail_whatever_the_speed():
    run = one_node_run()
    broken = dataclasses.replace(
        run, measurements=(dataclasses.replace(run.measurements[0], correct=False),)
    )
    rows = verdicts(broken, backend="nccl", nodes=["node-1"], intra_limit={}, join_timeout_s=60)
    assert [r.status for r in rows] == [Status.FAIL] and "wrong sums" in rows[0].detail


def test_gloo_on_cpus_passes_with_figures_and_no_expectation():
    result = {"event": "result", "scope": "all", "group": "all", "node": "node-1", "size": MIB,
              "ranks": 2, "seconds": 0.01, "iterations": 20, "algbw": 1e8, "busbw": 1e8,
              "correct": True}  # fmt: skip
    joined = [{"event": "joined", "rank": r, "node": f"node-{r + 1}", "interface": "eth0",
               "address": f"172.30.0.1{r + 1}", "speed_mbps": 10000} for r in (0, 1)]  # fmt: skip
    done = [dict(j, event="done") for j in joined]
    run = read_run({
        "node-1": "".join(MARK + json.dumps(e) + "\n" for e in (joined[0], result, done[0])),
        "node-2": MARK + json.dumps(joined[1]) + "\n" + MARK + json.dumps(done[1]),
    })  # fmt: skip
    [row] = verdicts(run, backend="gloo", nodes=["node-1", "node-2"], intra_limit={},
                     join_timeout_s=60)  # fmt: skip
    assert row.status is Status.PASS and "gloo on CPUs: no expectation" in row.detail
    assert summary(run)[0]["busbw"] == 1e8
    assert figures_table(run).row_count == 1


def test_every_node_gets_its_rank_and_the_heads_rendezvous_in_gpu_and_cpu_mode():
    gpu = Inventory.model_validate({
        "cluster": "demo", "image": "vllm/vllm-openai:v0.32.0", "model_cache": "/data/hf",
        "nodes": [{"name": "a", "address": "10.0.0.1"}, {"name": "b", "address": "10.0.0.2"}],
        "model": {"name": "x/y"},
    })  # fmt: skip
    facts = {n.node_name: NodeFacts(n.address, 8, "NVIDIA H200", "ens8f0") for n in gpu.nodes}
    configs = node_configs(gpu, build_plan(gpu, facts))
    assert [c["node_rank"] for c in configs.values()] == [0, 1]
    assert all(
        c["master"] == ["10.0.0.1", 29512] and c["local_size"] == 8 for c in configs.values()
    )
    assert configs["a"]["backend"] == "nccl" and len(configs["a"]["sizes"]) == 6
    cpu = gpu.model_copy(update={"accelerator": "cpu"})
    cpu_facts = {n.node_name: NodeFacts(n.address, 0) for n in cpu.nodes}
    configs = node_configs(cpu, build_plan(cpu, cpu_facts))
    assert {(c["backend"], c["local_size"]) for c in configs.values()} == {("gloo", 1)}


def _event(kind: str, node: str, rank: int, **more: object) -> str:
    base = {"event": kind, "node": node, "rank": rank, "interface": "ens8f0",
            "address": f"10.0.0.{rank + 1}", "speed_mbps": 100000}  # fmt: skip
    return MARK + json.dumps({**base, **more}) + "\n"


def test_a_rank_that_stops_after_joining_fails_by_name_with_its_stage_and_error():
    oom = "OutOfMemoryError: CUDA out of memory. Tried to allocate 4.00 GiB"
    stopped = _event("error", "node-2", 1, stage="all all-reduce of 1024 MiB", error=oom)
    waiting = _event("error", "node-1", 0, stage="all all-reduce of 1024 MiB",
                     error="time limit passed")  # fmt: skip
    run = read_run({"node-1": _event("joined", "node-1", 0) + waiting,
                    "node-2": _event("joined", "node-2", 1) + stopped})  # fmt: skip
    rows = verdicts(run, backend="nccl", nodes=["node-1", "node-2"], intra_limit={},
                    join_timeout_s=60)  # fmt: skip
    assert [(r.status, r.node) for r in rows] == [(Status.FAIL, "node-2")]  # not the one waiting
    assert f"stopped during the all all-reduce of 1024 MiB: {oom}" in rows[0].detail


def test_a_rank_killed_after_joining_is_blamed_not_the_ones_that_waited_for_it():
    waiting = _event("error", "node-1", 0, stage="all all-reduce of 16 MiB",
                     error="time limit passed")  # fmt: skip
    run = read_run(
        {"node-1": _event("joined", "node-1", 0) + waiting, "node-2": _event("joined", "node-2", 1)}
    )  # then nothing: SIGKILL
    rows = verdicts(run, backend="gloo", nodes=["node-1", "node-2"], intra_limit={},
                    join_timeout_s=60)  # fmt: skip
    assert [(r.status, r.node, r.detail) for r in rows] == [
        (Status.FAIL, "node-2", "rank 1 joined, then went silent (killed?)")
    ]


def test_a_launcher_that_stopped_its_node_says_which_local_rank_failed():
    stopped = MARK + json.dumps({"event": "stopped", "node": "node-1",
                                 "error": "local rank 1 exited with code -9"}) + "\n"  # fmt: skip
    run = read_run(
        {"node-1": _event("joined", "node-1", 0) + _event("joined", "node-1", 1) + stopped}
    )
    [row] = verdicts(run, backend="nccl", nodes=["node-1"], intra_limit={}, join_timeout_s=60)
    assert (row.status, row.node) == (Status.FAIL, "node-1")
    assert row.detail == "its ranks were stopped: local rank 1 exited with code -9"


def test_every_rank_joined_but_no_figure_is_a_fail_not_an_empty_pass():
    run = read_run({"node-1": _event("joined", "node-1", 0) + _event("done", "node-1", 0)})
    [row] = verdicts(run, backend="nccl", nodes=["node-1"], intra_limit={}, join_timeout_s=60)
    assert row.status is Status.FAIL and "no figure came back" in row.detail


def test_inter_node_groups_that_run_at_once_share_the_nic_in_the_expectation():
    inter = [
        {
            "event": "result",
            "scope": "inter",
            "group": f"local rank {g}",
            "node": "node-1",
            "size": 1 << 30,
            "ranks": 2,
            "seconds": 0.1,
            "iterations": 2,
            "algbw": 4e9,
            "busbw": 4e9,
            "correct": True,
        }
        for g in (0, 1)
    ]
    node_1 = "".join(_event(kind, "node-1", r) for r in (0, 1) for kind in ("joined", "done"))
    node_1 += "".join(MARK + json.dumps(e) + "\n" for e in inter)
    node_2 = "".join(_event(kind, "node-2", r) for r in (2, 3) for kind in ("joined", "done"))
    rows = verdicts(read_run({"node-1": node_1, "node-2": node_2}), backend="nccl",
                    nodes=["node-1", "node-2"], intra_limit={}, join_timeout_s=60)  # fmt: skip
    # 100 Gb/s = 12.5 GB/s, shared by 2 groups: 6.25 GB/s each; 4 GB/s is above half of it
    assert {r.status for r in rows} == {Status.PASS}
    assert "shared by 2 groups at once" in rows[0].detail


def test_a_gpu_process_killed_on_the_h200_machine_is_named_by_its_launcher():
    # tests/fixtures/collective/capture.sh: local rank 1 killed (-9) after the first result; its
    # launcher stopped rank 0 at once (which saw NCCL fail) and left nothing behind
    run = read_run({"node-1": text("rank-killed.txt")})
    [row] = verdicts(run, backend="nccl", nodes=["node-1"], intra_limit={}, join_timeout_s=60)
    assert (row.status, row.node) == (Status.FAIL, "node-1")
    assert row.detail.startswith("its ranks were stopped: local rank 1 exited with code -9")
    assert "rank 0 then saw: DistBackendError" in row.detail
    assert text("left-behind-after-kill.txt").strip() == "pgrep exit 1"  # nothing left


# --- NCCL's transport between the nodes -----------------------------------------------------


def two_hosts_socket() -> CollectiveRun:
    """The program itself, run on a lent H100 as two "nodes" of one GPU each (NCCL_HOSTID per
    node): NCCL crossed between them over TCP sockets (fixtures/collective/h100x1/README.md)."""
    return read_run({
        "node-1": (H100 / "two-hosts-socket-node-1.txt").read_text(),
        "node-2": (H100 / "two-hosts-socket-node-2.txt").read_text(),
    })  # fmt: skip


def constructed_ib_ports() -> tuple[tuple[HcaPort, ...], tuple[str, ...]]:
    """The active ports and /dev/infiniband files of the constructed two-HCA sysfs tree (two
    InfiniBand ports at 400 Gb/sec, uverbs0/1), read by the real probe script."""
    tree = (FABRIC / "constructed" / "ib-two-hcas").resolve()
    done = subprocess.run(
        ["sh", "-c", INFINIBAND_SCRIPT, "sh", str(tree / "sys"), str(tree / "dev")],
        capture_output=True, text=True, check=True, timeout=30,
    )  # fmt: skip
    facts = parse_infiniband(done.stdout)
    return facts.active_ports, facts.device_files


def with_hcas(*nodes: str, host_verbs: bool = True, peer_memory: bool = True) -> dict:
    ports, devices = constructed_ib_ports()
    if not host_verbs:
        devices = tuple(d for d in devices if not d.startswith("uverbs"))
    return {node: NodeHcas(ports, devices, peer_memory) for node in nodes}


def socket_verdicts(
    run: CollectiveRun, hcas: dict | None = None, *, ib_disabled: bool = False
) -> list:
    return verdicts(run, backend="nccl", nodes=["node-1", "node-2"], intra_limit={},
                    join_timeout_s=60, hcas=hcas, ib_disabled=ib_disabled)  # fmt: skip


def test_the_program_stays_python_3_8_and_standard_library_plus_torch():
    tree = ast.parse(program_source(), feature_version=(3, 8))
    imported = {alias.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                for alias in n.names}  # fmt: skip
    imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree)
                 if isinstance(n, ast.ImportFrom)}  # fmt: skip
    assert imported - {"__future__", "torch"} <= {
        "contextlib", "ctypes", "datetime", "json", "multiprocessing", "os", "resource",
        "signal", "sys", "threading", "time", "typing",
    }  # fmt: skip


def test_each_nccl_rank_logs_info_of_init_and_net_to_its_own_file(monkeypatch, tmp_path):
    monkeypatch.setattr(collective, "NCCL_LOG", str(tmp_path / "nccl.{rank}.log"))
    # the rank's own environment, with an image's own settings in it
    environment = {"NCCL_DEBUG": "WARN", "NCCL_DEBUG_TIMESTAMP_LEVELS": "INFO,WARN"}
    monkeypatch.setattr(os, "environ", environment)
    (tmp_path / "nccl.3.log").write_text("a log of an earlier check\n")
    path = collective.log_nccl_to_file(3)
    assert path == str(tmp_path / "nccl.3.log") and not Path(path).exists()
    assert environment["NCCL_DEBUG"] == "INFO" and environment["NCCL_DEBUG_FILE"] == path
    assert set(environment["NCCL_DEBUG_SUBSYS"].split(",")) == {"INIT", "NET"}
    assert environment["NCCL_DEBUG_TIMESTAMP_LEVELS"] == "WARN"  # INFO lines as the parser reads


def test_only_the_lines_that_tell_the_transport_leave_the_container(tmp_path):
    # one process of a real NCCL 2.28.9 log (two ranks taken for two hosts, over sockets)
    whole = (FABRIC / "h100x1" / "nccl-2hosts-socket.txt").read_text()
    own = [line for line in whole.splitlines() if line.startswith("vm:600:")]
    log = tmp_path / "nccl.0.log"
    log.write_text("\n".join(own) + "\n")
    kept = collective.transport_lines(str(log))
    assert len(kept) < len(own) / 3
    assert not any("Bootstrap timings" in line or "Proxy Service" in line for line in kept)
    assert sum(" via NET/Socket/0" in line for line in kept) == 1  # 4 channel lines, one kept
    assert parse_nccl_ranks("\n".join(kept)) == parse_nccl_ranks("\n".join(own))
    assert collective.transport_lines(str(tmp_path / "none.log")) == []


def test_what_a_rank_sends_back_is_bounded_however_long_nccls_log(tmp_path):
    prefix = "gpu-a:7:7 [0] NCCL "
    lines = [f"{prefix}WARN NET/IB : ibv_open_device failed ({n})" for n in range(50)]
    lines += [f"{prefix}INFO Channel {n:02d}/0 : 0[0] -> 8[0] via NET/IB/{n}" + "x" * 900
              for n in range(500)]  # fmt: skip
    log = tmp_path / "nccl.0.log"
    log.write_text("\n".join(lines))
    kept = collective.transport_lines(str(log))
    assert len(kept) == collective.TRANSPORT_LINES
    assert sum(" NCCL WARN " in line for line in kept) == collective.TRANSPORT_WARNINGS
    assert max(len(line) for line in kept) == collective.LINE_CHARS


def test_gloo_ranks_send_no_transport_event(capfd):
    collective.Transport(None, {"rank": 0, "node": "node-1"}).report()
    assert capfd.readouterr().out == ""


def test_the_container_says_what_it_gives_rdma(monkeypatch):
    for name in collective.RDMA_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NCCL_IB_HCA", "=mlx5_0:1")
    monkeypatch.setenv("NCCL_DEBUG", "INFO")  # not an RDMA setting: stays out
    facts = collective.rdma_facts()
    soft = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
    assert facts["memlock"] == (-1 if soft == resource.RLIM_INFINITY else soft)
    assert facts["environment"] == {"NCCL_IB_HCA": "=mlx5_0:1"}
    assert facts["devices"] == (
        sorted(os.listdir("/dev/infiniband")) if Path("/dev/infiniband").is_dir() else None
    )


def test_the_real_two_host_run_crossed_over_sockets_and_each_node_says_so():
    run = two_hosts_socket()
    assert [(t.node, t.rank, t.link, t.nccl.gdr, t.devices, t.memlock) for t in run.transports] == [
        ("node-1", 0, "Socket", False, ("rdma_cm",), -1),
        ("node-2", 1, "Socket", False, ("rdma_cm",), -1),
    ]
    rows = socket_verdicts(run)
    assert {r.status for r in rows} == {Status.PASS}
    node_rows = [r for r in rows if r.node == "node-2" and "sockets" in r.detail]
    assert [r.detail for r in node_rows] == [
        "NCCL crossed to the other nodes over TCP sockets over eth0 (no active HCA here)"
    ]
    assert node_rows[0].to_dict()["data"]["transport"] == "Socket"
    bandwidth = next(r for r in rows if r.detail.startswith("all"))
    assert "link speed unknown" in bandwidth.detail  # the VM's eth0 has no speed in sysfs
    # GPUDirect RDMA is a question only where NCCL used InfiniBand or RoCE
    assert transport_summary(run)["node-1"] == {"transport": "Socket", "gdr": None,
                                                "ib_devices": []}  # fmt: skip


def test_sockets_on_a_node_with_active_hcas_fail_by_name_when_its_container_lacks_the_verbs():
    # the real run's node-2 container had only /dev/infiniband/rdma_cm; its host, the
    # constructed tree's two active ports and uverbs0/1: a container made before vcluster
    # passed the HCAs in
    rows = socket_verdicts(two_hosts_socket(), hcas=with_hcas("node-2"))
    [fail] = failed(rows)
    assert fail.node == "node-2"
    assert fail.detail == (
        "NCCL used TCP sockets (NET/Socket) between the nodes on rank(s) 1, although this node "
        "has 2 active HCA port(s) (mlx5_0:1, mlx5_1:1): the container has no "
        "/dev/infiniband/uverbs* (created without them)"
    )
    assert "vcluster up --recreate" in (fail.remedy or "")
    assert rows[0] is fail  # the cause first, before the figures it explains


def test_without_verbs_on_the_host_either_the_fix_is_the_rdma_modules():
    rows = socket_verdicts(two_hosts_socket(), hcas=with_hcas("node-1", host_verbs=False))
    [fail] = failed(rows)
    assert fail.node == "node-1" and "nor has the host" in fail.detail
    assert "modprobe ib_uverbs rdma_ucm" in (fail.remedy or "")


def _container_says(run: CollectiveRun, **change: Any) -> CollectiveRun:
    return dataclasses.replace(
        run, transports=tuple(dataclasses.replace(t, **change) for t in run.transports)
    )


def test_sockets_with_the_verbs_in_place_name_the_environment_or_the_memlock_limit():
    verbs = ("rdma_cm", "uverbs0", "uverbs1")
    image_off = _container_says(two_hosts_socket(), devices=verbs,
                                environment={"NCCL_IB_DISABLE": "1"})  # fmt: skip
    [fail] = failed(socket_verdicts(image_off, hcas=with_hcas("node-1")))
    assert "the container's environment sets NCCL_IB_DISABLE=1" in fail.detail
    assert "NCCL_IB_DISABLE: '0'" in (fail.remedy or "")
    locked = _container_says(two_hosts_socket(), devices=verbs, memlock=8 * MIB)
    [fail] = failed(socket_verdicts(locked, hcas=with_hcas("node-1")))
    assert fail.detail.endswith("the container's memlock limit is 8 MiB (RDMA pins memory)")
    unknown = _container_says(two_hosts_socket(), devices=verbs)
    [fail] = failed(socket_verdicts(unknown, hcas=with_hcas("node-1")))
    assert fail.detail.endswith("NCCL found no usable HCA (NET/IB : No device found.)")


def test_sockets_that_the_inventory_asks_for_are_a_warn_not_a_fail():
    rows = socket_verdicts(two_hosts_socket(), hcas=with_hcas("node-1", "node-2"),
                           ib_disabled=True)  # fmt: skip
    assert not failed(rows)
    warned = [r for r in rows if r.status is Status.WARN]
    assert [r.node for r in warned] == ["node-1", "node-2"]
    assert all("env NCCL_IB_DISABLE=1 asks for it" in r.detail for r in warned)


# constructed, not captured: NCCL 2.28's INFO formats (src/transport/net.cc, net_ib.cc) for two
# nodes of two GPUs, each GPU with its own 400 Gb/s HCA port
def ib_rank(node: str, rank: int, *, layer: str = "IB", gdr: str = "/GDRDMA") -> str:
    local = rank % 2
    peer = (rank + 2) % 4
    lines = [
        f"{node}:{100 + rank}:{100 + rank} [{local}] NCCL INFO NET/IB : Using [0]mlx5_0:1/{layer} "
        f"[1]mlx5_1:1/{layer} [RO]; OOB ens8f0:10.0.0.{rank // 2 + 1}<0>",
        f"{node}:{100 + rank}:{100 + rank} [{local}] NCCL INFO Using network IB",
        f"{node}:{100 + rank}:{100 + rank} [{local}] NCCL INFO comm 0x5{rank} rank {rank} nRanks "
        f"4 nNodes 2 localRanks 2 localRank {local} MNNVL 0",
        f"{node}:{100 + rank}:{100 + rank} [{local}] NCCL INFO Channel 00/0 : {rank}[{local}] -> "
        f"{rank ^ 1}[{local ^ 1}] via P2P/CUMEM/read",
        # the inter-node group's communicator: its own ranks, one GPU per node
        f"{node}:{100 + rank}:{100 + rank} [{local}] NCCL INFO comm 0x6{rank} rank {rank // 2} "
        "nRanks 2 nNodes 2 localRanks 1 localRank 0 MNNVL 0",
        f"{node}:{100 + rank}:{100 + rank} [{local}] NCCL INFO Channel 00/0 : {rank}[{local}] -> "
        f"{peer}[{local}] [send] via NET/IB/{local}{gdr}",
        f"{node}:{100 + rank}:{100 + rank} [{local}] NCCL INFO Connected all rings, use ring PXN 0 "
        f"GDR {1 if gdr else 0}",
    ]
    event = {"event": "transport", "node": node, "rank": rank, "interface": "ens8f0",
             "address": f"10.0.0.{rank // 2 + 1}", "speed_mbps": 100000, "lines": lines,
             "rdma": {"devices": ["rdma_cm", "uverbs0", "uverbs1"], "memlock": -1,
                      "environment": {"NCCL_IB_HCA": "=mlx5_0:1,mlx5_1:1"}}}  # fmt: skip
    return MARK + json.dumps(event) + "\n"


def ib_run(busbw: float, **rank_options: object) -> CollectiveRun:
    inter = [
        {"event": "result", "scope": "inter", "group": f"local rank {g}", "node": "node-1",
         "size": 1 << 30, "ranks": 2, "seconds": 0.1, "iterations": 2, "algbw": busbw,
         "busbw": busbw, "correct": True}
        for g in (0, 1)
    ]  # fmt: skip
    outputs = {}
    for index, node in enumerate(("node-1", "node-2")):
        ranks = (2 * index, 2 * index + 1)
        text = "".join(_event(kind, node, r) for r in ranks for kind in ("joined", "done"))
        text += "".join(ib_rank(node, r, **rank_options) for r in ranks)  # type: ignore[arg-type]
        if index == 0:
            text += "".join(MARK + json.dumps(e) + "\n" for e in inter)
        outputs[node] = text
    return read_run(outputs)


def ib_verdicts(run: CollectiveRun, hcas: dict | None = None) -> list:
    hcas = with_hcas("node-1", "node-2") if hcas is None else hcas
    return verdicts(run, backend="nccl", nodes=["node-1", "node-2"], intra_limit={},
                    join_timeout_s=60, hcas=hcas)  # fmt: skip


def test_infiniband_is_judged_against_the_ports_rate_not_the_ethernet_interface():
    # 2 x 400 Gb/s = 100 GB/s a node, shared by the two inter-node groups: 50 GB/s each
    rows = ib_verdicts(ib_run(40e9))
    inter = [r for r in rows if r.detail.startswith("inter")]
    assert {r.status for r in rows} == {Status.PASS} and len(inter) == 2
    assert "of 50.0 GB/s the links allow (2 x 400 Gb/s InfiniBand (mlx5_0:1, mlx5_1:1) on " \
        "node-1, shared by 2 groups at once)" in inter[0].detail  # fmt: skip
    assert "faster than the interface" not in inter[0].detail  # ens8f0's 100 Gb/s is not it
    slow = [r for r in ib_verdicts(ib_run(20e9)) if r.status is Status.WARN]
    assert len(slow) == 2 and all("ibstat" in (r.remedy or "") for r in slow)


def test_each_node_says_infiniband_with_the_ports_nccl_opened_and_gpudirect_rdma():
    rows = ib_verdicts(ib_run(40e9))
    said = [(r.node, r.detail) for r in rows if r.detail.startswith("NCCL crossed")]
    assert said == [
        (node, "NCCL crossed to the other nodes over InfiniBand (mlx5_0:1, mlx5_1:1); "
               "GPUDirect RDMA: yes")
        for node in ("node-1", "node-2")
    ]  # fmt: skip
    run = ib_run(40e9)
    assert [t.nccl.rank for t in run.transports] == [0, 1, 2, 3]  # the program's, not a group's
    assert transport_summary(run)["node-2"]["transport"] == "InfiniBand"


def test_roce_and_no_gpudirect_rdma_are_named():
    run = ib_run(40e9, layer="RoCE", gdr="")
    hcas = {
        n: dataclasses.replace(h, peer_memory=False)
        for n, h in with_hcas("node-1", "node-2").items()
    }
    rows = ib_verdicts(run, hcas=hcas)
    detail = next(r.detail for r in rows if r.detail.startswith("NCCL crossed"))
    assert detail.startswith("NCCL crossed to the other nodes over RoCE")
    assert "GPUDirect RDMA: no (nvidia_peermem is not loaded)" in detail


def test_infiniband_without_a_known_rate_has_no_expectation():
    unrated = {n: dataclasses.replace(h, ports=tuple(dataclasses.replace(p, rate=None)
                                                     for p in h.ports))
               for n, h in with_hcas("node-1", "node-2").items()}  # fmt: skip
    rows = ib_verdicts(ib_run(1e9), hcas=unrated)
    assert {r.status for r in rows} == {Status.PASS}
    assert "HCA rate unknown: no expectation" in next(r for r in rows if "inter" in r.detail).detail


def test_nccls_own_rank_and_the_widest_node_count_survive_its_subgroups():
    # constructed: the world's communicator first, then an intra-node one (nNodes 1)
    log = "\n".join([
        "gpu-b:9:9 [1] NCCL INFO comm 0x1 rank 9 nRanks 16 nNodes 2 localRanks 8 localRank 1 MNNVL 0",
        "gpu-b:9:9 [1] NCCL INFO comm 0x2 rank 1 nRanks 8 nNodes 1 localRanks 8 localRank 1 MNNVL 0",
        "gpu-b:9:9 [1] NCCL INFO Channel 00/0 : 9[1] -> 1[1] [send] via NET/IB/1/GDRDMA(PCI)/Shared",
    ])  # fmt: skip
    (rank,) = parse_nccl_ranks(log)
    assert (rank.rank, rank.nodes, rank.between_nodes, rank.gdr) == (9, 2, "IB", True)


def test_one_node_has_no_transport_row():
    result = {"event": "result", "scope": "all", "group": "all", "node": "node-1", "size": MIB,
              "ranks": 1, "seconds": 0.01, "iterations": 20, "algbw": 1e8, "busbw": 1e8,
              "correct": True}  # fmt: skip
    text = _event("joined", "node-1", 0) + ib_rank("node-1", 0) + MARK + json.dumps(result)
    run = read_run({"node-1": text + "\n" + _event("done", "node-1", 0)})
    assert len(run.transports) == 1
    [row] = verdicts(run, backend="nccl", nodes=["node-1"], intra_limit={}, join_timeout_s=60,
                     hcas=with_hcas("node-1"))  # fmt: skip
    assert row.detail.startswith("all (all, 1 ranks)")


def test_the_hcas_judged_are_the_active_ports_network_ib_hcas_names():
    tree = (FABRIC / "constructed" / "ib-two-hcas").resolve()
    infiniband = subprocess.run(
        ["sh", "-c", INFINIBAND_SCRIPT, "sh", str(tree / "sys"), str(tree / "dev")],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout  # fmt: skip
    facts = parse_probe(compose_probe({**h200_sections(), "infiniband": (0, infiniband, ""),
                                       "rdma-modules": (0, "nvidia_peermem 16384 0", "")}))  # fmt: skip
    inventory = Inventory.model_validate({
        "cluster": "demo", "image": "vllm/vllm-openai:v0.32.0", "model_cache": "/data/hf",
        "nodes": [{"name": "a", "address": "10.0.0.1"}, {"name": "b", "address": "10.0.0.2"}],
        "model": {"name": "x/y"}, "network": {"ib_hcas": ["mlx5_1"]},
    })  # fmt: skip
    found = node_hcas(inventory, {"a": facts})["a"]
    assert [p.name for p in found.ports] == ["mlx5_1:1"] and found.peer_memory is True
    assert "uverbs1" in found.host_devices


def test_the_last_run_keeps_each_nodes_transport(monkeypatch, tmp_path):
    monkeypatch.setenv("VCLUSTER_STATE_DIR", str(tmp_path))
    run = two_hosts_socket()
    save_last_run("demo", run, socket_verdicts(run), 3.0)
    saved = load_last_run("demo")
    assert saved is not None and saved["ok"] is True
    assert saved["transports"]["node-2"]["transport"] == "Socket"


@pytest.mark.parametrize("name", ["two-hosts-socket-node-1.txt", "two-hosts-socket-node-2.txt"])
def test_the_nccl_log_never_leaves_the_container_whole(name):
    events = parse_events((H100 / name).read_text())
    [transport] = [e for e in events if e["event"] == "transport"]
    assert 0 < len(transport["lines"]) <= collective.TRANSPORT_LINES
    assert (H100 / "left-behind.txt").read_text().strip().endswith("ls exit 2")  # log removed


def test_gloo_on_the_real_machine_sent_no_transport_and_its_rows_are_as_before():
    run = read_run({"node-1": (H100 / "gloo-node-1.txt").read_text(),
                    "node-2": (H100 / "gloo-node-2.txt").read_text()})  # fmt: skip
    assert run.transports == ()
    rows = verdicts(run, backend="gloo", nodes=["node-1", "node-2"], intra_limit={},
                    join_timeout_s=30, hcas=with_hcas("node-1", "node-2"))  # fmt: skip
    assert [(r.status, r.detail.split(";")[-1]) for r in rows] == [
        (Status.PASS, " sums right (gloo on CPUs: no expectation)")
    ]


def test_a_rank_stopped_before_nccl_started_adds_no_transport_row_to_the_failure():
    run = read_run({"node-1": (H100 / "nccl-node-2-missing.txt").read_text(), "node-2": ""})
    [transport] = run.transports
    assert (transport.rank, transport.lines, transport.link) == (0, (), None)
    rows = verdicts(run, backend="nccl", nodes=["node-1", "node-2"], intra_limit={},
                    join_timeout_s=60, hcas=with_hcas("node-1", "node-2"))  # fmt: skip
    assert {r.status for r in rows} == {Status.FAIL} and "node-2" in {r.node for r in rows}
    assert not any("NCCL" in r.detail for r in rows)
