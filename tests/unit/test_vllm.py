"""Reading vLLM: why it exited, what it serves; launch argv keep values out of the script."""

from __future__ import annotations

import json
from pathlib import Path

from cluster.decide.plan import ServeSpec
from cluster.nodes.vllm import (
    parse_supervisor_state,
    request_serve_argv,
    served_models,
)
from cluster.remote.serving.failures import error_lines, likely_cause

# Lines vLLM really printed (FACTS.md, checked on this machine).
SHM_FAILURE = (
    "RuntimeError: Insufficient space in /dev/shm for shared-memory allocation: "
    "160 MiB required, 64 MiB free"
)


def test_a_shared_memory_shortage_reads_as_out_of_memory():
    cause = likely_cause(f"INFO starting\n{SHM_FAILURE}\n")
    assert cause is not None
    assert "out of memory" in cause.summary


def test_a_missing_model_is_named():
    log = (
        "OSError: /root/.cache/huggingface/models/nope does not appear to have a file named "
        "config.json."
    )
    cause = likely_cause(log)
    assert cause is not None
    assert cause.summary == "the model was not found"


def test_a_bad_argument_is_named():
    log = "vllm serve: error: unrecognized arguments: --max-modl-len 256"
    cause = likely_cause(log)
    assert cause is not None
    assert cause.summary == "a bad vllm serve argument"


def test_an_unknown_failure_has_no_guessed_cause():
    assert likely_cause("Segmentation fault (core dumped)") is None


def test_served_models_lists_the_ids():
    body = '{"object":"list","data":[{"id":"tiny-llama","object":"model"}]}'
    assert served_models(body) == ["tiny-llama"]


def test_the_serve_request_passes_every_value_as_an_argument():
    serve = ServeSpec(argv=("vllm", "serve", "/m; reboot", "--port", "8000"))
    argv = request_serve_argv("/var/lib/vcluster", serve, "abc123", "launch7")
    script = argv[2]
    assert argv[:2] == ["sh", "-c"]
    assert "reboot" not in script and "abc123" not in script
    assert argv[3] == "/var/lib/vcluster/serve.json"
    assert json.loads(argv[4]) == {
        "spec_id": "abc123",
        "launch": "launch7",
        "argv": ["vllm", "serve", "/m; reboot", "--port", "8000"],
        "log": serve.log_path,
        "watch_titled": True,
    }


def test_the_supervisors_report_says_state_restarts_and_the_last_cause():
    report = parse_supervisor_state(
        '{"state": "backoff", "spec_id": "abc", "pid": null, "running_s": null, "restarts": 2,'
        ' "last_exit": {"cause": "VLLM::EngineCore (pid 88) ended", "at": 1.5, "ran_s": 40.1}}'
    )
    assert report is not None and not report.running
    assert (report.state, report.restarts) == ("backoff", 2)
    assert report.last_exit_cause == "VLLM::EngineCore (pid 88) ended"
    assert parse_supervisor_state("") is None
    assert parse_supervisor_state("cat: /var/lib/vcluster/vllm.json: No such file") is None


FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "vllm"


def test_a_real_worker_crash_is_summed_up_by_its_error_lines_and_cause():
    # vLLM 0.32 (CPU) on a sandbox worker whose image lacked libnuma, captured with `vcluster logs`
    log = (FIXTURES / "worker-missing-libnuma.log").read_text()
    assert error_lines(log) == [
        "Failed to import from vllm._C: ImportError('libnuma.so.1: cannot open shared object "
        "file: No such file or directory')",
        "AttributeError: '_OpNamespace' '_C' object has no attribute 'init_cpu_memory_env'",
        "Exception: WorkerProc initialization failed due to an exception in a background "
        "process. See stack trace for root cause.",
    ]
    cause = likely_cause(log)
    assert cause is not None
    assert cause.summary == "a shared library is missing in the image"
