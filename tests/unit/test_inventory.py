"""The inventory: what a valid file gives, and how each bad input is reported."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from cluster.decide.inventory import load_inventory
from cluster.errors import ExitCode, InventoryError

REPO = Path(__file__).resolve().parents[2]

MINIMAL = """\
cluster: demo
image: vllm/vllm-openai:v0.11.0
nodes:
  - {name: a, address: 10.0.0.1, gpus: 8}
  - {name: b, address: 10.0.0.2, gpus: 8}
model_cache: /data/hf
model:
  name: meta-llama/Llama-3.1-70B-Instruct
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "inventory.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(InventoryError) as caught:
        load_inventory(write(tmp_path, text))
    assert caught.value.exit_code == ExitCode.BAD_INPUT
    return caught.value.lines()


def only_problem(tmp_path: Path, text: str) -> str:
    found = problems(tmp_path, text)
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize("name", ["gpu-2x8.yaml", "gpu-4x8.yaml", "cpu-2.yaml", "gpu-models.yaml"])
def test_every_example_inventory_is_valid(name: str) -> None:
    assert load_inventory(REPO / "inventory" / name).nodes


def test_defaults_fill_what_a_minimal_inventory_leaves_out(tmp_path: Path) -> None:
    inventory = load_inventory(write(tmp_path, MINIMAL))
    assert inventory.accelerator == "nvidia"
    assert inventory.executor is None and inventory.default_executor == "ray"
    assert (inventory.ports.ray, inventory.ports.vllm) == (6379, 8000)
    assert inventory.model.tensor_parallel == "auto"
    assert inventory.ssh.trust_on_first_use is False


def test_the_first_node_is_the_head_unless_one_says_role_head(tmp_path: Path) -> None:
    assert load_inventory(write(tmp_path, MINIMAL)).head.name == "a"
    text = MINIMAL.replace(
        "{name: b, address: 10.0.0.2, gpus: 8}", "{name: b, address: 10.0.0.2, gpus: 8, role: head}"
    )
    inventory = load_inventory(write(tmp_path, text))
    assert inventory.head.name == "b"
    assert [n.name for n in inventory.workers] == ["a"]


def test_cpu_mode_defaults_to_vllms_own_multi_node_executor(tmp_path: Path) -> None:
    text = MINIMAL.replace("model_cache:", "accelerator: cpu\nmodel_cache:")
    assert load_inventory(write(tmp_path, text)).default_executor == "mp"


def test_a_node_without_a_name_is_named_after_its_address(tmp_path: Path) -> None:
    text = MINIMAL.replace("{name: a, address: 10.0.0.1, gpus: 8}", "{address: 10.0.0.1, gpus: 8}")
    assert load_inventory(write(tmp_path, text)).head.node_name == "10-0-0-1"


def test_a_local_model_path_is_mapped_into_the_container_cache(tmp_path: Path) -> None:
    text = MINIMAL.replace("meta-llama/Llama-3.1-70B-Instruct", "/data/hf/models/tiny")
    inventory = load_inventory(write(tmp_path, text))
    assert inventory.container_model_path() == "/root/.cache/huggingface/models/tiny"


def test_an_unknown_key_is_named_with_its_line(tmp_path: Path) -> None:
    text = MINIMAL.replace("model_cache: /data/hf", "model_cache: /data/hf\nmodel_cahce: /x")
    assert only_problem(tmp_path, text).endswith(
        "inventory.yaml:7: model_cahce: unknown key (check its spelling in docs/inventory.md)"
    )


def test_an_unknown_key_inside_a_node_names_the_node(tmp_path: Path) -> None:
    text = MINIMAL.replace(
        "{name: b, address: 10.0.0.2, gpus: 8}", "{name: b, address: 10.0.0.2, gpu: 8}"
    )
    assert ":5: nodes[1].gpu: unknown key" in only_problem(tmp_path, text)


def test_a_wrong_type_is_an_error_not_a_coercion(tmp_path: Path) -> None:
    text = MINIMAL.replace(
        "{name: a, address: 10.0.0.1, gpus: 8}", '{name: a, address: 10.0.0.1, gpus: "8"}'
    )
    assert ":4: nodes[0].gpus: Input should be a valid integer" in problems(tmp_path, text)[0]


def test_a_missing_required_key_is_reported(tmp_path: Path) -> None:
    text = MINIMAL.replace("image: vllm/vllm-openai:v0.11.0\n", "")
    assert only_problem(tmp_path, text).endswith("image: required key is missing")


def test_duplicate_addresses_and_names_are_reported_on_the_second_node(tmp_path: Path) -> None:
    text = MINIMAL.replace(
        "{name: b, address: 10.0.0.2, gpus: 8}", "{name: a, address: 10.0.0.1, gpus: 8}"
    )
    found = problems(tmp_path, text)
    assert any(
        ":5: nodes[1].address: duplicate address '10.0.0.1' (also nodes[0])" in p for p in found
    )
    assert any(":5: nodes[1].name: duplicate name 'a' (also nodes[0])" in p for p in found)


def test_two_heads_are_an_error(tmp_path: Path) -> None:
    text = MINIMAL.replace("gpus: 8}", "gpus: 8, role: head}")
    assert ":5: nodes[1].role: a second head" in only_problem(tmp_path, text)


def test_tp_times_pp_must_match_the_declared_gpus(tmp_path: Path) -> None:
    text = MINIMAL + "  tensor_parallel: 8\n  pipeline_parallel: 4\n"
    message = only_problem(tmp_path, text)
    assert (
        "model.tensor_parallel: tensor_parallel x pipeline_parallel = 8 x 4 = 32, but the nodes declare 16 GPUs"
        in message
    )


def test_nodes_declaring_different_gpu_counts_are_an_error(tmp_path: Path) -> None:
    text = MINIMAL.replace("10.0.0.2, gpus: 8", "10.0.0.2, gpus: 4")
    assert "nodes: nodes declare different GPU counts [4, 8]" in only_problem(tmp_path, text)


@pytest.mark.parametrize("port", [0, 65536, -1])
def test_port_numbers_out_of_range_are_errors(tmp_path: Path, port: int) -> None:
    message = only_problem(tmp_path, MINIMAL + f"ports: {{vllm: {port}}}\n")
    assert "ports.vllm: Input should be" in message


def test_two_services_on_one_port_are_an_error(tmp_path: Path) -> None:
    assert "ports.vllm: port 6379 is also ports.ray" in only_problem(
        tmp_path, MINIMAL + "ports: {ray: 6379, vllm: 6379}\n"
    )


def test_relative_paths_where_absolute_ones_are_needed_are_errors(tmp_path: Path) -> None:
    text = MINIMAL.replace(
        "model_cache: /data/hf", "model_cache: data/hf\nssh: {key_file: keys/id}"
    )
    found = problems(tmp_path, text)
    assert any("model_cache: must be an absolute path" in p for p in found)
    assert any("ssh.key_file: the path must be an absolute path" in p for p in found)


def test_a_secret_value_pasted_inline_is_refused_and_not_echoed(tmp_path: Path) -> None:
    message = only_problem(tmp_path, MINIMAL + "secrets: {api_key: sk-live-123}\n")
    assert "secrets.api_key: a secret must be a reference" in message
    assert "sk-live-123" not in message


def test_a_local_model_outside_the_cache_is_refused(tmp_path: Path) -> None:
    text = MINIMAL.replace("meta-llama/Llama-3.1-70B-Instruct", "/opt/models/llama")
    assert "model.name: a local model path must be inside model_cache (/data/hf)" in only_problem(
        tmp_path, text
    )


def test_args_that_vcluster_manages_are_refused(tmp_path: Path) -> None:
    message = only_problem(tmp_path, MINIMAL + '  args: ["--tensor-parallel-size=4"]\n')
    assert "--tensor-parallel-size is set by vcluster" in message


def test_reserved_environment_names_are_refused(tmp_path: Path) -> None:
    assert "env: VLLM_HOST_IP is set by vcluster" in only_problem(
        tmp_path, MINIMAL + "env: {VLLM_HOST_IP: 1.2.3.4}\n"
    )


def test_vllms_development_routes_cannot_be_opened_for_every_model(tmp_path: Path) -> None:
    problem = only_problem(tmp_path, MINIMAL + "env: {VLLM_SERVER_DEV_MODE: '1'}\n")
    assert "env: VLLM_SERVER_DEV_MODE would open vLLM's development routes" in problem
    assert "sleep:" in problem


def test_a_duplicate_yaml_key_is_an_error_rather_than_silently_last_wins(tmp_path: Path) -> None:
    text = MINIMAL.replace("nodes:", "image: vllm/vllm-openai:v0.10.0\nnodes:", 1)
    assert ":3: image: duplicate key" in only_problem(tmp_path, text)


def test_every_problem_is_reported_at_once_in_line_order(tmp_path: Path) -> None:
    text = """\
    cluster: Demo
    image: vllm/vllm-openai:v0.11.0
    nodes:
      - {name: a, address: 10.0.0.1, gpus: 8, role: head}
      - {name: b, address: 10.0.0.1, gpus: 8, role: head}
    model_cache: relative
    ports: {ray: 70000}
    model: {name: m}
    """
    found = problems(tmp_path, text)
    lines = [int(p.split(":")[1]) for p in found]
    assert len(found) == 5
    assert lines == sorted(lines)


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    assert only_problem(tmp_path, "cluster: a\nnodes: [\n").startswith(
        f"{tmp_path / 'inventory.yaml'}:3:"
    )


def test_a_missing_file_is_one_clear_problem(tmp_path: Path) -> None:
    with pytest.raises(InventoryError) as caught:
        load_inventory(tmp_path / "nope.yaml")
    assert caught.value.lines() == [
        f"{tmp_path / 'nope.yaml'}: cannot read the file: No such file or directory"
    ]


def test_a_yaml_list_instead_of_a_mapping_is_refused(tmp_path: Path) -> None:
    assert "the inventory must be a YAML mapping" in only_problem(tmp_path, "- a\n- b\n")


def test_ray_token_settings_cannot_be_passed_as_plain_environment(tmp_path: Path) -> None:
    found = only_problem(tmp_path, MINIMAL + "env: {RAY_AUTH_MODE: disabled}\n")
    assert "env: RAY_AUTH_MODE is set by vcluster" in found


def test_the_ray_dashboard_address_must_be_an_ip_address(tmp_path: Path) -> None:
    found = only_problem(tmp_path, MINIMAL + "ray: {dashboard_host: everywhere}\n")
    assert ":9: ray.dashboard_host: 'everywhere' is not an IP address" in found


def test_an_index_url_with_credentials_is_refused_without_repeating_them(tmp_path: Path) -> None:
    text = MINIMAL + "ray:\n  index_url: https://user:s3cr3t@nexus.corp/simple\n"
    problem = only_problem(tmp_path, text)
    assert "ray.index_url" in problem and "credentials" in problem and "ray.wheelhouse" in problem
    assert "s3cr3t" not in problem


def test_ray_settings_for_an_image_without_ray_are_checked(tmp_path: Path) -> None:
    text = MINIMAL + "ray:\n  wheelhouse: wheels\n  index_url: ftp://x\n  version: latest\n"
    found = " | ".join(problems(tmp_path, text))
    assert "ray.wheelhouse: must be an absolute path" in found
    assert "ray.index_url: 'ftp://x' is not an http(s) URL" in found
    assert "ray.version: 'latest' is not a Ray version" in found


@pytest.mark.parametrize(
    "url",
    ["https://mirror.local/simple\nRUN echo injected", "https://mirror.local/simple?token=abc"],
)
def test_an_index_url_that_would_add_to_the_recipe_or_carry_a_token_is_refused(
    tmp_path: Path, url: str
) -> None:
    text = MINIMAL + "ray:\n  index_url: " + json.dumps(url) + "\n"
    assert "ray.index_url" in only_problem(tmp_path, text)


def test_the_collective_checks_join_time_must_fit_in_its_time_limit(tmp_path: Path) -> None:
    text = MINIMAL + "collective:\n  join_timeout_s: 600\n  time_limit_s: 300\n"
    assert "join_timeout_s must be below time_limit_s" in only_problem(tmp_path, text)


SEVERAL = """\
cluster: demo
image: vllm/vllm-openai:v0.11.0
nodes:
  - {name: a, address: 10.0.0.1, gpus: 8}
  - {name: b, address: 10.0.0.2, gpus: 8}
model_cache: /data/hf
models:
  - name: meta-llama/Llama-3.1-70B-Instruct
    tensor_parallel: 8
    pipeline_parallel: 2
    keep_loaded: true
  - name: Qwen/Qwen2.5-7B-Instruct
    served_name: qwen
    tensor_parallel: 4
    pipeline_parallel: 1
    unload_after_s: 600
"""


def test_several_models_are_routed_with_their_own_parallelism(tmp_path: Path) -> None:
    inventory = load_inventory(write(tmp_path, SEVERAL))
    assert [m.served for m in inventory.model_list] == ["meta-llama/Llama-3.1-70B-Instruct", "qwen"]
    assert inventory.routed
    assert inventory.default_executor == "mp"
    assert [inventory.keeps_loaded(m) for m in inventory.model_list] == [True, False]


def test_one_model_is_kept_loaded_and_served_by_vllm_itself(tmp_path: Path) -> None:
    inventory = load_inventory(write(tmp_path, MINIMAL))
    assert inventory.model_list == (inventory.model,)
    assert not inventory.routed and inventory.default_executor == "ray"


def test_one_model_in_a_list_loaded_on_demand_is_routed(tmp_path: Path) -> None:
    text = MINIMAL.replace("model:\n  name:", "models:\n  - unload_after_s: 60\n    name:")
    assert load_inventory(write(tmp_path, text)).routed


def test_model_and_models_together_or_neither_is_an_error(tmp_path: Path) -> None:
    both = SEVERAL + "model:\n  name: x\n"
    assert "give either model: (one model) or models: (a list), not both" in only_problem(
        tmp_path, both
    )
    neither = MINIMAL.replace("model:\n  name: meta-llama/Llama-3.1-70B-Instruct\n", "")
    assert "not neither" in only_problem(tmp_path, neither)


def test_two_models_with_one_served_name_are_an_error_on_the_second(tmp_path: Path) -> None:
    text = SEVERAL.replace(
        "    served_name: qwen\n", "    served_name: meta-llama/Llama-3.1-70B-Instruct\n"
    )
    problem = only_problem(tmp_path, text)
    assert ":13: models[1].served_name:" in problem
    assert "also models[0]'s" in problem


def test_a_model_that_can_never_fit_is_refused_before_any_host_is_contacted(tmp_path: Path) -> None:
    text = SEVERAL.replace("    tensor_parallel: 4\n", "    tensor_parallel: 16\n")
    problem = only_problem(tmp_path, text)
    assert "models[1].tensor_parallel" in problem and "it can never load" in problem
    text = SEVERAL.replace("    pipeline_parallel: 1\n", "    pipeline_parallel: 3\n")
    assert "pipeline_parallel 3 is more than the 2 nodes" in only_problem(tmp_path, text)


def test_several_models_with_the_ray_executor_are_refused(tmp_path: Path) -> None:
    problem = only_problem(tmp_path, SEVERAL + "executor: ray\n")
    assert "executor:" in problem and "set executor: mp" in problem


def test_gpu_ids_give_the_count_and_must_agree_with_gpus(tmp_path: Path) -> None:
    text = SEVERAL.replace(
        "{name: b, address: 10.0.0.2, gpus: 8}",
        "{name: b, address: 10.0.0.2, gpu_ids: [0, 1, 2, 3, 4, 5, 6, 7]}",
    )
    inventory = load_inventory(write(tmp_path, text))
    assert inventory.nodes[1].declared_gpus == 8
    clash = SEVERAL.replace("gpus: 8}\n  - {name: b", "gpus: 8, gpu_ids: [0, 1]}\n  - {name: b")
    assert "nodes[0]: gpus: 8 but gpu_ids names 2" in problems(tmp_path, clash)[0]
    twice = SEVERAL.replace("gpus: 8}\n  - {name: b", "gpu_ids: [1, 1]}\n  - {name: b")
    assert "nodes[0].gpu_ids: [1, 1] names a GPU twice" in problems(tmp_path, twice)[0]


def test_a_gpu_subset_too_small_for_a_model_is_refused(tmp_path: Path) -> None:
    text = SEVERAL.replace(
        "{name: b, address: 10.0.0.2, gpus: 8}",
        "{name: b, address: 10.0.0.2, gpu_ids: [0, 1, 2, 3]}",
    )
    problem = only_problem(tmp_path, text)
    assert "models[0].tensor_parallel" in problem and "[4, 8]" in problem


def test_the_model_ports_must_not_hold_another_port(tmp_path: Path) -> None:
    problem = only_problem(tmp_path, SEVERAL + "ports: {models: 7999}\n")
    assert "ports.models uses 7999-8002, which holds ports.vllm" in problem


def test_a_model_kept_loaded_cannot_also_be_unloaded_when_idle(tmp_path: Path) -> None:
    text = SEVERAL.replace(
        "    keep_loaded: true\n", "    keep_loaded: true\n    unload_after_s: 60\n"
    )
    assert "keep_loaded: true is never unloaded" in only_problem(tmp_path, text)


SECRET = "sk-do-not-print-me"


@pytest.mark.parametrize(
    "arg",
    [
        f"--api-key={SECRET}",
        f"--api_key={SECRET}",  # vLLM reads `_` as `-`
        f"--api-k={SECRET}",  # argparse takes an unambiguous prefix
        f"--api_key.x={SECRET}",  # vLLM's dotted form sets --api-key too
        "--api-key",
    ],
)
def test_the_api_key_is_refused_in_args_in_every_spelling_and_never_echoed(
    tmp_path: Path, arg: str
) -> None:
    problem = only_problem(tmp_path, MINIMAL + f"  args: [{json.dumps(arg)}, {SECRET}]\n")
    assert ":9: model.args: " in problem
    assert f"{arg.split('=')[0].split('.')[0]} is set by vcluster" in problem
    assert "the key is given by secrets.api_key" in problem
    assert SECRET not in problem


@pytest.mark.parametrize(
    ("arg", "fix"),
    [
        ("--tensor_parallel_size=4", "is set by vcluster; use tensor_parallel"),
        ("-tp=2", "is set by vcluster; use tensor_parallel"),
        ("-tp", "is set by vcluster; use tensor_parallel"),
        ("-t", "is set by vcluster; use tensor_parallel"),
        ("--pipeline-parallel_size", "is set by vcluster; use pipeline_parallel"),
        ("-pp", "is set by vcluster; use pipeline_parallel"),
        ("--distributed_executor_backend=ray", "is set by vcluster; use executor"),
        ("--node_rank=1", "is set by vcluster; use the inventory keys"),
        ("--master_addr=10.0.0.9", "is set by vcluster; use the inventory keys"),
        ("--head", "is set by vcluster; use the inventory keys"),
        ("--served_model_name=other", "is set by vcluster; use served_name"),
        ("--config=serve.yaml", "is refused (a config file could set what vcluster manages)"),
        ("--hf_token=hf_x", "is refused (args show in `ps`): give the token by secrets.hf_token"),
    ],
)
def test_managed_options_are_refused_whatever_their_spelling(
    tmp_path: Path, arg: str, fix: str
) -> None:
    problem = only_problem(tmp_path, MINIMAL + f"  args: [{json.dumps(arg)}]\n")
    assert f"{arg.split('=')[0]} {fix}" in problem


def test_options_vcluster_does_not_manage_pass_in_any_spelling(tmp_path: Path) -> None:
    args = ["--dtype", "bfloat16", "--max_model_len=256", "--enable-prefix-caching", "-O3",
            "--compilation-config.pass_config.fuse_allreduce_rms=false", "--", "-q", "fp8"]  # fmt: skip
    inventory = load_inventory(write(tmp_path, MINIMAL + f"  args: {json.dumps(args)}\n"))
    assert inventory.primary_model.args == args


@pytest.mark.parametrize(
    "served",
    ["meta-llama/Llama-3.1-8B-Instruct", "Qwen/Qwen2.5-7B-Instruct", "llama3:8b", "tiny-a",
     "org/model_v1.5", "a" * 128],
)  # fmt: skip
def test_hugging_face_ids_and_plain_names_are_valid_served_names(
    tmp_path: Path, served: str
) -> None:
    inventory = load_inventory(write(tmp_path, MINIMAL + f"  served_name: {json.dumps(served)}\n"))
    assert inventory.primary_model.served == served
    by_name = MINIMAL.replace("meta-llama/Llama-3.1-70B-Instruct", json.dumps(served))
    assert load_inventory(write(tmp_path, by_name)).primary_model.served == served


@pytest.mark.parametrize(
    ("served", "why"),
    [
        ("x/../../ranks", "no `.` or `..` part"),
        ("./x", "no `.` or `..` part"),
        ("a//b", "no `//`"),
        ("a/", "no trailing /"),
        ("/ranks", "must not start with /"),
        ("a b", "no spaces or line breaks"),
        ("a\nmodel injected", "no spaces or line breaks"),
        ("modèle", "only letters, digits"),
        ("a%2Fb", "only letters, digits"),
        ("a" * 129, "at most 128 characters"),
    ],
)
def test_a_served_name_outside_the_safe_set_is_refused_on_its_line(
    tmp_path: Path, served: str, why: str
) -> None:
    problem = only_problem(tmp_path, MINIMAL + f"  served_name: {json.dumps(served)}\n")
    assert ":9: model.served_name: " in problem and why in problem
    assert "\n" not in problem  # the value is shown quoted, a line break as \n


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("x/../../ranks", "no `.` or `..` part"),
        ("org/a model", "no spaces or line breaks"),
        (
            "org/" + "m" * 130,
            "a served name has at most 128 characters: give a shorter served_name",
        ),
    ],
)
def test_a_model_name_served_as_it_is_follows_the_same_rules(
    tmp_path: Path, name: str, why: str
) -> None:
    problem = only_problem(tmp_path, MINIMAL.replace("meta-llama/Llama-3.1-70B-Instruct", name))
    assert why in problem
    assert ":8: model.name: " in problem or ":7: model: " in problem


def test_a_long_local_path_is_valid_with_a_short_served_name(tmp_path: Path) -> None:
    path = "/data/hf/" + "/".join(["folder"] * 30)
    text = MINIMAL.replace("meta-llama/Llama-3.1-70B-Instruct", path) + "  served_name: m\n"
    assert load_inventory(write(tmp_path, text)).primary_model.served == "m"


def test_a_local_model_path_that_goes_up_out_of_the_cache_is_refused(tmp_path: Path) -> None:
    text = MINIMAL.replace("meta-llama/Llama-3.1-70B-Instruct", "/data/hf/../../etc/models")
    problem = only_problem(tmp_path, text)  # one problem: not also "inside model_cache"
    assert ":8: model.name: no `.` or `..` part" in problem
    assert "'/data/hf/../../etc/models'" in problem


def test_a_source_folder_with_a_dot_dot_part_is_refused(tmp_path: Path) -> None:
    problem = only_problem(tmp_path, MINIMAL + "  source: /srv/models/../../etc\n")
    assert ":9: model.source: source must not go up a folder (`..`)" in problem


def test_a_model_cache_with_a_dot_dot_segment_is_refused_with_its_line(tmp_path: Path) -> None:
    text = MINIMAL.replace("model_cache: /data/hf", "model_cache: /data/../etc")
    assert text != MINIMAL
    problem = only_problem(tmp_path, text)
    assert "model_cache" in problem and "`..`" in problem


def test_a_model_may_say_how_it_sleeps_and_off_is_read_as_yaml_writes_it(tmp_path: Path) -> None:
    text = SEVERAL + "    sleep: 2\n"
    assert load_inventory(write(tmp_path, text)).model_list[1].sleep == 2
    for off in ("off", '"off"', "false"):
        inventory = load_inventory(write(tmp_path, SEVERAL + f"    sleep: {off}\n"))
        assert inventory.model_list[1].sleep == "off"
    assert load_inventory(write(tmp_path, SEVERAL)).model_list[1].sleep is None


@pytest.mark.parametrize("value", ["3", "0", "true", "on", '"1"', "1.0"])
def test_a_sleep_level_vllm_does_not_have_is_refused_naming_the_key(
    tmp_path: Path, value: str
) -> None:
    problem = only_problem(tmp_path, SEVERAL + f"    sleep: {value}\n")
    assert "models[1].sleep" in problem and "must be 1, 2 or off" in problem


def test_sleep_on_the_cpu_platform_is_refused_as_vllm_refuses_it(tmp_path: Path) -> None:
    text = SEVERAL.replace("model_cache:", "accelerator: cpu\nmodel_cache:") + "    sleep: 1\n"
    problem = only_problem(tmp_path, text)
    assert "models[1].sleep" in problem and "no sleep mode on the CPU platform" in problem
    text = SEVERAL.replace("model_cache:", "accelerator: cpu\nmodel_cache:") + "    sleep: off\n"
    assert load_inventory(write(tmp_path, text)).model_list[1].sleep == "off"


def test_a_model_kept_loaded_cannot_sleep(tmp_path: Path) -> None:
    kept = SEVERAL.replace("    keep_loaded: true\n", "    keep_loaded: true\n    sleep: 1\n")
    problem = only_problem(tmp_path, kept)
    assert "models[0].sleep" in problem and "never gives way" in problem
    assert "model.sleep" in only_problem(tmp_path, MINIMAL + "  sleep: 2\n")


def test_sleep_mode_in_args_is_refused_for_the_sleep_key(tmp_path: Path) -> None:
    message = only_problem(tmp_path, SEVERAL + '    args: ["--enable-sleep-mode"]\n')
    assert "--enable-sleep-mode is set by vcluster; use sleep: 1 or 2" in message
