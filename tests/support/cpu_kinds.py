"""The x86-64 CPU kinds vLLM's CPU build supports, each as a real /proc/cpuinfo.

Two are captures (an AMD EPYC with AVX2 only; one with AVX-512 and BF16); the AVX-512 CPU
without BF16 is the second capture less its BF16 and AMX flags (Skylake to Ice Lake servers
look like that). `torch_cpu_answers` says what torch's CPU checks, which vLLM uses to choose
its kernel build, answer on such a CPU: torch asks CPUID through cpuinfo, whose x86 flags are
the kernel's in /proc/cpuinfo.
"""

from __future__ import annotations

import re
from pathlib import Path

CPUINFO = Path(__file__).resolve().parents[1] / "fixtures" / "cpuinfo"
_BF16_AND_AMX = re.compile(r" (avx512_bf16|amx_\w+)\b")


def cpuinfo_of(kind: str) -> str:
    """/proc/cpuinfo of a CPU kind: `avx2`, `avx512` (no BF16) or `avx512-bf16`."""
    if kind == "avx2":
        return (CPUINFO / "epyc-avx2.txt").read_text()
    with_bf16 = (CPUINFO / "epyc-avx512-bf16.txt").read_text()
    if kind == "avx512-bf16":
        return with_bf16
    if kind == "avx512":
        return _BF16_AND_AMX.sub("", with_bf16)
    raise ValueError(f"unknown CPU kind {kind!r}")


CPU_KINDS = ("avx2", "avx512", "avx512-bf16")


def cpu_flags(cpuinfo: str) -> set[str]:
    """The feature flags of the first processor in a /proc/cpuinfo text."""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    raise ValueError("no flags line in this cpuinfo")


def torch_cpu_answers(cpuinfo: str) -> dict[str, bool]:
    """What `torch.cpu._is_avx512_supported()` and `_is_avx512_bf16_supported()` answer."""
    flags = cpu_flags(cpuinfo)
    avx512 = {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags
    return {"avx512": avx512, "avx512_bf16": avx512 and "avx512_bf16" in flags}
