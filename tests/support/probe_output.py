"""Probe outputs for tests: real captures, and outputs composed from real nvidia-smi captures.

The 8 x H200 fixtures hold what nvidia-smi printed, command by command; `compose_probe`
puts such outputs into the probe's section format, so the whole parse path runs on them.
Sections that no capture covers (Docker, disk, route) get plain, typical values.
"""

from __future__ import annotations

from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
H200 = FIXTURES / "gpu" / "h200x8"
H100 = FIXTURES / "gpu" / "h100x1"
H200X2 = FIXTURES / "gpu" / "h200x2"
FABRIC = FIXTURES / "fabric"


def read(path: Path) -> str:
    """A fixture's text, exactly as captured."""
    return path.read_text()


# (exit code or None for a missing tool, stdout, stderr)
Section = tuple[int | None, str, str]

GIB_IN_KB = 1 << 20

TYPICAL_SECTIONS: dict[str, Section] = {
    "clock": (0, "1795568913.763376890", ""),
    "hostname": (0, "gpu-a", ""),
    "cpus": (0, "128", ""),
    "memory": (0, "MemTotal:       2113531396 kB\nMemAvailable:   2090000000 kB", ""),
    "docker-version": (0, "28.3.3", ""),
    "docker-runtimes": (
        0,
        '{"io.containerd.runc.v2":{"path":"runc","status":{}},'
        '"nvidia":{"path":"nvidia-container-runtime"},"runc":{"path":"runc"}}',
        "",
    ),
    "nvidia-toolkit": (0, "/usr/bin/nvidia-container-runtime-hook\n/usr/bin/nvidia-ctk", ""),
    "shm": (
        0,
        "Filesystem     1024-blocks  Used Available Capacity Mounted on\n"
        f"tmpfs          {512 * GIB_IN_KB}     0 {512 * GIB_IN_KB}       0% /dev/shm",
        "",
    ),
    "cache-disk": (
        0,
        "Filesystem     1024-blocks     Used Available Capacity Mounted on\n"
        f"/dev/nvme0n1   {7000 * GIB_IN_KB} 1000 {3000 * GIB_IN_KB}      1% /data",
        "",
    ),
    "route": (0, "10.0.0.1 dev ens9f0 src 10.0.0.2 uid 0 \\    cache ", ""),
    "addresses": (0, "2: ens9f0    inet 10.0.0.2/24 brd 10.0.0.255 scope global ens9f0", ""),
    "listening": (
        0,
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid\n"
        "   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0",
        "",
    ),
}


def h200_sections() -> dict[str, Section]:
    """The probe's sections of an 8 x H200 host: the real nvidia-smi captures, typical rest."""
    return {
        **TYPICAL_SECTIONS,
        "gpu-query": (0, read(H200 / "query-gpu-noheader-nounits.csv"), ""),
        "gpu-apps": (0, "", ""),
        "gpu-topology": (0, read(H200 / "topo-m.txt"), ""),
        "driver": (0, read(H200 / "driver-version.txt"), ""),
        "gpu-fabric": (0, read(H200 / "nvidia-smi-q.xml"), ""),
        # constructed (the lent machines forbid trying multicast): an NVSwitch host where the
        # multicast program bound every GPU; see fixtures/fabric/README.md
        "multicast": (0, read(FABRIC / "constructed" / "multicast-try-h200x8-bound.txt"), ""),
    }


def compose_probe(sections: dict[str, Section], *, complete: bool = True) -> str:
    """The text the probe script prints for these sections."""
    lines = []
    for name, (exit_code, stdout, stderr) in sections.items():
        if exit_code is None:
            lines.append(f"@@vcluster {name} missing {stdout or name}@@")
            continue
        lines.append(f"@@vcluster {name} rc={exit_code}@@")
        if stdout.strip("\n"):
            lines.append(stdout.rstrip("\n"))
        if stderr:
            lines += [f"@@vcluster {name} stderr@@", stderr.rstrip("\n")]
    if complete:
        lines.append("@@vcluster end@@")
    return "\n".join(lines) + "\n"
