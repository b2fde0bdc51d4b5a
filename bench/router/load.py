"""The load generator of bench/router, run inside the head container (`python3 -c SOURCE
CONFIG`), so the router and the model's own server are measured from the same place.

It reads the keys from the container's secret files (`api-key`: the users' key for the
router; `agent-token`: the model server's key) and prints one JSON document.
Standard library and aiohttp only (every vLLM image has both).
"""

import asyncio
import json
import os
import statistics
import sys
import time

import aiohttp

SECRETS_PATH = "/var/lib/vcluster/secrets"


async def completion(session, target, model, max_tokens):
    url, key = target
    body = {"model": model, "prompt": "The quick brown fox", "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True}  # fmt: skip
    started = time.perf_counter()
    async with session.post(url, json=body, headers={"Authorization": f"Bearer {key}"}) as reply:
        await reply.read()
        if reply.status != 200:
            raise RuntimeError(f"{url} answered {reply.status}")
    return time.perf_counter() - started


async def closed_loop(session, target, model, concurrency, duration_s, max_tokens):
    """`concurrency` clients, each sending its next request when the last is answered."""
    done = 0
    deadline = time.perf_counter() + duration_s

    async def client():
        nonlocal done
        while time.perf_counter() < deadline:
            await completion(session, target, model, max_tokens)
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return done, time.perf_counter() - started


def secret(name):
    """One of the container's secret files (cluster.remote.serving.catalog.SECRETS_DIR)."""
    try:
        with open(os.path.join(SECRETS_PATH, name)) as handle:
            return handle.read().strip()
    except FileNotFoundError:
        return None


async def main(config):
    targets = {
        "router": (config["router_url"], secret("api-key") or "none"),
        "direct": (config["direct_url"], secret("agent-token")),
    }
    model = config["model"]
    result = {"throughput": {}, "latency": {}}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(3):  # warm both paths (connections, vLLM's first batches)
            for target in targets.values():
                await completion(session, target, model, config["max_tokens"])
        for concurrency in config["concurrency"]:
            totals = {name: [0, 0.0] for name in targets}
            for _ in range(config["rounds"]):  # interleaved, so drift hits both alike
                for name, target in targets.items():
                    count, seconds = await closed_loop(session, target, model, concurrency,
                                                       config["round_s"], config["max_tokens"])  # fmt: skip
                    totals[name][0] += count
                    totals[name][1] += seconds
            result["throughput"][str(concurrency)] = {
                name: count / seconds for name, (count, seconds) in totals.items()
            }
        pairs = []
        for _ in range(config["latency_pairs"]):  # one token each: the path, not the model
            direct = await completion(session, targets["direct"], model, 1)
            routed = await completion(session, targets["router"], model, 1)
            pairs.append((direct, routed))
        result["latency"] = {
            "direct_median_s": statistics.median(d for d, _ in pairs),
            "router_median_s": statistics.median(r for _, r in pairs),
            "paired_difference_median_s": statistics.median(r - d for d, r in pairs),
            "pairs": len(pairs),
        }
    print(json.dumps(result))


asyncio.run(main(json.loads(sys.argv[1])))
