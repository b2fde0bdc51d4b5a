"""The argv `exec` and `logs` run on a node: user words stay separate argv items."""

from __future__ import annotations

from cluster.decide.node_commands import exec_argv, logs_argv


def test_exec_passes_the_command_as_argv_items():
    argv = exec_argv("vcluster-demo", ["ray", "status", "--address", "x; rm -rf /"])
    assert argv == ["docker", "exec", "vcluster-demo", "ray", "status", "--address", "x; rm -rf /"]


def test_exec_without_a_command_opens_an_interactive_shell():
    argv = exec_argv("vcluster-demo", [])
    assert argv[:4] == ["docker", "exec", "-it", "vcluster-demo"]


def test_vllm_logs_tail_the_serve_log_in_the_container():
    assert logs_argv("c", "vllm", tail=50, follow=True) == [
        "docker", "exec", "c", "tail", "-n", "50", "-f", "/var/log/vcluster-vllm.log",
    ]  # fmt: skip


def test_container_logs_use_docker_logs():
    assert logs_argv("c", "container", tail=10, follow=False) == [
        "docker", "logs", "--tail", "10", "c",
    ]  # fmt: skip


def test_ray_logs_pass_the_line_count_as_an_argument_not_inside_the_script():
    argv = logs_argv("c", "ray", tail=7, follow=False)
    script = argv[argv.index("-c") + 1]
    assert "7" not in script
    assert argv[argv.index("-n") + 1] == "7"


def test_models_logs_tail_every_models_log_with_the_count_as_an_argument():
    argv = logs_argv("c", "models", tail=7, follow=True)
    assert argv[:6] == ["docker", "exec", "c", "sh", "-c", argv[5]]
    assert "/var/log/vcluster-models/*.log" in argv[5] and "7" not in argv[5]
    assert argv[6:] == ["tail", "-n", "7", "-f"]


def test_the_router_in_front_of_one_model_has_its_own_log():
    assert logs_argv("c", "router", tail=5, follow=False) == [
        "docker", "exec", "c", "tail", "-n", "5", "/var/log/vcluster-router.log"
    ]  # fmt: skip
