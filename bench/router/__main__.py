"""Benchmark: the router against the model's own server, and a start on demand against vLLM's
own start, on the sandbox (2 nodes, the tiny model over both: pipeline parallel 2).

    .venv/bin/python bench/router [--keep] [--json] [--round-s S] [--rounds N]
    .venv/bin/python bench/router --standin [--seconds S] ...   (bench/router/standin_bench.py)

1. Throughput, concurrency 1 and 16: completions of 16 tokens, closed loop, the same loaded
   model through the endpoint (router) and directly (its API server, with the agent token),
   in interleaved rounds. Target: router >= 0.97 x direct.
2. Added latency: 1-token completions, direct and routed in pairs; the median of the paired
   differences. Target: <= 2 ms.
   Both run inside the head container (bench/router/load.py), so both paths start there.
3. Cold start: from a streamed request for the unloaded model to its first token, against
   vLLM started by hand with the same argv on the same nodes (no router) to its first token.
   Target: <= vLLM's own + 2 s.
The sandbox is brought up first if needed (`vcluster sandbox up --name bench`), not measured.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import openai

# Run as a script from the repository root: make the package importable without installing.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cluster.decide.inventory import Inventory, load_inventory
from cluster.decide.plan import SECRETS_PATH, container_name
from cluster.nodes.model_admin import load_model, models_report, unload_model
from cluster.nodes.session import Session
from cluster.remote.serving.agent import rank_argv
from cluster.remote.serving.catalog import AGENT_TOKEN_FILE, ServingConfig
from cluster.sandbox.sandbox import sandbox_down, sandbox_up
from cluster.steps.base import SilentReporter
from cluster.steps.context import UpOptions
from cluster.steps.down import down
from cluster.steps.up import live_plan, up
from tests.support.faults import nodes_of
from tests.support.routed import tiny, write_routed_inventory

MODEL = "tiny-a"
TIMEOUT_S = 900.0
COLD_RUNS = 2
BASELINE_PORT_OFFSET = 1000
STOP_GROUP = 'kill -s TERM -- "-$0"; sleep 5; kill -s KILL -- "-$0" 2>/dev/null; true'
"""Stop a process group: `kill -s SIGNAL` (dash, the images' sh, refuses `kill -TERM --`)."""
LOAD_SOURCE = (Path(__file__).parent / "load.py").read_text()


def client(base_url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=key, timeout=TIMEOUT_S, max_retries=0)


def first_token_s(api: openai.OpenAI, started: float) -> float:
    """Stream a chat completion; seconds from `started` to its first content."""
    stream = api.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=8, stream=True
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            seconds = time.monotonic() - started
            stream.close()
            return seconds
    raise SystemExit("the stream ended without a token")


def routed_cold_start(inventory: Inventory, session: Session, api: openai.OpenAI) -> float:
    unload_model(inventory, session, MODEL)
    return first_token_s(api, time.monotonic())


def vllm_alone_cold_start(
    inventory: Inventory, session: Session, serving: ServingConfig, placement: Any
) -> float:
    """vLLM started by hand on the router's placement (its API server on the head's address,
    another port), timed to its first token; stopped afterwards."""
    unload_model(inventory, session, MODEL)
    model = next(m for m in serving.models if m.served == MODEL)
    port = model.api_port + BASELINE_PORT_OFFSET
    head = serving.head
    pids: dict[str, str] = {}
    with nodes_of(inventory) as nodes:
        token = nodes.in_container(head.name, ["cat", f"{SECRETS_PATH}/{AGENT_TOKEN_FILE}"]).strip()
        started = time.monotonic()
        for rank, (node, _) in enumerate(placement):
            argv = rank_argv(serving, model, placement, rank)
            if rank == 0:
                argv[argv.index("--host") + 1] = head.address
                argv[argv.index("--port") + 1] = str(port)
            # its own session, so that the whole of it can be stopped; the key from its file
            script = 'VLLM_API_KEY="$(cat "$0")" setsid "$@" >/tmp/bench-vllm.log 2>&1 & echo $!'
            key_file = f"{SECRETS_PATH}/{AGENT_TOKEN_FILE}"
            pids[node] = nodes.in_container(node, ["sh", "-c", script, key_file, *argv]).strip()
        api = client(f"http://{head.address}:{port}/v1", token)
        try:
            while True:
                try:
                    return first_token_s(api, started)
                except openai.APIConnectionError:
                    if time.monotonic() - started > TIMEOUT_S:
                        raise SystemExit("vLLM alone did not answer") from None
                    time.sleep(0.2)
        finally:
            for node, pid in pids.items():
                nodes.in_container(node, ["sh", "-c", STOP_GROUP, pid])


def in_head(inventory: Inventory, argv: list[str]) -> str:
    """Run argv in the head's container, for as long as it takes (the load runs minutes)."""
    with Session(inventory) as session:
        session.open([inventory.head])
        command = ["docker", "exec", container_name(inventory.cluster), *argv]
        return session.ssh(inventory.head.node_name).run(command, timeout=3600, check=True).stdout


def main() -> None:
    if "--standin" in sys.argv[1:]:  # its own options: see bench/router/standin_bench.py
        import standin_bench  # this folder is the script's, first on sys.path

        standin_bench.main([a for a in sys.argv[1:] if a != "--standin"])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--standin",
        action="store_true",
        help="instead: chunks/s direct, through the router and through nginx, in front of a "
        "stand-in server (no sandbox; --standin --help for its options)",
    )
    parser.add_argument("--keep", action="store_true", help="leave the sandbox up")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--round-s", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-cold-start", action="store_true", help="throughput and latency only")
    parser.add_argument(
        "--sandbox-inventory", type=Path, help="a sandbox already up (kept afterwards)"
    )
    options = parser.parse_args()
    logging.getLogger("paramiko").setLevel(logging.CRITICAL)

    print("sandbox and cluster (not measured) ...", file=sys.stderr)
    if options.sandbox_inventory:
        base, options.keep = options.sandbox_inventory, True
    else:
        base = sandbox_up(2, Path(".work/bench"), "bench", progress=lambda _: None).inventory
    Path(".work/bench").mkdir(parents=True, exist_ok=True)
    path = write_routed_inventory(
        base, Path(".work/bench/router.yaml"), [tiny(MODEL), tiny("tiny-b")]
    )
    inventory = load_inventory(path)
    up(inventory, SilentReporter(), UpOptions(recreate=True))
    plan = live_plan(inventory, SilentReporter())
    serving = plan.serving
    assert serving is not None
    key = inventory.secrets.api_key.resolve() if inventory.secrets.api_key else "none"
    endpoint = client(f"http://{inventory.head.address}:{inventory.ports.vllm}/v1", key)

    with Session(inventory) as session:
        session.open([inventory.head])
        print("cold starts ...", file=sys.stderr)
        routed, alone = [], []
        placement = None
        for _ in range(0 if options.no_cold_start else COLD_RUNS):
            routed.append(routed_cold_start(inventory, session, endpoint))
            placement = next(
                m for m in models_report(inventory, session) if m.name == MODEL
            ).placement
            alone.append(vllm_alone_cold_start(inventory, session, serving, placement))
        print(f"  cold starts: router {routed}, vLLM alone {alone}", file=sys.stderr)
        load_model(inventory, session, MODEL, TIMEOUT_S)
        placement = next(m for m in models_report(inventory, session) if m.name == MODEL).placement

    print("throughput and latency, inside the head container ...", file=sys.stderr)
    model = next(m for m in serving.models if m.served == MODEL)
    config = {
        "model": MODEL,
        "router_url": f"http://127.0.0.1:{inventory.ports.vllm}/v1/completions",
        "direct_url": f"http://127.0.0.1:{model.api_port}/v1/completions",
        "concurrency": [1, 16],
        "rounds": options.rounds,
        "round_s": options.round_s,
        "max_tokens": 16,
        "latency_pairs": 300,
    }
    measured = json.loads(in_head(inventory, ["python3", "-c", LOAD_SOURCE, json.dumps(config)]))

    throughput = {
        c: {**v, "ratio": v["router"] / v["direct"]} for c, v in measured["throughput"].items()
    }
    latency = measured["latency"]
    figures = {
        "throughput_requests_per_s": throughput,
        "added_latency_ms": round(latency["paired_difference_median_s"] * 1000, 2),
        "latency": latency,
        "cold_start_s": {
            "router": [round(s, 1) for s in routed],
            "vllm_alone": [round(s, 1) for s in alone],
            "difference_median_s": None
            if not routed
            else round(statistics.median(r - a for r, a in zip(routed, alone, strict=True)), 2),
        },
    }
    down(inventory, SilentReporter())
    if not options.keep:
        sandbox_down("bench", progress=lambda _: None)
    if options.json:
        print(json.dumps(figures, indent=2))
        return
    for concurrency, row in throughput.items():
        verdict = "met" if row["ratio"] >= 0.97 else "MISSED"
        print(f"throughput, concurrency {concurrency:>2}: router {row['router']:7.2f} req/s, "
              f"direct {row['direct']:7.2f} req/s, ratio {row['ratio']:.3f} (target >= 0.97) {verdict}")  # fmt: skip
    added = figures["added_latency_ms"]
    print(
        f"added median latency: {added:.2f} ms (target <= 2 ms) {'met' if added <= 2 else 'MISSED'}"
    )
    cold = figures["cold_start_s"]
    if cold["difference_median_s"] is None:
        return
    print(f"cold start to first token: router {cold['router']} s, vLLM alone {cold['vllm_alone']} s, "
          f"median difference {cold['difference_median_s']:+.2f} s (target <= +2 s) "
          f"{'met' if cold['difference_median_s'] <= 2 else 'MISSED'}")  # fmt: skip


if __name__ == "__main__":
    main()
