"""Benchmark on a real GPU: vLLM's sleep mode against a cold start, two models on one GPU.

Measures, for issue 22, with vLLM 0.26.0 on one NVIDIA GPU: the time to first token of a cold
start (process start, weight load, torch.compile, CUDA graphs, first request); of a wake from
sleep level 1 (weights kept in host memory) and level 2 (weights dropped, reloaded from disk);
the GPU memory (nvidia-smi, per process) and host memory (RSS) a sleeping server holds; then
requests alternating A, B, A, B with one model awake at a time (the other put to sleep first).

Then the same through vcluster's router and agent (cluster/remote/serving) run as plain
processes on that machine: A sleeps at level 1, B at level 2, requests A, B, A, B... go through
the router, which puts the awake model to sleep and wakes (or starts) the asked one.

Runs on the lent GPU machine (device kind `nvidia-h200`), as root, from the repository root,
with python3 of that machine (its torch 2.11.0) and the vLLM 0.26.0 wheels carried as the
pieces of one tar in CARRY (docs/performance.md, "Sleep mode on a real GPU (issue 22)"):

    PYTHONUNBUFFERED=1 python3 bench/sleep_on_gpu --carry /root/carry --out "$OUT"

`--phases` picks among: setup (install the wheels into /tmp/site, make the two models from
configs with random weights), direct (cold start of A; level 1 and level 2 sleep and wake of A;
cold start of B while A sleeps; A, B alternating at level 1 then level 2), routed (the router in
front), restart (A killed and served again with warm compile caches; off by default). Default:
setup,direct,routed. Each phase has a deadline inside the device's 600 s per command, and
OUT/sleep.json is rewritten after every phase, so a run stopped midway keeps what it measured.
Standard library only: it runs beside vLLM, not inside it.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
SITE = Path("/tmp/site")
WHEELHOUSE = Path("/root/wheelhouse")
MODELS = Path("/root/models")
PORTS = {"a": 18001, "b": 18002}
GPU_MEMORY_UTILIZATION = 0.45
"""Per model: two fit awake at once, so a failed sleep cannot make a wake run out of memory."""
MAX_MODEL_LEN = 2048
BUDGET_S = 585.0
"""The whole run, inside the device's 600 s per command."""
READY_TIMEOUT_S = 300.0
REQUEST_TIMEOUT_S = 60.0
WAKE_REPEATS = 3
ALTERNATIONS = 4

# Llama shape of about 1.9 B parameters (3.9 GB in bf16): loads in seconds, compiles for long.
MODEL_SHAPE = {
    "hidden_size": 2560,
    "intermediate_size": 6912,
    "num_hidden_layers": 28,
    "num_attention_heads": 20,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "max_position_embeddings": 4096,
}
SEEDS = {"a": 1234, "b": 4321}

MAKE_MODELS = r"""
import json, sys, time
import torch
sys.path.insert(0, sys.argv[1])
from make_tiny_model import train_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM
shape, seeds, out = json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
tokenizer = train_tokenizer()
tokenizer.model_max_length = shape["max_position_embeddings"]
for name, seed in seeds.items():
    started = time.monotonic()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False, **shape)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(f"{out}/{name}")
    tokenizer.save_pretrained(f"{out}/{name}")
    print(json.dumps({"model": name, "parameters": model.num_parameters(),
                      "seconds": round(time.monotonic() - started, 2)}), flush=True)
    del model
    torch.cuda.empty_cache()
"""

LOG_FIGURES = {
    "weights_load_s": r"Loading weights took ([\d.]+) seconds",
    "model_load_s": r"Model loading took [\d.]+ GiB(?: memory)? and ([\d.]+) seconds",
    "torch_compile_s": r"torch.compile took ([\d.]+) s in total",
    "graph_capture_s": r"Graph capturing finished in ([\d.]+) secs",
    "init_engine_s": r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+)",
}


class Run:
    """The results of one run, written to OUT/sleep.json after every phase."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.started = time.monotonic()
        self.data: dict[str, Any] = {"phases": {}, "errors": []}

    def left(self) -> float:
        return BUDGET_S - (time.monotonic() - self.started)

    def save(self) -> None:
        (self.out / "sleep.json").write_text(json.dumps(self.data, indent=1, default=str))

    def phase(self, name: str, need_s: float, body: Callable[[], Any]) -> bool:
        """Run one phase if `need_s` seconds are left; record its result or its error."""
        if self.left() < need_s:
            self.data["phases"][name] = {
                "skipped": f"{self.left():.0f} s left, {need_s:.0f} s needed"
            }
            print(f"[{name}] skipped: {self.left():.0f} s left", flush=True)
            self.save()
            return False
        began = time.monotonic()
        print(f"[{name}] start, {self.left():.0f} s left", flush=True)
        try:
            result = body()
            ok = True
        except Exception as error:  # a broken phase must not lose the others
            result = {"error": f"{type(error).__name__}: {error}"}
            self.data["errors"].append(f"{name}: {result['error']}")
            ok = False
        result = result if isinstance(result, dict) else {"result": result}
        result["phase_s"] = round(time.monotonic() - began, 2)
        self.data["phases"][name] = result
        print(f"[{name}] {'done' if ok else 'FAILED'} in {result['phase_s']} s: "
              f"{json.dumps(result, default=str)[:600]}", flush=True)  # fmt: skip
        self.save()
        return ok


def sh(
    argv: list[str], timeout: float, log: Path | None = None, env: dict[str, str] | None = None
) -> str:
    """Run argv; its output is returned (and appended to log); a non-zero exit raises."""
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, env=env, check=False
    )
    output = done.stdout + done.stderr
    if log is not None:
        with log.open("a") as file:
            file.write(f"$ {' '.join(argv)[:300]}\n{output}\n")
    if done.returncode != 0:
        raise RuntimeError(f"{argv[:4]} exited {done.returncode}: {output.strip()[-800:]}")
    return output


def vllm_env() -> dict[str, str]:
    return os.environ | {
        "PYTHONPATH": str(SITE),
        "VLLM_SERVER_DEV_MODE": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "PYTHONUNBUFFERED": "1",
    }


# ---- install -------------------------------------------------------------------------------


def install(carry: Path, out: Path) -> dict[str, Any]:
    """Join and untar the pieces, install every wheel, then any newer machine package needed."""
    log = out / "install.log"
    pieces = sorted(carry.glob("vllm.tar.*"))
    if not pieces:
        raise RuntimeError(f"no pieces vllm.tar.* in {carry}")
    WHEELHOUSE.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    joined = subprocess.Popen(["cat", *map(str, pieces)], stdout=subprocess.PIPE)
    subprocess.run(
        ["tar", "-x", "-C", str(WHEELHOUSE)], stdin=joined.stdout, check=True, timeout=120
    )
    joined.wait(timeout=10)
    untar_s = time.monotonic() - began
    wheels = sorted(map(str, (WHEELHOUSE / "whl").glob("*.whl")))
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir", "--disable-pip-version-check", "--target", str(SITE)]  # fmt: skip
    sh([*pip, *wheels], timeout=300, log=log)
    installed_s = time.monotonic() - began
    extra = needed_newer(WHEELHOUSE / "maybe", log)
    if extra:
        sh([*pip, "--upgrade", *extra], timeout=60, log=log)
    return {
        "pieces": len(pieces),
        "wheels": len(wheels),
        "untar_s": round(untar_s, 1),
        "install_s": round(installed_s, 1),
        "newer_than_machine": [Path(w).name for w in extra],
        "conflicts": [line for line in log.read_text().splitlines() if line.startswith("CONFLICT")],
    }


def needed_newer(maybe: Path, log: Path) -> list[str]:
    """The carried wheels of machine packages whose machine version misses a requirement."""
    from importlib import metadata

    from packaging.markers import Marker
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    requested: dict[str, list[Requirement]] = {}
    for dist in metadata.distributions(path=[str(SITE)]):
        for line in dist.requires or []:
            requirement = Requirement(line)
            marker: Marker | None = requirement.marker
            if marker is None or marker.evaluate({"extra": ""}):
                requested.setdefault(canonicalize_name(requirement.name), []).append(requirement)
    chosen, notes = [], []
    for wheel in sorted(maybe.glob("*.whl")):
        name = canonicalize_name(wheel.name.split("-")[0])
        try:
            have = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            have = None
        missed = [
            str(r)
            for r in requested.get(name, [])
            if have is None or not r.specifier.contains(have, prereleases=True)
        ]
        if missed:
            chosen.append(str(wheel))
            notes.append(f"{name} {have} misses {missed}: installing {wheel.name}")
    carried: dict[str, str] = {
        canonicalize_name(d.metadata["Name"]): d.version
        for d in metadata.distributions(path=[str(SITE)])
    }
    for wanted, requirements in sorted(requested.items()):
        if wanted in carried:
            for requirement in requirements:
                if not requirement.specifier.contains(Version(carried[wanted]), prereleases=True):
                    notes.append(
                        f"CONFLICT: carried {wanted} {carried[wanted]} misses {requirement}"
                    )
    with log.open("a") as file:
        file.write("\n".join(notes) + "\n")
    return chosen


# ---- models --------------------------------------------------------------------------------


def make_models(out: Path) -> dict[str, Any]:
    """Two Llama models from one config, random weights of two seeds, the sandbox's tokenizer."""
    output = sh(
        [sys.executable, "-c", MAKE_MODELS, str(REPO / "images" / "tiny-model"),
         json.dumps(MODEL_SHAPE), json.dumps(SEEDS), str(MODELS)],
        timeout=240, log=out / "install.log",
    )  # fmt: skip
    made = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    sizes = {
        name: sum(f.stat().st_size for f in (MODELS / name).glob("*.safetensors")) for name in SEEDS
    }
    return {
        "models": made,
        "shape": MODEL_SHAPE,
        "weights_mib": {k: v >> 20 for k, v in sizes.items()},
    }


def stream_first_token(
    port: int,
    model: str,
    count: int,
    headers: dict[str, str] | None = None,
    timeout: float = REQUEST_TIMEOUT_S,
) -> dict[str, float]:
    """A streamed completion: seconds to its first token, and to its end (8 tokens).

    `count` makes each prompt new: no prefix-cache hit."""
    body = {"model": model, "prompt": f"Request {count} to {model}: the quick brown fox",
            "max_tokens": 8, "temperature": 0, "stream": True, "ignore_eos": True}  # fmt: skip
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    began = time.monotonic()
    first, chunks = None, 0
    try:
        connection.request(
            "POST", "/v1/completions", json.dumps(body),
            {"Content-Type": "application/json", **(headers or {})},
        )  # fmt: skip
        response = connection.getresponse()
        if response.status != 200:
            raise RuntimeError(f"{model} completion: {response.status} {response.read()[:300]!r}")
        for line in response:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            if json.loads(line[6:]).get("choices"):
                chunks += 1
                first = first if first is not None else time.monotonic() - began
    finally:
        connection.close()
    if first is None:
        raise RuntimeError(f"{model}: the stream carried no token")
    return {
        "ttft_s": round(first, 4),
        "total_s": round(time.monotonic() - began, 4),
        "chunks": chunks,
    }


# ---- one vLLM server -----------------------------------------------------------------------


class Server:
    """One `vllm serve` with sleep mode on a loopback port, its log under OUT."""

    def __init__(self, name: str, out: Path, log_name: str | None = None) -> None:
        self.name = name
        self.port = PORTS[name]
        self.log = out / (log_name or f"server-{name}.log")
        self.process: subprocess.Popen[bytes] | None = None
        self.level = 0  # the sleep level it is at; 0 = awake
        self.prompt_count = 0

    def start(self) -> float:
        argv = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(MODELS / self.name),
                "--served-model-name", self.name, "--host", "127.0.0.1", "--port", str(self.port),
                "--enable-sleep-mode", "--gpu-memory-utilization", str(GPU_MEMORY_UTILIZATION),
                "--dtype", "bfloat16", "--max-model-len", str(MAX_MODEL_LEN)]  # fmt: skip
        started = time.monotonic()
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=vllm_env(),
                                            process_group=0)  # fmt: skip
        return started

    def wait_ready(self, deadline_s: float) -> None:
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"vllm serve {self.name} exited {self.process.returncode}: "
                                   f"{self.log_tail()}")  # fmt: skip
            try:
                status, _ = self.call("GET", "/health", timeout=2)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(
            f"vllm serve {self.name} not ready in {deadline_s:.0f} s: {self.log_tail()}"
        )

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-1500:]

    def call(
        self, method: str, path: str, body: dict[str, Any] | None = None, timeout: float = 120
    ) -> tuple[int, str]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            payload = json.dumps(body) if body is not None else None
            connection.request(method, path, payload, {"Content-Type": "application/json"})
            response = connection.getresponse()
            return response.status, response.read().decode(errors="replace")
        finally:
            connection.close()

    def post_ok(self, path: str, body: dict[str, Any] | None = None) -> float:
        began = time.monotonic()
        status, text = self.call("POST", path, body)
        if status != 200:
            raise RuntimeError(f"{self.name} POST {path}: {status} {text[:300]}")
        return time.monotonic() - began

    def first_token(self) -> dict[str, float]:
        self.prompt_count += 1
        return stream_first_token(self.port, self.name, self.prompt_count)

    def sleep(self, level: int) -> float:
        seconds = self.post_ok(f"/sleep?level={level}")
        self.level = level
        return seconds

    def wake(self) -> dict[str, float]:
        """Wake at the level it sleeps at; level 2 reloads the weights from disk between."""
        steps: dict[str, float] = {}
        if self.level == 2:
            steps["wake_weights_s"] = self.post_ok("/wake_up?tags=weights")
            steps["reload_weights_s"] = self.post_ok(
                "/collective_rpc", {"method": "reload_weights"}
            )
            steps["wake_kv_cache_s"] = self.post_ok("/wake_up?tags=kv_cache")
        else:
            steps["wake_s"] = self.post_ok("/wake_up")
        self.level = 0
        return {k: round(v, 4) for k, v in steps.items()}

    def is_sleeping(self) -> bool:
        return bool(json.loads(self.call("GET", "/is_sleeping")[1])["is_sleeping"])

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)

    def log_figures(self) -> dict[str, float]:
        return log_figures(self.log.read_text(errors="replace"))

    def memory(self) -> dict[str, Any]:
        """GPU memory of its processes (nvidia-smi, per PID) and their host RSS."""
        assert self.process is not None
        tree = process_tree(self.process.pid)
        per_pid = gpu_memory_per_pid()
        return {
            "gpu_mib": sum(per_pid.get(pid, 0) for pid in tree),
            "gpu_pids": {str(pid): per_pid[pid] for pid in tree if pid in per_pid},
            "host_rss_mib": sum(rss_mib(pid) for pid in tree),
            "device_used_mib": device_used_mib(),
        }


def log_figures(text: str) -> dict[str, float]:
    """The cold start's parts as vLLM logs them (the last of each)."""
    figures = {}
    for key, pattern in LOG_FIGURES.items():
        found = re.findall(pattern, text)
        if found:
            figures[key] = float(found[-1])
    return figures


def process_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, queue = [], [root]
    while queue:
        pid = queue.pop()
        tree.append(pid)
        queue.extend(children.get(pid, []))
    return tree


def rss_mib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) >> 10
    except OSError:
        pass
    return 0


def gpu_memory_per_pid() -> dict[int, int]:
    output = sh(
        ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
        timeout=20,
    )
    usage = {}
    for line in output.splitlines():
        pid, _, mib = line.partition(",")
        if pid.strip().isdigit() and mib.strip().isdigit():
            usage[int(pid)] = int(mib)
    return usage


def device_used_mib() -> int:
    output = sh(
        ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"], timeout=20
    )
    return int(output.split()[0])


def settled_memory(server: Server) -> dict[str, Any]:
    """Memory once nvidia-smi reads the same twice in a row (freeing is not instant)."""
    last = server.memory()
    for _ in range(6):
        time.sleep(0.5)
        now = server.memory()
        if now["gpu_mib"] == last["gpu_mib"]:
            return now
        last = now
    return last


# ---- through vcluster's router and agent ---------------------------------------------------

STATE = Path("/root/vc-state")
ROUTER_PORT, AGENT_PORT = 18000, 18099
ROUTED_LEVELS = {"a": 1, "b": 2}
"""A sleeps at level 1 and B at level 2: alternating requests wake one of each."""
ROUTED_REQUESTS = 8


def routed_config() -> str:
    """serving.json for one node with one GPU: models A and B with sleep mode, as `up` writes it."""
    sys.path.insert(0, str(REPO))
    from cluster.remote.serving.catalog import ModelEntry, NodeDevices, ServingConfig

    def entry(name: str, index: int) -> ModelEntry:
        argv = (sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(MODELS / name),
                "--served-model-name", name, "--gpu-memory-utilization", str(GPU_MEMORY_UTILIZATION),
                "--dtype", "bfloat16", "--max-model-len", str(MAX_MODEL_LEN))  # fmt: skip
        return ModelEntry(name, argv, 1, 1, keep_loaded=False, unload_after_s=None,
                          api_port=18100 + 2 * index, master_port=18101 + 2 * index,
                          sleep=ROUTED_LEVELS[name])  # fmt: skip

    config = ServingConfig(
        cluster="gpu", accelerator="nvidia", models=(entry("a", 0), entry("b", 1)),
        nodes=(NodeDevices("gpu", "127.0.0.1", (0,), head=True, sleepers=4),),
        port=ROUTER_PORT, agent_port=AGENT_PORT, request_wait_s=600, start_timeout_s=600,
        state_dir=str(STATE), log_dir=str(STATE / "logs"),
    )  # fmt: skip
    return config.to_json()


def models_report(key: str) -> dict[str, dict[str, Any]]:
    connection = http.client.HTTPConnection("127.0.0.1", ROUTER_PORT, timeout=30)
    try:
        connection.request("GET", "/vcluster/models", headers={"Authorization": f"Bearer {key}"})
        reply = json.loads(connection.getresponse().read())
    finally:
        connection.close()
    return {m["name"]: m for m in reply["models"]}


def model_memory(name: str) -> dict[str, Any]:
    """GPU memory (nvidia-smi, per PID) and host RSS of the processes serving MODELS/name."""
    roots = processes_serving(name)
    tree = [pid for root in roots for pid in process_tree(root)]
    per_pid = gpu_memory_per_pid()
    return {
        "gpu_mib": sum(per_pid.get(pid, 0) for pid in tree),
        "host_rss_mib": sum(rss_mib(pid) for pid in tree),
        "device_used_mib": device_used_mib(),
    }


def processes_serving(name: str | None = None) -> list[int]:
    """The `vllm serve` processes of our models (of `name`, or of any)."""
    wanted = str(MODELS / name) if name else str(MODELS) + "/"
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"serve" in argv and any(a.decode(errors="replace").startswith(wanted) for a in argv):
            found.append(int(cmdline.parent.name))
    return found


def stop_leftovers() -> list[int]:
    """Kill the vLLM servers of our models that an earlier, interrupted run left behind."""
    pids = [pid for root in processes_serving() for pid in process_tree(root)]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if pids:
        time.sleep(3)
    return pids


def routed(out: Path, run: Run) -> dict[str, Any]:
    """vcluster's router and agent as plain processes in front of A and B: A, B, A, B... each
    request through the router, which sleeps the awake model and wakes (or starts) the other."""
    shutil.rmtree(STATE, ignore_errors=True)
    (STATE / "secrets").mkdir(parents=True, mode=0o700)
    key = secrets.token_hex(16)
    (STATE / "secrets" / "agent-token").write_text(secrets.token_hex(16))
    (STATE / "secrets" / "api-key").write_text(key)
    (STATE / "serving.json").write_text(routed_config())
    environment = vllm_env() | {"PYTHONPATH": f"{SITE}:{REPO}"}
    environment.pop("VLLM_SERVER_DEV_MODE")  # the agent sets it for the ranks of sleep-mode models
    with (out / "router.log").open("ab") as log:
        router = subprocess.Popen(
            [sys.executable, "-m", "cluster.remote.serving", "router", str(STATE / "serving.json"), "gpu"],
            stdout=log, stderr=subprocess.STDOUT, env=environment, cwd=REPO, process_group=0,
        )  # fmt: skip
    headers = {"Authorization": f"Bearer {key}"}
    samples: list[dict[str, Any]] = []
    result: dict[str, Any] = {"levels": ROUTED_LEVELS, "samples": samples}
    try:
        deadline = time.monotonic() + 60
        while True:
            if router.poll() is not None:
                raise RuntimeError(f"the router exited {router.returncode}")
            try:
                if models_report(key):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.2)
        for index in range(ROUTED_REQUESTS):
            name = "ab"[index % 2]
            other = "ab"[(index + 1) % 2]
            before = models_report(key)[name]
            if before["state"] != "unloaded" and run.left() < 30:
                break
            if before["state"] == "unloaded" and run.left() < 120:
                break
            first = stream_first_token(ROUTER_PORT, name, 1000 + index, headers, timeout=600)
            after = models_report(key)
            sample = {
                "model": name,
                "was": before["state"]
                if before["state"] != "sleeping"
                else f"sleeping (level {before['sleep_level']})",
                "request": first,
                "router": {
                    k: after[name][k]
                    for k in (
                        "state",
                        "wakes",
                        "last_wake_s",
                        "activations",
                        "last_activation_s",
                        "wake_failure",
                    )
                },
                "other": {
                    k: after[other][k] for k in ("state", "sleep_level", "host_memory_bytes")
                },
            }
            if after[other]["state"] == "sleeping":
                sample["other_memory"] = model_memory(other)
            samples.append(sample)
            print(
                f"[routed] {name} was {sample['was']}: first token in {first['ttft_s']} s",
                flush=True,
            )
            run.data["phases"]["routed"] = result
            run.save()
    finally:
        router.send_signal(signal.SIGTERM)  # the router stops the ranks it started
        try:
            router.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(router.pid, signal.SIGKILL)
        result["left_running"] = stop_leftovers()
        for name in ("a", "b"):
            log_file = STATE / "logs" / f"model-{name}.log"
            if log_file.exists():
                shutil.copy(log_file, out / f"routed-model-{name}.log")
    for name in ("a", "b"):
        log_file = out / f"routed-model-{name}.log"
        if log_file.exists():
            result[f"log_{name}"] = log_figures(log_file.read_text(errors="replace"))
    return result


# ---- phases --------------------------------------------------------------------------------


def cold_start(server: Server) -> dict[str, Any]:
    """From process start to the first token of the first request."""
    started = server.start()
    server.wait_ready(READY_TIMEOUT_S)
    ready_s = time.monotonic() - started
    first = server.first_token()
    result = {
        "ready_s": round(ready_s, 2),
        "first_request": first,
        "cold_ttft_s": round(ready_s + first["ttft_s"], 2),
        "awake_request": server.first_token(),  # steady state, for comparison
        "log": server.log_figures(),
    }
    result["awake_memory"] = settled_memory(server)
    result["caches"] = caches()
    return result


def caches() -> dict[str, dict[str, float]]:
    """What the caches under ~/.cache hold (files, MiB): what a later start finds built."""
    found = {}
    for folder in sorted((Path.home() / ".cache").glob("*")):
        files = [f for f in folder.rglob("*") if f.is_file()]
        found[folder.name] = {
            "files": len(files),
            "mib": round(sum(f.stat().st_size for f in files) / 2**20, 1),
        }
    return found


def sleep_wake_cycles(server: Server, level: int) -> dict[str, Any]:
    """Sleep at `level`, read memory, wake, first token; WAKE_REPEATS times."""
    samples = []
    for _ in range(WAKE_REPEATS):
        sleep_s = server.sleep(level)
        if not server.is_sleeping():
            raise RuntimeError(f"{server.name} says it is awake after /sleep?level={level}")
        memory = settled_memory(server)
        began = time.monotonic()
        steps = server.wake()
        woken_s = time.monotonic() - began
        first = server.first_token()
        samples.append({"sleep_s": round(sleep_s, 3), "asleep_memory": memory, "wake": steps,
                        "wake_s": round(woken_s, 3), "request": first,
                        "wake_to_first_token_s": round(woken_s + first["ttft_s"], 3)})  # fmt: skip
    return {
        "level": level,
        "samples": samples,
        "median_wake_to_first_token_s": median(samples, "wake_to_first_token_s"),
    }


def median(samples: list[dict[str, Any]], key: str) -> float:
    return round(statistics.median(s[key] for s in samples), 3)


def alternate(servers: dict[str, Server], level: int, count: int) -> dict[str, Any]:
    """Requests alternating between the models: sleep the awake one, wake the other, first token.

    Medians count only the switches that woke a model slept at `level` (the first switch after
    a change of level wakes one slept at the other level)."""
    samples = []
    for _ in range(count):
        awake = next(s for s in servers.values() if s.level == 0)
        target = next(s for s in servers.values() if s is not awake)
        woke_from = target.level
        began = time.monotonic()
        sleep_s = awake.sleep(level)
        woken = time.monotonic()
        steps = target.wake()
        asked = time.monotonic()
        first = target.first_token()
        samples.append({"model": target.name, "put_to_sleep": awake.name, "woke_from_level": woke_from,
                        "sleep_s": round(sleep_s, 3), "wake": steps, "wake_s": round(asked - woken, 3),
                        "request": first,
                        "wake_to_first_token_s": round(asked - woken + first["ttft_s"], 3),
                        "switch_to_first_token_s": round(asked - began + first["ttft_s"], 3)})  # fmt: skip
    counted = [s for s in samples if s["woke_from_level"] == level]
    return {"level": level, "samples": samples,
            "median_wake_to_first_token_s": median(counted, "wake_to_first_token_s"),
            "median_switch_to_first_token_s": median(counted, "switch_to_first_token_s")}  # fmt: skip


VERSIONS = """
import importlib.metadata as m, json
found = {}
for name in ["vllm", "torch", "transformers", "flashinfer-python", "triton"]:
    try:
        found[name] = m.version(name)
    except m.PackageNotFoundError:
        found[name] = None
print(json.dumps(found))
"""


def environment(out: Path) -> dict[str, Any]:
    query = "name,driver_version,memory.total"
    gpu = sh(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], timeout=20).strip()
    versions = sh([sys.executable, "-c", VERSIONS], timeout=60, env=vllm_env())
    (out / "env.txt").write_text(sh(["nvidia-smi"], timeout=20) + versions)
    return {
        "gpu": gpu,
        "versions": json.loads(versions.strip().splitlines()[-1]),
        "cpus": os.cpu_count(),
    }


def import_vllm() -> dict[str, Any]:
    """Import vLLM's API server once: a broken install shows here, not in a cold start."""
    began = time.monotonic()
    sh(
        [sys.executable, "-c", "import vllm.entrypoints.openai.api_server"],
        timeout=180,
        env=vllm_env(),
    )
    return {"import_s": round(time.monotonic() - began, 1)}


def give_way(servers: dict[str, Server]) -> dict[str, Any]:
    """Put every awake, running server to sleep at level 1."""
    slept = []
    for server in servers.values():
        running = server.process is not None and server.process.poll() is None
        if running and server.level == 0:
            server.sleep(1)
            slept.append(server.name)
    return {"put_to_sleep": slept}


MEMORY_HEADING = "GPU MiB of its processes / GPU MiB used on the device / host RSS MiB"


def memory_cells(memory: dict[str, Any]) -> str:
    return f"{memory['gpu_mib']} / {memory['device_used_mib']} / {memory['host_rss_mib']}"


def table(data: dict[str, Any]) -> str:
    """The figures a person reads, from sleep.json's data."""
    phases = data["phases"]
    rows = []

    def row(what: str, value: Any) -> None:
        rows.append(f"| {what} | {value} |")

    cold = phases.get("cold", {})
    if "cold_ttft_s" in cold:
        row("A cold start to first token (s)", cold["cold_ttft_s"])
        row("A awake, first token (s)", cold["awake_request"]["ttft_s"])
        row("A awake: " + MEMORY_HEADING, memory_cells(cold["awake_memory"]))
        row("A cold start breakdown (vLLM log)", json.dumps(cold["log"]))
    for level in (1, 2):
        cycles = phases.get(f"level{level}", {})
        if "samples" in cycles:
            memory = cycles["samples"][-1]["asleep_memory"]
            row(
                f"level {level}: wake to first token, median (s)",
                cycles["median_wake_to_first_token_s"],
            )
            row(
                f"level {level}: samples (s)",
                ", ".join(str(s["wake_to_first_token_s"]) for s in cycles["samples"]),
            )
            row(
                f"level {level}: asleep, " + MEMORY_HEADING,
                memory_cells(memory),
            )
    cold_b = phases.get("cold_b", {})
    if "cold_ttft_s" in cold_b:
        row("B cold start to first token, A asleep (s)", cold_b["cold_ttft_s"])
    for key in ("alternate1", "alternate2"):
        alternation = phases.get(key, {})
        if "samples" in alternation:
            level = alternation["level"]
            row(
                f"A,B alternating at level {level}: wake to first token, median (s)",
                alternation["median_wake_to_first_token_s"],
            )
            row(f"A,B alternating at level {level}: sleep other + wake + first token, median (s)",
                alternation["median_switch_to_first_token_s"])  # fmt: skip
            row(
                f"A,B alternating at level {level}: samples (s)",
                ", ".join(
                    f"{s['model']} {s['switch_to_first_token_s']}" for s in alternation["samples"]
                ),
            )
    for sample in phases.get("routed", {}).get("samples", []):
        memory = sample.get("other_memory")
        held = f"; the sleeper: {memory_cells(memory)}" if memory else ""
        row(f"through the router: {sample['model']}, was {sample['was']}, first token (s)",
            f"{sample['request']['ttft_s']}{held}")  # fmt: skip
    restart = phases.get("restart", {})
    if "cold_ttft_s" in restart:
        row("A killed and served again, caches warm, to first token (s)", restart["cold_ttft_s"])
    return "| figure | value |\n| --- | --- |\n" + "\n".join(rows)


PHASE_GROUPS = ("setup", "direct", "routed", "restart")


def direct(out: Path, run: Run) -> None:
    """The measurements against vLLM's own API servers, no router between."""
    servers = {"a": Server("a", out), "b": Server("b", out)}
    started = list(servers.values())
    a, b = servers["a"], servers["b"]
    try:
        if run.phase("cold", 150, lambda: cold_start(a)):
            run.phase("level1", 25, lambda: sleep_wake_cycles(a, 1))
            run.phase("level2", 30, lambda: sleep_wake_cycles(a, 2))
            run.phase("give_way_a", 5, lambda: give_way({"a": a}))
            if run.phase("cold_b", 90, lambda: cold_start(b)):
                run.phase("alternate1", 25, lambda: alternate(servers, 1, ALTERNATIONS))
                run.phase("alternate2", 30, lambda: alternate(servers, 2, ALTERNATIONS + 1))
            if "restart" in run.data["groups"]:
                run.phase("give_way", 5, lambda: give_way(servers))
                a.stop()
                restarted = Server("a", out, "server-a-restart.log")
                started.append(restarted)
                run.phase("restart", 90, lambda: cold_start(restarted))
    finally:
        for server in started:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--carry", type=Path, default=Path("/root/carry"))
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/sleep-out")))
    parser.add_argument("--phases", default="setup,direct,routed",
                        help=f"a comma-separated choice of {', '.join(PHASE_GROUPS)}")  # fmt: skip
    args = parser.parse_args()
    groups = args.phases.split(",")
    if set(groups) - set(PHASE_GROUPS):
        parser.error(f"--phases: choose among {', '.join(PHASE_GROUPS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    run = Run(args.out)
    run.data["groups"] = groups
    if "setup" in groups:
        if not run.phase("install", 60, lambda: install(args.carry, args.out)):
            sys.exit(1)
        run.phase("environment", 20, lambda: environment(args.out))
        shutil.rmtree(MODELS, ignore_errors=True)
        if not run.phase("models", 60, lambda: make_models(args.out)):
            sys.exit(1)
        run.phase("import", 30, import_vllm)
    else:
        run.data["phases"]["leftovers"] = {"killed": stop_leftovers()}
        run.phase("environment", 20, lambda: environment(args.out))
    try:
        if "direct" in groups:
            direct(args.out, run)
        if "routed" in groups:
            run.phase("routed", 150, lambda: routed(args.out, run))
    finally:
        run.data["table"] = table(run.data)
        run.data["wall_s"] = round(time.monotonic() - run.started, 1)
        run.save()
        print(run.data["table"], flush=True)


if __name__ == "__main__":
    main()
