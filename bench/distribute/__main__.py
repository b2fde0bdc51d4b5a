"""Benchmark: a model and the workload image to N sandbox nodes through vcluster's chain, against
what a user does by hand (parallel scp, parallel `docker save | ssh docker load`); and a
Ray-ready-like image (the workload image plus one new layer) to 4 nodes that hold the workload
image, as its missing layer only against the whole image, both through the chain.

    .venv/bin/python bench/distribute [--rate-mbit 400] [--model-gib 2] [--no-image] [--keep]
                                      [--parts model,image,layers] [--layer-mib 80]

The links decide, not this machine's CPU: `tc` with the `tbf` qdisc (netem is not in this kernel)
limits the controller's uplink (the sandbox bridge's egress: what this machine sends to the nodes)
and every node's link (each node's veth egress, into the node, and its eth0 egress, out of it)
to the same rate. For N = 1, 2 and 4 it prints the wall time and the bytes that left the
controller (the bridge's tx_bytes, exact), as a multiple of the payload. Targets: vcluster's
controller bytes 1.0 x the payload whatever N; at N = 4 its time <= 1.25 x its time at N = 1;
for the Ray-ready-like image, bytes <= 1.1 x its missing layer. The sandbox (4 nodes, Docker
data on disk) is brought up first if needed, not measured; nor is building the image here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import docker

# Run as a script from the repository root: make the package importable without installing.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cluster.decide.inventory import load_inventory
from cluster.decide.layers import NodeLayers
from cluster.decide.manifest import model_items
from cluster.nodes.images import image_id, node_layers, source_here
from cluster.nodes.session import Session
from cluster.nodes.transfer import ChainNode, ImageOutcome, distribute, send_image
from cluster.sandbox.dockerd import ensure_local_docker
from cluster.sandbox.images import WORKLOAD_IMAGE
from cluster.sandbox.nodes import network_name
from cluster.sandbox.sandbox import sandbox_down, sandbox_up

NAME = "dist"
MODEL_ID = "bench/synthetic-2g"
SHARD_MIB = 512


def make_model(folder: Path, gib: float) -> Path:
    """Random weights in safetensors shards (a valid header per shard) and a config."""
    if (folder / "config.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    shards = max(1, int(gib * 1024 / SHARD_MIB))
    for index in range(1, shards + 1):
        size = SHARD_MIB << 20
        header = json.dumps(
            {"w": {"dtype": "BF16", "shape": [size // 2], "data_offsets": [0, size]}}
        ).encode()
        with open(folder / f"model-{index:05d}-of-{shards:05d}.safetensors", "wb") as handle:
            handle.write(len(header).to_bytes(8, "little") + header)
            for _ in range(SHARD_MIB):
                handle.write(os.urandom(1 << 20))
    (folder / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    return folder


def bridge_device(local) -> str:
    network = json.loads(subprocess.run(local.argv("network", "inspect", network_name(NAME)),
                                        capture_output=True, text=True, check=True).stdout)[0]  # fmt: skip
    return "br-" + network["Id"][:12]


def host_veth(local, container: str) -> str:
    """The host side of a node container's eth0: its peer's interface index, found here."""
    peer = subprocess.run(local.argv("exec", container, "cat", "/sys/class/net/eth0/iflink"),
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    for device in Path("/sys/class/net").iterdir():
        if (device / "ifindex").read_text().strip() == peer:
            return device.name
    raise SystemExit(f"no host interface for {container}'s eth0")


def tbf(device: str, rate_mbit: int, *, inside: list[str] | None = None) -> list[str]:
    command = ["tc", "qdisc", "replace", "dev", device, "root", "tbf",
               "rate", f"{rate_mbit}mbit", "burst", "256kb", "latency", "50ms"]  # fmt: skip
    return [*inside, *command] if inside else command


@contextlib.contextmanager
def shaped(local, sandbox, rate_mbit: int) -> Iterator[str]:
    """Every link at `rate_mbit`; yields the bridge (the controller's uplink)."""
    bridge = bridge_device(local)
    undo = []
    subprocess.run(tbf(bridge, rate_mbit), check=True)
    undo.append(["tc", "qdisc", "del", "dev", bridge, "root"])
    for node in sandbox.nodes:
        veth = host_veth(local, node.container)
        subprocess.run(tbf(veth, rate_mbit), check=True)
        undo.append(["tc", "qdisc", "del", "dev", veth, "root"])
        inside = local.argv("exec", node.container)
        subprocess.run(tbf("eth0", rate_mbit, inside=inside), check=True)
        undo.append([*inside, "tc", "qdisc", "del", "dev", "eth0", "root"])
    try:
        yield bridge
    finally:
        for command in undo:
            subprocess.run(command, check=False, capture_output=True)


def tx_bytes(device: str) -> int:
    return int(Path(f"/sys/class/net/{device}/statistics/tx_bytes").read_text())


def measured(bridge: str, action: Callable[[], None]) -> tuple[float, int]:
    before, started = tx_bytes(bridge), time.monotonic()
    action()
    return time.monotonic() - started, tx_bytes(bridge) - before


def parallel(
    commands: list[list[str]], stdin_of: Callable[[], subprocess.Popen] | None = None
) -> None:
    processes = [
        subprocess.Popen(c, stdin=(stdin_of().stdout if stdin_of else None)) for c in commands
    ]
    for process in processes:
        if process.wait() != 0:
            raise SystemExit(f"{process.args} failed")


def docker_save(local) -> subprocess.Popen:
    """One `docker save` of the workload image here, per node, as a user's loop would run it."""
    return subprocess.Popen(local.argv("save", WORKLOAD_IMAGE), stdout=subprocess.PIPE)


def build_ray_like(local, layer_mib: int) -> str:
    """The workload image plus one layer of `layer_mib` MiB of random bytes, built here (as the
    Ray-ready image is the inventory's image plus Ray's wheels); its tag."""
    tag = f"vcluster-bench/ray-like:{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as folder:
        with open(Path(folder) / "layer.bin", "wb") as handle:
            for _ in range(layer_mib):
                handle.write(os.urandom(1 << 20))
        (Path(folder) / "Dockerfile").write_text(
            f"FROM {WORKLOAD_IMAGE}\nCOPY layer.bin /opt/ray-like/layer.bin\n"
            "LABEL io.vcluster.bench=ray-like\n"
        )
        client = docker.DockerClient(base_url=local.host, timeout=600)
        try:
            client.images.build(path=folder, tag=tag, rm=True)
        finally:
            client.close()
    return tag


def layers_half(session, nodes, bridge: str, tag: str) -> list[tuple]:
    """The Ray-ready-like image to every node holding the workload image: its missing layer
    only, then (removed again) the whole image as before, both through the chain."""
    expected = image_id_here(tag)

    def drop() -> None:
        for node in nodes:
            node.connection.run(["docker", "rmi", "-f", tag])

    def lacks(name: str) -> bool:
        return image_id(session.docker(name), tag) is None

    def held(name: str) -> NodeLayers:
        return node_layers(session.docker(name))

    def nothing_held(name: str) -> NodeLayers:  # today's send: the whole image
        return NodeLayers(frozenset(), held(name).docker_root)

    rows = []
    for how, layers_on in (("missing layer only", held), ("whole image", nothing_held)):
        drop()
        outcomes: list[ImageOutcome] = []

        def chain(layers_on=layers_on, outcomes=outcomes) -> None:
            source = source_here(tag)
            assert source is not None
            outcomes.append(send_image(nodes, tag, source, lacks, layers_on))

        seconds, sent = measured(bridge, chain)
        outcome = outcomes[0]
        assert not outcome.failed, outcome.failed
        assert outcome.first_round is not None
        ids = {image_id(session.docker(n.name), tag) for n in nodes}
        assert ids == {expected}, f"{tag}: IDs {ids} on the nodes, {expected} here"
        missing = outcome.first_round.image.suffix_bytes(
            len(outcome.first_round.image.diff_ids) - 1
        )
        rows.append(
            (how, seconds, sent, outcome.bytes_sent, missing, outcome.first_round.describe())
        )
        print(f"  ray-like image, {how}: done", file=sys.stderr)
    drop()
    return rows


def image_id_here(tag: str) -> str | None:
    source = source_here(tag)
    return source.layers.image_id if source else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate-mbit", type=int, default=400)
    parser.add_argument("--model-gib", type=float, default=2.0)
    parser.add_argument("--no-image", action="store_true")
    parser.add_argument("--keep", action="store_true", help="leave the sandbox up")
    parser.add_argument("--parts", default="model,image,layers",
                        help="what to measure: model, image (N = 1, 2, 4), layers (4 nodes)")  # fmt: skip
    parser.add_argument("--layer-mib", type=int, default=80, help="the Ray-ready-like new layer")
    options = parser.parse_args()
    parts = set(options.parts.split(","))

    print("sandbox: 4 nodes, Docker data on disk (not measured) ...", file=sys.stderr)
    sandbox = sandbox_up(
        4, Path(".work/bench-dist"), NAME, progress=lambda _: None, node_storage="disk"
    )
    inventory = load_inventory(sandbox.inventory)
    local = ensure_local_docker()
    os.environ["DOCKER_HOST"] = local.host  # `docker save` of the workload image, here
    source = make_model(Path(".work/bench-dist/model"), options.model_gib)
    items = model_items(source, MODEL_ID, inventory.model_cache)
    payload = sum(i.size for i in items)
    key = ["-i", str(inventory.ssh.key_file), "-o", f"UserKnownHostsFile={inventory.ssh.known_hosts}",
           "-o", "StrictHostKeyChecking=yes"]  # fmt: skip
    rows = []
    with Session(inventory) as session, shaped(local, sandbox, options.rate_mbit) as bridge:
        session.open()
        nodes = [ChainNode(n.node_name, n.address, session.ssh(n.node_name), inventory.model_cache)
                 for n in inventory.nodes]  # fmt: skip

        def clean_model() -> None:
            for node in nodes:
                node.connection.run(["rm", "-rf", f"{inventory.model_cache}/hub",
                                     f"{inventory.model_cache}/.vcluster-verified",
                                     f"{inventory.model_cache}/bench-scp"], check=True)  # fmt: skip

        for count in (1, 2, 4) if "model" in parts else ():
            chosen = nodes[:count]
            clean_model()
            seconds, sent = measured(bridge, lambda c=chosen: distribute(c, items))
            rows.append(("model", "vcluster", count, seconds, sent, payload))
            clean_model()
            commands = [["scp", "-q", "-r", *key, str(source), f"root@{n.address}:{inventory.model_cache}/bench-scp"]
                        for n in chosen]  # fmt: skip
            seconds, sent = measured(bridge, lambda c=commands: parallel(c))
            rows.append(("model", "parallel scp", count, seconds, sent, payload))
            print(f"  model, N={count}: done", file=sys.stderr)
        clean_model()
        if not options.no_image and "image" in parts:
            size = int(subprocess.run(local.argv("image", "inspect", "-f", "{{.Size}}", WORKLOAD_IMAGE),
                                      capture_output=True, text=True, check=True).stdout)  # fmt: skip

            def drop_image() -> None:
                for node in nodes:
                    node.connection.run(["docker", "rmi", "-f", WORKLOAD_IMAGE])

            for count in (1, 2, 4):
                chosen = nodes[:count]
                drop_image()

                def chain(c=chosen) -> None:
                    def lacks(name: str) -> bool:
                        return image_id(session.docker(name), WORKLOAD_IMAGE) is None

                    source = source_here(WORKLOAD_IMAGE)
                    assert source is not None
                    outcome = send_image(
                        c,
                        WORKLOAD_IMAGE,
                        source,
                        lacks,
                        lambda name: node_layers(session.docker(name)),
                    )
                    assert not outcome.failed, outcome.failed

                seconds, sent = measured(bridge, chain)
                rows.append(("image", "vcluster", count, seconds, sent, size))
                drop_image()
                commands = [["ssh", *key, f"root@{n.address}", "docker", "load"] for n in chosen]
                seconds, sent = measured(
                    bridge, lambda c=commands: parallel(c, lambda: docker_save(local))
                )
                rows.append(("image", "parallel save | ssh load", count, seconds, sent, size))
                print(f"  image, N={count}: done", file=sys.stderr)
        layer_rows = []
        if "layers" in parts:
            tag = build_ray_like(local, options.layer_mib)
            try:
                layer_rows = layers_half(session, nodes, bridge, tag)
            finally:
                subprocess.run(local.argv("rmi", "-f", tag), capture_output=True, check=False)
    if not options.keep:
        sandbox_down(NAME, progress=lambda _: None)
    print(f"\nlinks shaped to {options.rate_mbit} Mbit/s (tbf); payload: model "
          f"{payload / 1e9:.2f} GB" + ("" if options.no_image else ", image (docker save) about its size"))  # fmt: skip
    print(f"{'what':<6} {'how':<26} {'N':>2} {'time':>8} {'controller sent':>16} {'x payload':>10}")
    for what, how, count, seconds, sent, size in rows:
        print(
            f"{what:<6} {how:<26} {count:>2} {seconds:7.1f}s {sent / 1e9:13.2f} GB {sent / size:10.2f}"
        )
    if layer_rows:
        print(f"\nRay-ready-like image (the workload image + {options.layer_mib} MiB) to 4 nodes "
              f"holding the workload image, through the chain, links at {options.rate_mbit} Mbit/s")  # fmt: skip
        print(
            f"{'how':<20} {'time':>8} {'controller sent':>16} {'stream':>10} {'x missing layer':>16}  carried"
        )
        for how, seconds, sent, streamed, missing, carried in layer_rows:
            print(f"{how:<20} {seconds:7.1f}s {sent / 1e6:13.1f} MB {streamed / 1e6:7.1f} MB "
                  f"{sent / missing:16.2f}  {carried}")  # fmt: skip
        ratio = layer_rows[0][2] / layer_rows[0][4]
        print(f"layers: controller bytes / missing layer {ratio:.3f} (target <= 1.1) "
              f"{'met' if ratio <= 1.1 else 'MISSED'}; time {layer_rows[0][1]:.1f} s against "
              f"{layer_rows[1][1]:.1f} s for the whole image")  # fmt: skip
    for what in ("model", "image"):
        ours = {r[2]: r[3] for r in rows if r[0] == what and r[1] == "vcluster"}
        if ours:
            ratio = ours[4] / ours[1]
            print(
                f"{what}: vcluster N=4 / N=1 time {ratio:.2f} (target <= 1.25) {'met' if ratio <= 1.25 else 'MISSED'}"
            )


if __name__ == "__main__":
    main()
