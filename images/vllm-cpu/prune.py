"""Delete what the sandbox's vLLM never loads, in the layer that installed it.

Every megabyte here is streamed to every node on every `sandbox up` after a `down`.
"""

import importlib.util
import shutil
import subprocess
from pathlib import Path

import torch

SITE = Path(importlib.util.find_spec("torch").origin).parent.parent

# vllm/platforms/cpu.py loads one of three kernel builds (about 100-200 MB each) by CPU
# feature; with AVX512-BF16 it is `_C` and the two others are never opened. The image is built
# on the machine whose nodes run it, so its CPU decides. Elsewhere all three stay.
if torch.cpu._is_avx512_supported() and torch.cpu._is_avx512_bf16_supported():
    for variant in ("_C_AVX2", "_C_AVX512"):
        for path in (SITE / "vllm").glob(f"{variant}.*.so"):
            print("removed", path.name, "(this CPU loads vllm/_C)")
            path.unlink()

# torch's C++ test binaries and protoc; Ray's Java worker jars.
for path in (SITE / "torch" / "bin").iterdir():
    if path.name != "torch_shm_manager" and path.is_file():
        path.unlink()
shutil.rmtree(SITE / "ray" / "jars", ignore_errors=True)

# Debug info that some wheels ship: vllm/_C alone is 204 MB with it, 40 MB without. Only the
# debug sections go (symbols stay, so backtraces still name functions). strip comes with g++.
for path in SITE.rglob("*.so*"):
    if path.is_file() and path.stat().st_size > 1_000_000:
        sections = subprocess.run(
            ["readelf", "-S", "-W", str(path)], capture_output=True, text=True
        ).stdout
        if ".debug_info" in sections:
            before = path.stat().st_size
            subprocess.run(["strip", "--strip-debug", str(path)], check=True)
            saved = (before - path.stat().st_size) // 1_000_000
            print("stripped debug info from", path.relative_to(SITE), f"(-{saved} MB)")
