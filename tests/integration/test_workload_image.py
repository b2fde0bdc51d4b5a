"""The sandbox's workload image on every x86-64 CPU kind vLLM supports, run for real.

vLLM chooses one of its kernel builds from torch's CPU checks when it starts. Here that choice
is made inside the built image with torch's checks answering as each CPU kind of
tests/support/cpu_kinds.py would, and the chosen library is only looked up, never loaded (a
build for AVX-512 must not run on a CI machine without it). The kernels that fit this machine's
CPU are then loaded for real by the image's own build check.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from cluster.sandbox.dockerd import ensure_local_docker
from cluster.sandbox.images import WORKLOAD_IMAGE, image_id
from tests.support.cpu_kinds import CPU_KINDS, cpuinfo_of, torch_cpu_answers

pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox's Docker daemon needs root"),
]

# Runs in the image. argv: whether torch reports AVX-512, and AVX-512 BF16 ("1"/"0"), then the
# script to run as __main__ (or "-" for vLLM's kernel import alone). Prints one JSON line.
AS_IF_ON_CPU = """\
import importlib.abc, importlib.machinery, json, runpy, sys
import torch
avx512, bf16, script = sys.argv[1] == "1", sys.argv[2] == "1", sys.argv[3]
torch.cpu._is_avx512_supported = lambda: avx512
torch.cpu._is_avx512_bf16_supported = lambda: bf16
requested = []

class LookUpOnly(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.startswith("vllm._C"):
            requested.append(name)
            raise ImportError("looked up, not loaded: " + name)
        return None

sys.meta_path.insert(0, LookUpOnly())
status = 0
if script == "-":
    from vllm.platforms.cpu import CpuPlatform
    CpuPlatform.import_kernels()
else:
    sys.argv = [script]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        status = exc.code or 0
import vllm
present = [n for n in requested
           if importlib.machinery.PathFinder.find_spec(n.rpartition(".")[2], vllm.__path__)]
print("RESULT " + json.dumps({"requested": requested, "present": present, "status": status}))
"""


@pytest.fixture(scope="module")
def docker_argv() -> list[str]:
    docker = ensure_local_docker()
    if image_id(docker, WORKLOAD_IMAGE) is None:
        pytest.fail(f"{WORKLOAD_IMAGE} is not built: `make images` (make test) builds it first")
    return docker.argv("run", "--rm", "--network", "none", "--entrypoint", "python3")


def _as_if_on(docker_argv: list[str], kind: str, script: str = "-") -> dict:
    answers = torch_cpu_answers(cpuinfo_of(kind))
    flags = ["1" if answers["avx512"] else "0", "1" if answers["avx512_bf16"] else "0"]
    done = subprocess.run(
        [*docker_argv, WORKLOAD_IMAGE, "-c", AS_IF_ON_CPU, *flags, script],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    results = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and results, done.stderr[-2000:]
    return json.loads(results[-1].removeprefix("RESULT "))


def test_on_every_cpu_kind_vllm_finds_the_kernel_build_it_chooses(docker_argv):
    chosen = {}
    for kind in CPU_KINDS:
        result = _as_if_on(docker_argv, kind)
        assert len(result["requested"]) == 1, (kind, result)
        assert result["present"] == result["requested"], f"{kind}: not in the image: {result}"
        chosen[kind] = result["requested"][0]
    assert len(set(chosen.values())) == len(CPU_KINDS), f"one build for two CPU kinds: {chosen}"


@pytest.mark.slow  # about 20 s: two containers of the image per CPU kind
def test_the_build_check_lets_vllm_choose_on_every_cpu_kind(docker_argv):
    for kind in CPU_KINDS:
        alone = _as_if_on(docker_argv, kind)
        check = _as_if_on(docker_argv, kind, "/opt/vcluster/check_kernels.py")
        assert check["requested"] == alone["requested"], f"{kind}: the check chose for vLLM"
        assert check["status"] == 1, f"{kind}: the check passed with no kernel loaded"


def test_the_build_check_loads_the_kernels_of_this_machines_cpu(docker_argv):
    done = subprocess.run(
        [*docker_argv, WORKLOAD_IMAGE, "/opt/vcluster/check_kernels.py"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "vLLM's CPU kernels loaded" in done.stdout
