"""The sandbox's workload image is the same for every x86-64 CPU kind vLLM supports.

vLLM chooses its kernel build when it starts, from the CPU it runs on; nothing of vcluster's
may choose for it (an image that kept only the builder's kernels, or a build check that
imported one by name, failed on CPUs without AVX-512). What runs inside the image is checked
in tests/integration/test_workload_image.py.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from cluster.sandbox.images import IMAGES_DIR
from tests.support.cpu_kinds import CPU_KINDS, cpuinfo_of, torch_cpu_answers


def _prune_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("prune", IMAGES_DIR / "vllm-cpu" / "prune.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_three_cpu_kinds_differ_in_what_torch_reports():
    answers = {kind: torch_cpu_answers(cpuinfo_of(kind)) for kind in CPU_KINDS}
    assert answers == {
        "avx2": {"avx512": False, "avx512_bf16": False},
        "avx512": {"avx512": True, "avx512_bf16": False},
        "avx512-bf16": {"avx512": True, "avx512_bf16": True},
    }


def _venv_site(root: Path) -> Path:
    site = root / "lib" / "python3.11" / "site-packages"
    for relative in (
        "vllm/_C.abi3.so", "vllm/_C_AVX2.abi3.so", "vllm/_C_AVX512.abi3.so",
        "vllm/_moe_C.abi3.so", "torch/bin/test_api", "torch/bin/protoc",
        "torch/bin/torch_shm_manager", "ray/jars/ray_dist.jar", "ray/__init__.py",
    ):  # fmt: skip
        (site / relative).parent.mkdir(parents=True, exist_ok=True)
        (site / relative).write_bytes(b"")
    return site


def test_prune_keeps_every_kernel_build_of_vllm(tmp_path: Path):
    site = _venv_site(tmp_path)
    doomed = {path.relative_to(site).as_posix() for path in _prune_module().deletions(site)}
    assert doomed == {"torch/bin/test_api", "torch/bin/protoc", "ray/jars"}
    assert not any(name.startswith("vllm/") for name in doomed)


def test_the_build_check_names_no_kernel_build():
    """The Dockerfile's checks and check_kernels.py leave the choice of kernel to vLLM."""
    context = IMAGES_DIR / "vllm-cpu"
    for name in ("Dockerfile", "check_kernels.py"):
        code = "\n".join(
            line for line in (context / name).read_text().splitlines()
            if not line.lstrip().startswith("#")
        )  # fmt: skip
        assert "vllm._C" not in code and "_C_AVX" not in code, name
