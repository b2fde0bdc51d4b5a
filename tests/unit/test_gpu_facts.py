"""GPU facts: what nvidia-smi really prints (8 and 2 x H200, 1 x H100), variants, failures.

Variants are the real captures edited the way a sick or different machine prints them.
"""

from __future__ import annotations

import pytest

from cluster.facts.gpu import (
    GPU_QUERY_FIELDS,
    CommandOutput,
    GpuProblemKind,
    classify_failure,
    parse_compute_apps,
    parse_driver_version,
    parse_gpu_facts,
    parse_query_gpu,
    parse_topology,
)
from tests.support.probe_output import H100, H200, H200X2, read

QUERY = read(H200 / "query-gpu-noheader-nounits.csv")
TOPOLOGY = read(H200 / "topo-m.txt")


def replace_cell(line: str, field: str, value: str) -> str:
    cells = line.split(", ")
    cells[GPU_QUERY_FIELDS.index(field)] = value
    return ", ".join(cells)


def edit_row(text: str, index: int, field: str, value: str) -> str:
    lines = text.splitlines()
    lines[index] = replace_cell(lines[index], field, value)
    return "\n".join(lines) + "\n"


def facts_from(query: str, exit_code: int | None = 0, **outputs: CommandOutput | None):
    return parse_gpu_facts(CommandOutput(exit_code, query), **outputs)


# --- --query-gpu ---------------------------------------------------------------------------


def test_query_fields_are_the_ones_the_fixtures_were_captured_with():
    readme = read(H200.parent / "README.md")
    assert ",".join(GPU_QUERY_FIELDS) in readme


def test_eight_h200s_are_read_with_their_values():
    gpus, other = parse_query_gpu(QUERY)
    assert other == []
    assert [g.index for g in gpus] == list(range(8))
    first = gpus[0]
    assert first.name == "NVIDIA H200"
    assert first.uuid == "GPU-e631629d-2256-277a-404b-d2ae4d3da19f"
    assert first.pci_bus_id == "00000000:00:06.0"
    assert (first.memory_total_mib, first.memory_used_mib, first.memory_free_mib) == (
        143771,
        0,
        143156,
    )
    assert first.power_draw_w == pytest.approx(78.22)
    assert first.ecc_uncorrected == 0
    assert first.driver_version == "580.159.04"
    assert first.compute_capability == "9.0"
    assert first.persistence_mode is True
    assert first.mig_enabled is False
    assert all(g.errors == () for g in gpus)


def test_units_in_cells_and_a_header_give_the_same_gpus():
    with_units, other = parse_query_gpu(read(H200 / "query-gpu.csv"))
    assert other == []
    without_units, _ = parse_query_gpu(QUERY)
    assert [g.memory_total_mib for g in with_units] == [g.memory_total_mib for g in without_units]
    assert with_units[0].power_limit_w == 700.0
    assert with_units[0].sm_clock_mhz == 345


def test_a_real_h100_reads_the_same_way():
    gpus, _ = parse_query_gpu(read(H100 / "query-gpu-noheader-nounits.csv"))
    assert [(g.name, g.memory_total_mib) for g in gpus] == [("NVIDIA H100 80GB HBM3", 81559)]


def test_not_available_cells_are_unknown_values_not_errors():
    query = edit_row(QUERY, 0, "power.draw", "[N/A]")
    query = edit_row(query, 0, "ecc.errors.uncorrected.volatile.total", "[Not Supported]")
    gpu = parse_query_gpu(query)[0][0]
    assert gpu.power_draw_w is None
    assert gpu.ecc_uncorrected is None
    assert gpu.errors == ()


@pytest.mark.parametrize("cell", ["ERR!", "[GPU requires reset]", "[Unknown Error]"])
def test_error_cells_mark_the_gpu_with_the_field(cell):
    gpus, _ = parse_query_gpu(edit_row(QUERY, 3, "temperature.gpu", cell))
    assert gpus[3].temperature_c is None
    assert gpus[3].errors == (f"temperature.gpu={cell}",)
    assert [g.index for g in gpus if g.errors] == [3]


def test_mig_enabled_is_read_with_its_not_available_utilisation():
    query = edit_row(QUERY, 0, "mig.mode.current", "Enabled")
    query = edit_row(query, 0, "utilization.gpu", "[N/A]")
    gpu = parse_query_gpu(query)[0][0]
    assert gpu.mig_enabled is True
    assert gpu.utilization_pct is None
    assert gpu.errors == ()


def test_a_gpu_missing_from_the_list_leaves_seven():
    seven = "\n".join(QUERY.splitlines()[:7]) + "\n"
    facts = facts_from(seven)
    assert facts.gpu_count == 7
    assert facts.problem is None


def test_a_line_that_is_no_gpu_row_is_returned_not_raised():
    gpus, other = parse_query_gpu(QUERY + "something else entirely\n")
    assert len(gpus) == 8
    assert other == ["something else entirely"]


# --- failures ------------------------------------------------------------------------------


def test_nvidia_smi_missing_is_a_problem_with_the_fix():
    facts = facts_from("", exit_code=None)
    assert facts.gpus == ()
    assert facts.problem.kind is GpuProblemKind.NVIDIA_SMI_MISSING
    assert "install the NVIDIA driver" in facts.problem.remedy


def test_driver_library_mismatch_keeps_the_loaded_driver_version():
    message = (
        "Failed to initialize NVML: Driver/library version mismatch\nNVML library version: 580.95\n"
    )
    facts = facts_from(message, exit_code=18, driver_version_file=read(H200 / "driver-version.txt"))
    assert facts.problem.kind is GpuProblemKind.DRIVER_MISMATCH
    assert facts.problem.detail == "Failed to initialize NVML: Driver/library version mismatch"
    assert "reboot" in facts.problem.remedy
    assert facts.driver_version == "580.159.04"


def test_a_lost_gpu_keeps_the_other_gpus():
    lines = QUERY.splitlines()
    lines[5] = (
        "Unable to determine the device handle for GPU0000:00:0B.0: GPU is lost.  "
        "Reboot the system to recover this GPU"
    )
    facts = facts_from("\n".join(lines), exit_code=15)
    assert facts.gpu_count == 7
    assert facts.problem.kind is GpuProblemKind.GPU_LOST
    assert "GPU0000:00:0B.0" in facts.problem.detail
    assert "Xid 79" in facts.problem.remedy


def test_a_lost_gpu_is_told_by_its_message_even_when_nvidia_smi_exits_zero():
    lost = "Unable to determine the device handle for GPU0000:00:0D.0: Unknown Error"
    facts = facts_from("\n".join([*QUERY.splitlines()[:7], lost]), exit_code=0)
    assert facts.problem.kind is GpuProblemKind.GPU_LOST


def test_no_devices_as_nvidia_smi_really_prints_it():
    message = read(H100 / "failures" / "index-out-of-range.txt")
    assert classify_failure(6, message).kind is GpuProblemKind.NO_DEVICES


def test_an_unknown_field_as_nvidia_smi_really_prints_it():
    problem = classify_failure(2, read(H200 / "query-gpu-badfield.txt"))
    assert problem.kind is GpuProblemKind.UNKNOWN_FIELD
    assert '"bogus.field"' in problem.detail


def test_a_hanging_nvidia_smi_stopped_by_timeout():
    assert classify_failure(124, "").kind is GpuProblemKind.TIMED_OUT


def test_an_unknown_failure_quotes_nvidia_smi():
    problem = classify_failure(255, "Something odd happened\n")
    assert problem.kind is GpuProblemKind.FAILED
    assert problem.detail == "nvidia-smi exited 255: Something odd happened"


def test_rows_of_another_field_list_are_unreadable_not_a_crash():
    facts = facts_from("0, NVIDIA H200, 143771\n")
    assert facts.problem.kind is GpuProblemKind.UNREADABLE


def test_an_empty_answer_means_no_gpus():
    assert facts_from("").problem.kind is GpuProblemKind.NO_DEVICES


# --- topo -m -------------------------------------------------------------------------------


def test_the_real_h200_topology_is_nvlink_all_to_all():
    topology = parse_topology(TOPOLOGY)
    assert topology.gpu_indices == tuple(range(8))
    assert topology.links[(0, 7)] == "NV18"
    assert topology.links[(3, 3)] == "X"
    assert topology.interconnect == "NVLink"
    assert topology.pairs_without_nvlink() == []


def test_a_real_pair_of_h200s_is_nvlinked():
    topology = parse_topology(read(H200X2 / "topo-m.txt"))
    assert topology.gpu_indices == (0, 1)
    assert topology.links[(0, 1)] == topology.links[(1, 0)] == "NV18"
    assert topology.interconnect == "NVLink"
    assert topology.pairs_without_nvlink() == []


def test_a_real_single_h100_has_no_pairs():
    topology = parse_topology(read(H100 / "topo-m.txt"))
    assert topology.gpu_indices == (0,)
    assert topology.interconnect == "single GPU"


def set_links(text: str, value_of: dict[tuple[int, int], str]) -> str:
    """The matrix with the links between GPU pairs (both directions) changed."""
    lines = text.splitlines()
    for (a, b), value in value_of.items():
        for row, column in ((a, b), (b, a)):
            cells = lines[1 + row].split("\t")
            cells[1 + column] = value
            lines[1 + row] = "\t".join(cells)
    return "\n".join(lines) + "\n"


def pcie_only(text: str) -> str:
    """The H200 matrix as a PCIe server prints it: two NUMA nodes of four GPUs."""
    pairs = [(a, b) for a in range(8) for b in range(a + 1, 8)]
    return set_links(text, {(a, b): "NODE" if a // 4 == b // 4 else "SYS" for a, b in pairs})


def test_a_pcie_only_topology_has_no_nvlink_pair():
    topology = parse_topology(pcie_only(TOPOLOGY))
    assert topology.interconnect == "PCIe"
    assert topology.links[(0, 1)] == "NODE"
    assert topology.links[(4, 0)] == "SYS"
    assert topology.pairs_without_nvlink([0, 1])[0] == "GPU0-GPU1 NODE"


def test_nvlink_pairs_beside_a_pcie_pair_are_mixed():
    topology = parse_topology(set_links(TOPOLOGY, {(6, 7): "SYS"}))
    assert topology.interconnect == "mixed"
    assert topology.pairs_without_nvlink() == ["GPU6-GPU7 SYS"]
    assert topology.pairs_without_nvlink(range(6)) == []


def test_a_copy_whose_tabs_became_spaces_parses_the_same():
    spaced = TOPOLOGY.replace("\t", "    ")
    assert parse_topology(spaced).links == parse_topology(TOPOLOGY).links


def test_nic_columns_and_rows_are_left_out():
    lines = TOPOLOGY.splitlines()
    lines[0] = lines[0].replace("GPU7\tCPU", "GPU7\tNIC0\tCPU")
    for row in range(1, 9):
        lines[row] = lines[row].replace("\t0-127", "\tSYS\t0-127", 1)
    lines.insert(9, "NIC0\t" + "SYS\t" * 8 + " X ")
    topology = parse_topology("\n".join(lines) + "\n\nNIC Legend:\n\n  NIC0: mlx5_0\n")
    assert topology.gpu_indices == tuple(range(8))
    assert topology.interconnect == "NVLink"


@pytest.mark.parametrize(
    "text", ["", "No devices were found", TOPOLOGY.replace("GPU7\tNV18", "GPU7\t")]
)
def test_no_complete_matrix_raises_value_error(text):
    with pytest.raises(ValueError):
        parse_topology(text)


def test_an_unreadable_topology_is_a_problem_of_the_facts_not_an_exception():
    facts = facts_from(QUERY, topology=CommandOutput(0, "garbage"))
    assert facts.gpu_count == 8
    assert facts.topology is None
    assert facts.problem.kind is GpuProblemKind.UNREADABLE


def test_a_failed_topology_command_leaves_the_topology_unknown():
    facts = facts_from(QUERY, topology=CommandOutput(15, "GPU is lost"))
    assert facts.topology is None


# --- driver, processes ---------------------------------------------------------------------


def test_driver_version_from_the_kernel_module():
    assert parse_driver_version(read(H200 / "driver-version.txt")) == "580.159.04"
    assert parse_driver_version(read(H100 / "driver-version.txt")) == "580.159.04"
    assert parse_driver_version("") is None


def test_compute_apps_with_and_without_units():
    with_units = parse_compute_apps(read(H100 / "compute-apps-busy.csv"))
    without = parse_compute_apps(read(H100 / "compute-apps-busy-noheader-nounits.csv"))
    for processes in (with_units, without):
        assert len(processes) == 1
        assert processes[0].process_name == "python3"
        assert processes[0].used_memory_mib == 2566
        assert processes[0].gpu_uuid == "GPU-35b032b0-7e67-19cc-aeea-dcf8cdc3abca"


def test_no_compute_apps_is_an_empty_list():
    assert parse_compute_apps(read(H200 / "compute-apps.csv")) == []


def test_all_together_on_the_real_h200_outputs():
    facts = parse_gpu_facts(
        CommandOutput(0, QUERY),
        processes=CommandOutput(0, ""),
        topology=CommandOutput(0, TOPOLOGY),
        driver_version_file=read(H200 / "driver-version.txt"),
    )
    assert facts.problem is None
    assert (facts.gpu_count, facts.model_name, facts.driver_version) == (
        8,
        "NVIDIA H200",
        "580.159.04",
    )
    assert facts.topology.interconnect == "NVLink"


def test_mixed_models_are_named_together():
    query = edit_row(QUERY, 7, "name", "NVIDIA H100 80GB HBM3")
    assert facts_from(query).model_name == "NVIDIA H200 + NVIDIA H100 80GB HBM3"
