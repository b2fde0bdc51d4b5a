"""The host probe: the script itself, run here for real, and its output parsed into HostFacts.

Fixtures: `fixtures/probe/` was printed by the probe on this development machine (Debian 12,
no GPU, Docker daemon not running); `fixtures/gpu/h100x1/probe*.txt` on a real H100 host and
`fixtures/gpu/h200x2/probe*.txt` on a real 2 x H200 host with NVLink (neither had Docker or
iproute2). The 8 x H200 probe is composed from the real nvidia-smi captures of such a machine.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest

from cluster.decide.inventory import load_inventory
from cluster.facts.gpu import GPU_QUERY_FIELDS, GpuProblemKind
from cluster.facts.host import DiskSpace, parse_probe
from cluster.facts.probe import PROBE_SCRIPT, probe_argv, split_sections
from cluster.steps.facts import node_facts
from tests.support.probe_output import (
    FIXTURES,
    H100,
    H200X2,
    TYPICAL_SECTIONS,
    compose_probe,
    h200_sections,
    read,
)

GIB = 1 << 30
REPO = Path(__file__).resolve().parents[2]
LOCAL_HEAD = FIXTURES / "probe" / "debian-no-gpu-no-docker.txt"
LOCAL_WORKER = FIXTURES / "probe" / "debian-no-gpu-no-docker-worker.txt"


def run_probe(head: str, cache: str) -> str:
    done = subprocess.run(
        probe_argv(head_address=head, model_cache=cache),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout


# --- the script ----------------------------------------------------------------------------


def test_the_script_queries_the_fields_the_parser_reads():
    assert "--query-gpu=" + ",".join(GPU_QUERY_FIELDS) + " " in PROBE_SCRIPT


@pytest.mark.skipif(shutil.which("dash") is None, reason="needs dash, a strict POSIX sh")
def test_the_script_is_posix_sh():
    subprocess.run(["dash", "-n", "-c", PROBE_SCRIPT], check=True)


def test_arguments_are_passed_positionally_never_pasted(tmp_path: Path):
    marker = tmp_path / "pasted"
    argv = probe_argv(head_address=f"10.0.0.1; touch {marker}", model_cache=f"/x$(touch {marker})")
    assert argv[:2] == ["sh", "-c"]
    assert str(marker) not in argv[2]
    subprocess.run(argv, capture_output=True, timeout=60, check=True)
    assert not marker.exists()


def test_run_here_it_gives_facts_that_say_what_is_missing():
    before = time.time()
    facts = parse_probe(run_probe("127.0.0.1", "/nonexistent/model/cache"))
    assert facts.problems == ()
    assert facts.clock_s == pytest.approx(before, abs=30)
    assert facts.cpu_count >= 1
    assert facts.memory_bytes > 0
    if shutil.which("nvidia-smi") is None:
        assert facts.gpu.problem.kind is GpuProblemKind.NVIDIA_SMI_MISSING
        assert facts.gpus == ()
    else:  # on a GPU host
        assert facts.gpu.problem is None
        assert facts.gpu.topology.gpu_indices == tuple(g.index for g in facts.gpus)
        assert facts.gpu.driver_version is not None
    assert facts.cache_disk is not None  # measured at the nearest existing parent: /
    assert facts.shm is not None


def fake_tool(directory: Path, name: str, script: str) -> None:
    tool = directory / name
    tool.write_text("#!/bin/sh\n" + script + "\n")
    tool.chmod(0o755)


def run_probe_with(tools: Path, **settings: int) -> str:
    argv = probe_argv(head_address="127.0.0.1", model_cache="/", **settings)
    path = f"{tools}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, env={"PATH": path})
    assert done.returncode == 0
    return done.stdout


def test_run_here_a_hanging_nvidia_smi_is_stopped_and_not_asked_again(tmp_path: Path):
    fake_tool(tmp_path, "nvidia-smi", "echo called >>" + str(tmp_path / "calls") + "; sleep 30")
    started = time.monotonic()
    facts = parse_probe(run_probe_with(tmp_path, command_timeout_s=1))
    assert time.monotonic() - started < 15
    assert facts.gpu.problem.kind is GpuProblemKind.TIMED_OUT
    assert (tmp_path / "calls").read_text() == "called\n"
    assert facts.problems == ()


def test_run_here_nvidia_smis_own_failure_message_is_kept(tmp_path: Path):
    message = "Failed to initialize NVML: Driver/library version mismatch"
    fake_tool(tmp_path, "nvidia-smi", f"echo '{message}'; exit 18")
    facts = parse_probe(run_probe_with(tmp_path))
    assert facts.gpu.problem.kind is GpuProblemKind.DRIVER_MISMATCH
    assert facts.gpu.problem.detail == message


# --- real captures -------------------------------------------------------------------------


def test_a_machine_without_gpu_or_docker_daemon():
    facts = parse_probe(read(LOCAL_HEAD))
    assert facts.hostname == "vm"
    assert facts.cpu_count == 2
    assert facts.gpu.problem.kind is GpuProblemKind.NVIDIA_SMI_MISSING
    assert facts.gpu.driver_version is None
    assert not facts.docker.reachable
    assert "Cannot connect to the Docker daemon" in facts.docker.problem
    assert facts.docker.runtimes == ()
    assert facts.shm.mount_point == "/dev/shm"
    assert facts.cache_disk.mount_point == "/"
    assert facts.problems == ()


def test_on_the_head_the_route_through_lo_names_the_interface_holding_the_address():
    facts = parse_probe(read(LOCAL_HEAD))
    assert "dev lo" in split_sections(read(LOCAL_HEAD)).get("route").stdout
    assert (facts.route.interface, facts.route.source_address) == ("eth0", "192.0.2.2")
    assert facts.route_interface == "eth0"


def test_on_a_worker_the_route_names_its_interface():
    facts = parse_probe(read(LOCAL_WORKER))
    assert (facts.route.interface, facts.route.source_address) == ("eth0", "192.0.2.2")


def test_a_real_h100_host():
    facts = parse_probe(read(H100 / "probe.txt"))
    assert facts.gpu.problem is None
    assert [(g.index, g.name) for g in facts.gpus] == [(0, "NVIDIA H100 80GB HBM3")]
    assert facts.gpu.driver_version == "580.159.04"
    assert facts.gpu.topology.interconnect == "single GPU"
    assert facts.gpu.processes == ()
    assert facts.cpu_count == 16
    assert facts.shm.size_bytes == 128 * GIB
    assert facts.docker.problem == "docker is not installed"
    assert facts.route.interface is None
    assert "ip is not installed" in facts.route.problem


def test_a_real_h100_host_with_a_process_holding_gpu_memory():
    facts = parse_probe(read(H100 / "probe-busy.txt"))
    [process] = facts.gpu.processes  # caught while it was still allocating
    assert (process.process_name, process.used_memory_mib) == ("python3", 104)
    assert process.gpu_uuid == facts.gpus[0].uuid


def test_a_real_two_gpu_host_with_nvlink():
    facts = parse_probe(read(H200X2 / "probe.txt"))
    assert facts.gpu.problem is None
    assert (facts.gpu.gpu_count, facts.gpu.model_name) == (2, "NVIDIA H200")
    assert [g.pci_bus_id for g in facts.gpus] == ["00000000:00:06.0", "00000000:00:07.0"]
    assert facts.gpu.topology.links[(0, 1)] == "NV18"
    assert facts.gpu.topology.interconnect == "NVLink"
    assert facts.gpu.driver_version == "580.159.04"
    assert facts.cpu_count == 32
    assert facts.shm.size_bytes == 256 * GIB


def test_a_real_two_gpu_host_names_the_gpu_a_process_holds():
    facts = parse_probe(read(H200X2 / "probe-busy.txt"))
    [process] = facts.gpu.processes
    assert (process.process_name, process.used_memory_mib) == ("python3", 2566)
    assert process.gpu_uuid == facts.gpus[0].uuid != facts.gpus[1].uuid


def test_eight_h200s_through_the_whole_parse_path():
    facts = parse_probe(compose_probe(h200_sections()))
    assert (facts.gpu.gpu_count, facts.gpu.model_name) == (8, "NVIDIA H200")
    assert facts.gpu.topology.interconnect == "NVLink"
    assert facts.docker.server_version == "28.3.3"
    assert facts.docker.runtimes == ("io.containerd.runc.v2", "nvidia", "runc")
    assert facts.docker.nvidia_hooks[0] == "/usr/bin/nvidia-container-runtime-hook"
    assert facts.cache_disk == DiskSpace("/data", 7000 * GIB, 3000 * GIB)
    assert facts.route_interface == "ens9f0"
    assert facts.listening_ports == frozenset({22})
    assert facts.memory_bytes == 2113531396 * 1024


def test_the_plan_reads_the_hosts_memory_and_its_smallest_gpus_from_the_probe():
    """What the models' sleep levels and the GPUs' room for sleepers are decided on."""
    facts = parse_probe(compose_probe(h200_sections()))
    node = node_facts(facts, "10.0.0.11", load_inventory(REPO / "inventory" / "gpu-2x8.yaml"))
    assert node.memory_bytes == 2113531396 * 1024
    assert node.gpu_memory_mib == 143771
    assert node.gpu_count == 8


# --- failures inside the output ------------------------------------------------------------


def test_nvidia_smi_failing_with_driver_mismatch():
    mismatch = "Failed to initialize NVML: Driver/library version mismatch"
    sections = {
        **h200_sections(),
        "gpu-query": (18, mismatch, ""),
        "gpu-apps": (18, mismatch, ""),
        "gpu-topology": (18, mismatch, ""),
    }
    facts = parse_probe(compose_probe(sections))
    assert facts.gpu.problem.kind is GpuProblemKind.DRIVER_MISMATCH
    assert facts.gpu.driver_version == "580.159.04"  # from /proc, which still answers


def test_nvidia_smi_message_on_stderr_is_read_too():
    sections = {**h200_sections(), "gpu-query": (9, "", "NVIDIA-SMI has failed because it "
                "couldn't communicate with the NVIDIA driver.")}  # fmt: skip
    facts = parse_probe(compose_probe(sections))
    assert facts.gpu.problem.kind is GpuProblemKind.DRIVER_NOT_LOADED


def test_docker_permission_denied_is_kept_as_the_reason():
    denied = (
        "permission denied while trying to connect to the Docker daemon socket at "
        "unix:///var/run/docker.sock"
    )
    sections = {
        **h200_sections(),
        "docker-version": (1, "", denied),
        "docker-runtimes": (1, "null", denied),
    }
    facts = parse_probe(compose_probe(sections))
    assert not facts.docker.reachable
    assert facts.docker.problem == f"exit 1: {denied}"


def test_a_timed_out_command_says_so():
    facts = parse_probe(compose_probe({**h200_sections(), "docker-version": (124, "", "")}))
    assert facts.docker.problem == "timed out"


def test_a_cut_off_output_keeps_what_arrived():
    arrived = ("clock", "hostname", "cpus", "memory", "gpu-query")
    sections = {name: h200_sections()[name] for name in arrived}
    facts = parse_probe(compose_probe(sections, complete=False))
    assert facts.problems == ("the probe's output was cut off (no end marker)",)
    assert facts.gpu.gpu_count == 8
    assert facts.shm is None
    assert facts.route.problem == "the probe did not reach the route to the head"


@pytest.mark.parametrize("output", ["", "garbage\n", "@@vcluster end@@\n"])
def test_empty_or_foreign_output_gives_unknown_facts(output):
    facts = parse_probe(output)
    assert facts.hostname is None
    assert facts.gpus == ()
    assert facts.gpu.problem is not None
    assert facts.listening_ports == frozenset()


def test_sections_keep_stdout_and_stderr_apart():
    probe = split_sections(read(LOCAL_HEAD))
    driver = probe.get("driver")
    assert (driver.exit_code, driver.stdout) == (1, "")
    assert "No such file or directory" in driver.stderr
    assert probe.get("gpu-query").missing == "nvidia-smi"
    assert probe.complete


def test_listening_ports_come_from_proc_net_tcp_in_hex():
    listening = (
        "  sl  local_address rem_address   st\n"
        "   0: 00000000:18EB 00000000:0000 0A\n"  # 6379 listening
        "   1: 0100007F:1F40 0100007F:A6E4 06\n"  # 8000 in TIME_WAIT: not listening
    )
    facts = parse_probe(compose_probe({**TYPICAL_SECTIONS, "listening": (0, listening, "")}))
    assert facts.listening_ports == frozenset({6379})


def test_busybox_date_without_nanoseconds_keeps_the_seconds():
    facts = parse_probe(compose_probe({**TYPICAL_SECTIONS, "clock": (0, "1795568913.%N", "")}))
    assert facts.clock_s == 1795568913


def test_facts_are_frozen():
    facts = parse_probe(read(LOCAL_HEAD))
    with pytest.raises(AttributeError):
        facts.hostname = "other"  # type: ignore[misc]
    assert replace(facts, hostname="other").hostname == "other"
