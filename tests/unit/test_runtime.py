"""The runtime chosen on the image's facts, and the `executor` check that reports it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cluster.decide.checks import Status, check_runtime
from cluster.decide.inventory import Inventory
from cluster.decide.ray_image import recipe_for
from cluster.decide.runtime import RaySupply, assumed_runtime, choose_runtime
from cluster.facts.image import parse_image_probe

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "image-facts"
WITH_RAY = parse_image_probe((FIXTURES / "vllm-cpu-0.32.0.txt").read_text(), "sha256:" + "a" * 64)
NO_RAY = parse_image_probe(
    (FIXTURES / "vllm-cpu-noray-0.32.0.txt").read_text(), "sha256:" + "b" * 64
)
NO_VLLM = parse_image_probe((FIXTURES / "h200-host-python.txt").read_text(), "sha256:" + "c" * 64)
IMAGE = "vllm/vllm-openai:v0.32.0"
RECIPE = recipe_for(NO_RAY, IMAGE)
CAN_DERIVE = RaySupply(RECIPE)
CANNOT = RaySupply(None, "no ray.wheelhouse is set and the head cannot reach the package index")


def inventory(**changes: Any) -> Inventory:
    data: dict[str, Any] = {
        "cluster": "demo",
        "image": IMAGE,
        "nodes": [{"name": "a", "address": "10.0.0.1"}, {"name": "b", "address": "10.0.0.2"}],
        "model_cache": "/data/hf",
        "model": {"name": "meta-llama/Llama-3.1-405B-Instruct"},
    }
    return Inventory.model_validate({**data, **changes})


def test_an_image_with_ray_is_used_as_it_is_with_the_default_executor():
    gpu = choose_runtime(inventory(), WITH_RAY, CANNOT)
    assert (gpu.image, gpu.ray, gpu.executor, gpu.derive) == (IMAGE, True, "ray", None)
    cpu = choose_runtime(inventory(accelerator="cpu"), WITH_RAY, CANNOT)
    assert (cpu.ray, cpu.executor) == (True, "mp")
    assert "has Ray 2.60.0" in gpu.reason and gpu.facts == WITH_RAY.summary()


def test_an_image_without_ray_runs_as_a_derived_ray_ready_image_when_ray_can_be_had():
    for executor in (None, "ray"):
        runtime = choose_runtime(inventory(executor=executor), NO_RAY, CAN_DERIVE)
        assert (runtime.image, runtime.ray, runtime.executor) == (RECIPE.tag, True, "ray")
        assert runtime.derive == RECIPE and runtime.problem is None and not runtime.fallback
        assert RECIPE.tag in runtime.reason


def test_without_ray_and_no_way_to_add_it_the_cluster_falls_back_to_vllms_own_mode():
    runtime = choose_runtime(inventory(), NO_RAY, CANNOT)
    assert (runtime.image, runtime.ray, runtime.executor) == (IMAGE, False, "mp")
    assert runtime.fallback and runtime.problem is None
    assert "cannot reach the package index" in runtime.reason
    assert "--nnodes/--node-rank/--headless" in runtime.reason


def test_executor_ray_without_ray_and_no_way_to_add_it_is_a_problem_naming_image_and_vllm():
    runtime = choose_runtime(inventory(executor="ray"), NO_RAY, CANNOT)
    assert runtime.problem is not None and not runtime.fallback
    assert IMAGE in runtime.problem and "vLLM 0.32.0+cpu" in runtime.problem
    assert "ray.wheelhouse" in (runtime.fix or "") and "executor: mp" in (runtime.fix or "")


def test_executor_mp_with_an_image_without_ray_skips_ray_on_purpose():
    runtime = choose_runtime(inventory(executor="mp"), NO_RAY, CAN_DERIVE)
    assert (runtime.image, runtime.ray, runtime.executor, runtime.derive) == (
        IMAGE, False, "mp", None,
    )  # fmt: skip
    assert not runtime.fallback and runtime.problem is None


def test_executor_mp_with_an_image_with_ray_keeps_the_ray_cluster():
    runtime = choose_runtime(inventory(executor="mp"), WITH_RAY, CANNOT)
    assert (runtime.ray, runtime.executor) == (True, "mp")


def test_an_offline_plan_takes_the_image_to_have_ray():
    runtime = assumed_runtime(inventory())
    assert (runtime.image, runtime.ray, runtime.executor) == (IMAGE, True, "ray")
    assert "offline" in runtime.reason and runtime.facts is None


def only(results):
    assert len(results) == 1
    return results[0]


def test_the_check_passes_an_image_with_ray_and_a_derivable_one():
    with_ray = only(
        check_runtime(inventory(), WITH_RAY, choose_runtime(inventory(), WITH_RAY, CANNOT))
    )
    assert with_ray.status is Status.PASS and "Ray cluster, vLLM executor ray" in with_ray.detail
    derived = only(
        check_runtime(inventory(), NO_RAY, choose_runtime(inventory(), NO_RAY, CAN_DERIVE))
    )
    assert derived.status is Status.PASS and RECIPE.tag in derived.detail


def test_the_check_warns_on_the_fallback_and_fails_executor_ray_with_the_fix():
    fallback = only(check_runtime(inventory(), NO_RAY, choose_runtime(inventory(), NO_RAY, CANNOT)))
    assert fallback.status is Status.WARN and fallback.remedy
    asked = inventory(executor="ray")
    failed = only(check_runtime(asked, NO_RAY, choose_runtime(asked, NO_RAY, CANNOT)))
    assert failed.status is Status.FAIL and "executor: ray" in failed.detail
    assert failed.remedy and "ray.wheelhouse" in failed.remedy


def test_the_check_fails_an_image_without_vllm_and_skips_before_the_image_is_anywhere():
    no_vllm = only(
        check_runtime(inventory(), NO_VLLM, choose_runtime(inventory(), NO_VLLM, CANNOT))
    )
    assert no_vllm.status is Status.FAIL and "has no vLLM" in no_vllm.detail
    assert only(check_runtime(inventory(), None, None)).status is Status.SKIP
