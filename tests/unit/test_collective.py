"""The collective check: its program's arithmetic, its output read back (real runs on a lent
2 x H200 machine, NCCL), and its verdicts."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from cluster.checks import Status
from cluster.collective import MARK, MIB, bus_bandwidth, iterations_for
from cluster.collective_report import (
    CollectiveRun,
    figures_table,
    nvlink_bandwidth,
    parse_events,
    read_run,
    summary,
    verdicts,
)
from cluster.facts.gpu import parse_topology
from cluster.inventory import Inventory
from cluster.plan import NodeFacts, build_plan
from cluster.steps.collective import node_configs, sizes

REPO = Path(__file__).resolve().parents[2]
H200X2 = REPO / "tests" / "fixtures" / "collective" / "h200x2"
NV18 = parse_topology((H200X2 / "topo-m.txt").read_text())
H200X8 = parse_topology((REPO / "tests" / "fixtures" / "gpu" / "h200x8" / "topo-m.txt").read_text())


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
