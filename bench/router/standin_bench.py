"""`bench/router --standin`: SSE chunks/s direct, through vcluster's router and through nginx.

The three in front of a stand-in that streams as fast as it can (no sandbox, no vLLM).

    .venv/bin/python bench/router --standin [--seconds 10] [--rounds 1] [--concurrency 1,16,64]
        [--cpus SERVER:PROXY:LOAD] [--python PATH] [--paths direct,router,nginx]
        [--role router|front] [--json]

The stand-in is tests/support/standin_vllm.py with `--stream-chunks 200`: every streamed chat
answer is 200 vLLM-shaped chunks, then `data: [DONE]`. It is started the production way: the
real router and its agent (`python -m cluster.remote.serving router CONFIG head`, the users' API key
set and sent) start it as the model's rank on loopback. Three paths to the same stand-in, for
each concurrency, one after another, `--seconds` each:

- direct: to the stand-in's own port, with the agent token (its key, as for vLLM);
- router: vcluster's router, with the users' key;
- nginx: Debian's package (installed with apt-get when missing), one worker,
  `proxy_buffering off`, upstream keepalive, HTTP/1.1 to the upstream.

Each process is pinned with taskset (`--cpus`, default 0:1:1: the stand-in alone on CPU 0, the
proxy and the load generator on CPU 1), so that runs compare; the load generator is
bench/router/standin_load.py. The router, the stand-in and the load generator run on
`--python` (default: this interpreter); the router and the stand-in use uvloop when that
interpreter has it, as in vLLM's images, and the output says whether they did.

Besides chunks/s, each figure gives the CPU time that the stand-in and the proxy spent per
chunk (/proc/PID/stat): on a machine shared with other work, chunks/s swing with the
scheduler, CPU per chunk much less.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cluster.remote.serving.catalog import (
    AGENT_TOKEN_FILE,
    API_KEY_FILE,
    SECRETS_DIR,
    ModelEntry,
    NodeDevices,
    ServingConfig,
)

REPO = Path(__file__).resolve().parents[2]
STANDIN = REPO / "tests" / "support" / "standin_vllm.py"
LOAD = Path(__file__).resolve().parent / "standin_load.py"
WORK = REPO / ".work" / "bench-router-standin"
MODEL = "standin"
CHUNKS = 200
START_TIMEOUT_S = 60.0
TARGET_RATIO = 0.95
TARGET_ADDED_P50_MS = 0.5
TARGET_CHUNKS_AT_64 = 100_000
QUIET_LOAD = 1.0
"""A one-minute load average above this before the run: other work shares the CPUs."""
NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {work}/nginx-body;
    proxy_temp_path {work}/nginx-proxy;
    fastcgi_temp_path {work}/nginx-fastcgi;
    uwsgi_temp_path {work}/nginx-uwsgi;
    scgi_temp_path {work}/nginx-scgi;
    upstream model {{
        server 127.0.0.1:{upstream};
        keepalive 128;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port};
        keepalive_requests 1000000;
        location / {{
            proxy_pass http://model;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer {token}";
            proxy_buffering off;
        }}
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_http(url: str, what: str, log: Path, data: bytes | None = None, key: str = "") -> None:
    """Until `url` answers 200 (a POST when `data`), or exit naming `what` and its log."""
    deadline = time.monotonic() + START_TIMEOUT_S
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    last = ""
    while time.monotonic() < deadline:
        try:
            request = urllib.request.Request(url, data, headers)
            with urllib.request.urlopen(request, timeout=START_TIMEOUT_S) as r:
                r.read()
                return
        except urllib.error.HTTPError as error:
            last = f"{error.code} {error.read()[:300]!r}"
        except OSError as error:
            last = str(error)
        time.sleep(0.2)
    raise SystemExit(f"{what} did not answer {url} in {START_TIMEOUT_S:g} s ({last}); see {log}")


def has_uvloop(python: str) -> bool:
    return subprocess.run([python, "-c", "import uvloop"], capture_output=True).returncode == 0


def nginx_binary() -> str:
    """Debian's nginx, installed with apt-get when missing."""
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else "")
    if found:
        return found
    if os.geteuid() != 0:
        raise SystemExit("nginx is not installed; fix: sudo apt-get install -y nginx")
    print("installing nginx (apt-get install nginx) ...", file=sys.stderr)
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "install", "-y", "--no-install-recommends", "nginx"]
    if subprocess.run(command, env=environment, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=environment, capture_output=True)
        subprocess.run(command, env=environment, check=True, capture_output=True)
    return shutil.which("nginx") or "/usr/sbin/nginx"


def nginx_version(binary: str) -> str:
    reply = subprocess.run([binary, "-v"], capture_output=True, text=True)
    return (reply.stderr or reply.stdout).strip().removeprefix("nginx version: ")


def standin_argv(python: str, server_cpu: str) -> tuple[str, ...]:
    """The model's argv: the stand-in, pinned (the agent adds --host and --port)."""
    return ("taskset", "-c", server_cpu, python, str(STANDIN), MODEL,
            "--served-model-name", MODEL, "--start-s", "0", "--stream-chunks", str(CHUNKS))  # fmt: skip


def serving_config(
    python: str, server_cpu: str, ports: dict[str, int], external: bool
) -> ServingConfig:
    model = ModelEntry(served=MODEL, argv=standin_argv(python, server_cpu), tensor_parallel=1,
                       pipeline_parallel=1, keep_loaded=False, unload_after_s=None,
                       api_port=ports["model"], master_port=ports["master"],
                       external=external)  # fmt: skip
    head = NodeDevices("head", "127.0.0.1", (0,), head=True)
    return ServingConfig(cluster="bench", accelerator="cpu", models=(model,), nodes=(head,),
                         port=ports["router"], agent_port=ports["agent"], request_wait_s=30.0,
                         start_timeout_s=START_TIMEOUT_S, state_dir=str(WORK),
                         log_dir=str(WORK / "logs"))  # fmt: skip


@contextlib.contextmanager
def running(argv: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[int]:
    """A process for the length of the block (SIGTERM, then SIGKILL after 15 s); its pid."""
    with open(log, "wb") as output:
        process = subprocess.Popen(argv, env=env, cwd=REPO, stdout=output, stderr=subprocess.STDOUT)
        try:
            yield process.pid
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def write_secrets(token: str, key: str) -> None:
    """The agent token and the users' key as `up` leaves them: owner-only files of secrets/."""
    folder = WORK / SECRETS_DIR
    folder.mkdir(mode=0o700, exist_ok=True)
    folder.chmod(0o700)
    for name, value in ((AGENT_TOKEN_FILE, token), (API_KEY_FILE, key)):
        path = folder / name
        path.touch(mode=0o600)
        path.chmod(0o600)
        path.write_text(value)


def children(pid: int) -> list[int]:
    """A process's children, whichever of its threads started them."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def measure(options: argparse.Namespace) -> dict[str, Any]:
    server_cpu, proxy_cpu, load_cpu = options.cpus
    if shutil.which("taskset") is None:
        raise SystemExit("taskset is missing; fix: apt-get install -y util-linux")
    nginx = nginx_binary()
    WORK.mkdir(parents=True, exist_ok=True)
    ports = {name: free_port() for name in ("router", "agent", "model", "master", "nginx")}
    front = options.role == "front"
    token, key = secrets.token_hex(16), secrets.token_hex(16)
    model_key = "" if front else token  # front: vLLM on loopback has no key
    write_secrets(token, key)
    config = serving_config(options.python, server_cpu, ports, external=front)
    config_path = WORK / "serving.json"
    config_path.write_text(config.to_json())
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    nginx_conf = WORK / "nginx.conf"
    nginx_conf.write_text(NGINX_CONF.format(work=WORK, upstream=ports["model"],
                                            port=ports["nginx"], token=model_key))  # fmt: skip
    nginx_conf.chmod(0o600)
    router = ["taskset", "-c", proxy_cpu, options.python, "-m", "cluster.remote.serving",
              options.role, str(config_path), "head"]  # fmt: skip
    router_log = WORK / "router.log"
    before = load_average()
    with contextlib.ExitStack() as stack:
        if front:  # the head's supervisor runs it in production: here, this process
            argv = [*standin_argv(options.python, server_cpu), "--port", str(ports["model"])]
            keyless = {k: v for k, v in os.environ.items() if k != "VLLM_API_KEY"}
            standin_pid = stack.enter_context(running(argv, WORK / "standin.log", keyless))
        router_pid = stack.enter_context(running(router, router_log, environment))
        base = f"http://127.0.0.1:{ports['router']}"
        wait_http(f"{base}/health", "the router", router_log)
        chat = json.dumps({"model": MODEL, "messages": [], "stream": True}).encode()
        print("loading the stand-in through the router ...", file=sys.stderr)
        wait_http(f"{base}/v1/chat/completions", "the router", router_log, chat, key)
        if not front:  # the agent's rank (taskset execs the stand-in: the same pid)
            (standin_pid,) = children(router_pid)
        nginx_log = WORK / "nginx.log"
        argv = ["taskset", "-c", proxy_cpu, nginx, "-p", str(WORK), "-e",
                str(WORK / "nginx-error.log"), "-c", str(nginx_conf)]  # fmt: skip
        with running(argv, nginx_log) as nginx_pid:
            wait_http(f"http://127.0.0.1:{ports['nginx']}/health", "nginx", nginx_log)
            (nginx_worker,) = children(nginx_pid)
            server = {"stand-in": standin_pid}
            targets = {
                "direct": {"name": "direct", "port": ports["model"], "key": model_key,
                           "cpu_pids": server},
                "router": {"name": "router", "port": ports["router"], "key": key,
                           "cpu_pids": {**server, "proxy": router_pid}},
                "nginx": {"name": "nginx", "port": ports["nginx"], "key": "unused",
                          "cpu_pids": {**server, "proxy": nginx_worker}},
            }  # fmt: skip
            load_config = {
                "targets": [targets[name] for name in options.paths],
                "concurrency": options.concurrency,
                "seconds": options.seconds,
                "rounds": options.rounds,
                "model": MODEL,
                "chunks": CHUNKS,
            }
            load = ["taskset", "-c", load_cpu, options.python, str(LOAD)]
            print("measuring ...", file=sys.stderr)
            reply = subprocess.run(load, input=json.dumps(load_config), stdout=subprocess.PIPE,
                                   text=True)  # fmt: skip
            if reply.returncode != 0:
                raise SystemExit(f"the load generator failed (exit {reply.returncode}): see above")
            measured = json.loads(reply.stdout)
    uvloop = has_uvloop(options.python)
    return {
        "figures": measured["figures"],
        "setup": {
            "role": options.role,
            "seconds_per_figure": options.seconds * options.rounds,
            "rounds": options.rounds,
            "chunks_per_answer": CHUNKS,
            "cpus": {"stand-in": server_cpu, "proxy": proxy_cpu, "load generator": load_cpu},
            "cpu_count": os.cpu_count(),
            "uvloop": {"router": uvloop, "stand-in": uvloop, "load generator": measured["uvloop"]},
            "nginx": nginx_version(nginx),
            "python": options.python,
            "load_average_before": before,
            "load_average_after": load_average(),
        },
    }


def report(result: dict[str, Any]) -> None:
    setup, figures = result["setup"], result["figures"]
    cpus, uvloop = setup["cpus"], setup["uvloop"]
    rounds = f" ({setup['rounds']} interleaved rounds)" if setup["rounds"] > 1 else ""
    print(f"stand-in: {setup['chunks_per_answer']}-chunk SSE chat answers (tests/support/"
          f"standin_vllm.py --stream-chunks), {setup['seconds_per_figure']:g} s per figure{rounds}")  # fmt: skip
    print(f"pinned with taskset on {setup['cpu_count']} CPUs: stand-in on CPU {cpus['stand-in']}, "
          f"router / nginx on CPU {cpus['proxy']}, load generator on CPU {cpus['load generator']}")  # fmt: skip
    print(f"router: python -m cluster.remote.serving {setup['role']}, API key set and sent, uvloop "
          f"{'yes' if uvloop['router'] else 'NO (production has it: pip install uvloop)'}; "
          f"nginx {setup['nginx']}: 1 worker, proxy_buffering off, upstream keepalive, HTTP/1.1")  # fmt: skip
    print(f"load average before {setup['load_average_before']}, after {setup['load_average_after']}")  # fmt: skip
    if float(setup["load_average_before"].split()[0]) > QUIET_LOAD:
        print("WARNING: other work was running: chunks/s and p50 are not comparable with a quiet "
              "run; CPU per chunk is the steadier figure")  # fmt: skip
    print()
    paths = list(next(iter(figures.values())))
    both = "router" in paths and "nginx" in paths
    header = "".join(f"  {p + ' chunks/s' if p == paths[0] else p:>15}" for p in paths)
    print(f"{'concurrency':>11}{header}" + ("  router / nginx" if both else ""))
    for concurrency, row in figures.items():
        cells = "".join(f"  {row[p]['chunks_per_s']:>15,.0f}" for p in paths)
        if both:
            cells += f"  {row['router']['chunks_per_s'] / row['nginx']['chunks_per_s']:>14.2f}"
        print(f"{concurrency:>11}{cells}")
    print()
    print("CPU per chunk, microseconds (stand-in + proxy; from /proc/PID/stat over each figure):")
    for concurrency, row in figures.items():
        spent = []
        for p in paths:
            cpu = row[p]["cpu_us_per_chunk"]
            proxy = f" + {cpu['proxy']:.1f}" if "proxy" in cpu else ""
            spent.append(f"{p} {cpu['stand-in']:.1f}{proxy}")
        print(f"{concurrency:>11}  " + "; ".join(spent))
    print()
    if "1" in figures:
        p50 = {p: figures["1"][p]["p50_ms"] for p in paths}
        added = {p: f" ({p50[p] - p50['direct']:+.2f} over direct)" if "direct" in p50 else ""
                 for p in paths}  # fmt: skip
        print(f"p50 per request (all {setup['chunks_per_answer']} chunks) at concurrency 1: "
              + "; ".join(f"{p} {p50[p]:.2f} ms{added[p] if p != 'direct' else ''}" for p in paths))  # fmt: skip
    for verdict in verdicts(figures) if both else []:
        print(f"target: {verdict}")


def verdicts(figures: dict[str, dict[str, Any]]) -> list[str]:
    """The issue's targets for the router, against nginx."""
    found = []
    if "1" in figures:
        over = figures["1"]["router"]["p50_ms"] - figures["1"]["nginx"]["p50_ms"]
        found.append(f"router's p50 at concurrency 1 over nginx's {over:+.2f} ms (target <= "
                     f"{TARGET_ADDED_P50_MS} ms): {'met' if over <= TARGET_ADDED_P50_MS else 'MISSED'}")  # fmt: skip
    worst = min(r["router"]["chunks_per_s"] / r["nginx"]["chunks_per_s"] for r in figures.values())
    found.append(f"router / nginx >= {TARGET_RATIO} at every concurrency (worst {worst:.3f}): "
                 f"{'met' if worst >= TARGET_RATIO else 'MISSED'}")  # fmt: skip
    if "64" in figures:
        at_64 = figures["64"]["router"]["chunks_per_s"]
        found.append(f"router >= {TARGET_CHUNKS_AT_64:,} chunks/s at concurrency 64 "
                     f"({at_64:,.0f}): {'met' if at_64 >= TARGET_CHUNKS_AT_64 else 'MISSED'}")  # fmt: skip
    return found


def paths_list(text: str) -> list[str]:
    paths = text.split(",")
    if not paths or not set(paths) <= {"direct", "router", "nginx"}:
        raise argparse.ArgumentTypeError("a comma-separated subset of direct,router,nginx")
    return paths


def cpu_roles(text: str) -> tuple[str, str, str]:
    """SERVER:PROXY:LOAD, each a taskset CPU list (`0:1:1`; `0-1:0-1:0-1` pins nothing)."""
    roles = text.split(":")
    if len(roles) != 3 or not all(re.fullmatch(r"[0-9][0-9,-]*", r) for r in roles):
        raise argparse.ArgumentTypeError("SERVER:PROXY:LOAD, each a taskset CPU list, like 0:1:1")
    wanted = {int(n) for r in roles for n in re.split(r"[,-]", r)}
    allowed = os.sched_getaffinity(0)
    if not wanted <= allowed:
        raise argparse.ArgumentTypeError(f"CPUs {text}: this process may use {sorted(allowed)}")
    server, proxy, load = roles
    return server, proxy, load


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="bench/router --standin", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="per figure (default 10)")
    parser.add_argument("--concurrency", default="1,16,64",
                        type=lambda t: [int(n) for n in t.split(",")])  # fmt: skip
    parser.add_argument("--cpus", type=cpu_roles, default="0:1:1",
                        help="SERVER:PROXY:LOAD, taskset CPU lists (default 0:1:1)")  # fmt: skip
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter of the router, the stand-in and the load generator")  # fmt: skip
    parser.add_argument("--role", choices=("router", "front"), default="router",
                        help="router: the model started by the head's agent (several models; "
                        "default); front: one model, the stand-in started as the supervisor "
                        "would")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=1,
                        help="interleaved rounds per figure (default 1), summed")  # fmt: skip
    parser.add_argument("--paths", default="direct,router,nginx", type=paths_list,
                        help="which of direct,router,nginx to measure (default all three)")  # fmt: skip
    parser.add_argument("--json", action="store_true")
    options = parser.parse_args(argv)
    result = measure(options)
    if options.json:
        print(json.dumps(result, indent=2))
    else:
        report(result)
