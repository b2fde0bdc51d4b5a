"""`vcluster sandbox up / down`: N local nodes, the workload image and the tiny model on each,
and an inventory for them that `vcluster up` uses as is.

Everything vcluster writes lies in the workdir (client key, host keys, known_hosts, inventory,
API key) or is a Docker object labelled `io.vcluster.sandbox=<name>`; `~/.ssh` is never touched.
The image and the model reach the nodes over SSH through vcluster's own transport, as they
would reach air-gapped servers.
"""

from __future__ import annotations

import io
import secrets
import subprocess
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from cluster.images import ImageError
from cluster.sandbox.dockerd import LocalDocker, ensure_local_docker
from cluster.sandbox.images import WORKLOAD_IMAGE, build_images, image_id
from cluster.sandbox.model import RECIPE_FILE, TINY_MODEL_NAME, ensure_tiny_model
from cluster.sandbox.nodes import (
    NODE_MODEL_CACHE,
    SandboxError,
    SandboxNode,
    create_network,
    leftovers,
    make_host_key,
    plan_nodes,
    remove_all,
    run_node,
    wait_until_running,
)
from cluster.transport.fanout import fan_out
from cluster.transport.ssh import HostUnreachable, SshConnection, SshTarget, SshTimeouts, connect

Progress = Callable[[str], None]
DEFAULT_NAME = "sandbox"
DEFAULT_NODES = 2
MAX_NODES = 16
SSH_TIMEOUTS = SshTimeouts(connect=5.0, command=120.0)
SSH_READY_TIMEOUT_S = 60.0
IMAGE_TRANSFER_TIMEOUT_S = 1800.0
INVENTORY_FILE = "inventory.yaml"
SERVED_NAME = "tiny-llama"


def default_workdir(name: str = DEFAULT_NAME) -> Path:
    return Path.cwd() / ".work" / name


@dataclass(frozen=True)
class Sandbox:
    name: str
    workdir: Path
    inventory: Path
    nodes: tuple[SandboxNode, ...]
    docker: LocalDocker
    image_id: str


class _Reporter:
    """Timestamps each progress line with the time its step took."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress

    def step(self, text: str, started: float) -> None:
        self._progress(f"{text} ({time.monotonic() - started:.1f}s)")


def sandbox_up(
    nodes: int = DEFAULT_NODES,
    workdir: Path | None = None,
    name: str = DEFAULT_NAME,
    progress: Progress = print,
) -> Sandbox:
    """Bring the sandbox up (or complete a half-built one); idempotent."""
    if not 1 <= nodes <= MAX_NODES:
        raise SandboxError(f"--nodes must be 1 to {MAX_NODES}, got {nodes}")
    workdir = (workdir or default_workdir(name)).resolve()
    report = _Reporter(progress)
    started = time.monotonic()
    local = ensure_local_docker()
    where = f"data in {local.data_root}" if local.data_root else "the system's daemon"
    report.step(f"docker: {local.host} ({where})", started)

    started = time.monotonic()
    build_images(progress=lambda line: progress(f"  {line}"), docker=local)
    workload_id = image_id(local, WORKLOAD_IMAGE)
    if workload_id is None:
        raise SandboxError(f"{WORKLOAD_IMAGE} is missing after the build", where="localhost")
    report.step("images built or cached", started)

    started = time.monotonic()
    model_dir = ensure_tiny_model(docker=local, progress=lambda line: progress(f"  {line}"))
    report.step(f"model {TINY_MODEL_NAME} ready in {model_dir}", started)

    started = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    client_key = _client_key(workdir)
    subnet = create_network(local, name)
    planned = plan_nodes(name, nodes, subnet)
    keys_dir = workdir / "host-keys"
    host_keys = {n.name: make_host_key(keys_dir, n) for n in planned}
    authorized = client_key.with_suffix(".pub").read_text().strip()
    for node in planned:
        run_node(local, name, node, keys_dir, authorized)
    for node in planned:
        wait_until_running(local, node)
    known_hosts = workdir / "known_hosts"
    known_hosts.write_text(
        "".join(f"{n.address} {' '.join(host_keys[n.name].split()[:2])}\n" for n in planned)
    )
    report.step(f"{nodes} node(s) running on {subnet}", started)

    started = time.monotonic()
    targets = [_target(n, client_key, known_hosts) for n in planned]
    connections = fan_out(targets, _connect_when_ready, name=lambda t: t.name).values()
    try:
        report.step("SSH to every node with strict host keys", started)
        started = time.monotonic()
        copied = _image_to_nodes(local, connections, workload_id)
        report.step(f"{WORKLOAD_IMAGE} on every node ({copied})", started)
        started = time.monotonic()
        fan_out(connections, lambda c: _model_to_node(c, model_dir), name=_name).values()
        report.step(f"model on every node in {NODE_MODEL_CACHE}", started)
    finally:
        for connection in connections:
            connection.close()

    api_key = _api_key(workdir)
    inventory = workdir / INVENTORY_FILE
    inventory.write_text(_inventory_text(name, planned, client_key, known_hosts, api_key))
    return Sandbox(name, workdir, inventory, tuple(planned), local, workload_id)


def sandbox_down(name: str = DEFAULT_NAME, progress: Progress = print) -> list[str]:
    """Remove every Docker object of the sandbox; fine when there is nothing left."""
    local = ensure_local_docker()
    removed = remove_all(local, name)
    remaining = {kind: ids for kind, ids in leftovers(local, name).items() if ids}
    if remaining:
        raise SandboxError(f"these remain after removal: {remaining}", where="localhost")
    progress(f"sandbox {name}: " + (", ".join(removed) + " removed" if removed else "nothing left"))
    return removed


def _client_key(workdir: Path) -> Path:
    key = workdir / "id_ed25519"
    if not key.exists():
        subprocess.run(
            [
                "ssh-keygen",
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                "vcluster-sandbox",
                "-f",
                str(key),
            ],
            check=True,
            capture_output=True,
        )
    return key


def _api_key(workdir: Path) -> Path:
    """A random API key for the sandbox's endpoint, in a 0600 file the inventory refers to."""
    path = workdir / "api-key"
    if not path.exists():
        path.touch(mode=0o600)
        path.write_text(f"sk-sandbox-{secrets.token_hex(16)}\n")
    return path


def _target(node: SandboxNode, key: Path, known_hosts: Path) -> SshTarget:
    return SshTarget(name=node.name, host=node.address, key_file=key, known_hosts=known_hosts)


def _name(connection: SshConnection) -> str:
    return connection.target.name


def _connect_when_ready(target: SshTarget) -> SshConnection:
    """Connect once the node's sshd accepts; a host key problem fails at once."""
    deadline = time.monotonic() + SSH_READY_TIMEOUT_S
    while True:
        try:
            return connect(target, SSH_TIMEOUTS)
        except HostUnreachable:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.3)


def _remote_image_id(connection: SshConnection, image: str) -> str | None:
    result = connection.run(["docker", "image", "inspect", "--format", "{{.Id}}", image])
    return result.stdout.strip() if result.ok else None


def _image_to_nodes(local: LocalDocker, connections: list[SshConnection], wanted: str) -> str:
    """Stream the workload image to the nodes that lack it (in parallel); check every ID."""

    def ensure(connection: SshConnection) -> bool:
        if _remote_image_id(connection, WORKLOAD_IMAGE) == wanted:
            return False
        with subprocess.Popen(local.argv("save", WORKLOAD_IMAGE), stdout=subprocess.PIPE) as save:
            assert save.stdout is not None
            result = connection.run(
                ["docker", "load"], stdin=save.stdout, timeout=IMAGE_TRANSFER_TIMEOUT_S
            )
        if not result.ok or save.returncode != 0:
            raise ImageError(
                f"streaming {WORKLOAD_IMAGE} failed: {result.stderr.strip()[-300:]}",
                fix="check free disk space on this machine (the nodes' Docker volumes)",
            )
        return True

    copied = fan_out(connections, ensure, name=_name).values()
    ids = fan_out(connections, lambda c: _remote_image_id(c, WORKLOAD_IMAGE), name=_name)
    odd = {n: i for n, i in ids.succeeded.items() if i != wanted}
    if odd or ids.failed:
        raise ImageError(
            f"{WORKLOAD_IMAGE} has another ID on {', '.join(odd) or ', '.join(ids.failed)}"
        )
    count = sum(copied)
    return f"streamed over SSH to {count} node(s)" if count else "already there"


def _model_to_node(connection: SshConnection, model_dir: Path) -> None:
    """Copy the model into the node's cache (a tar over SSH), unless the same recipe is there."""
    target = f"{NODE_MODEL_CACHE}/models/{TINY_MODEL_NAME}"
    recipe = (model_dir / RECIPE_FILE).read_text().strip()
    present = connection.run(["cat", f"{target}/{RECIPE_FILE}"])
    if present.ok and present.stdout.strip() == recipe:
        return
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        tar.add(model_dir, arcname=TINY_MODEL_NAME)
    # The target directory comes in as $0; the script itself is constant.
    unpack = 'rm -rf "$0/$1" && mkdir -p "$0" && tar -x -C "$0"'
    connection.run(
        ["sh", "-c", unpack, f"{NODE_MODEL_CACHE}/models", TINY_MODEL_NAME],
        stdin=archive.getvalue(),
        check=True,
        fix="check free disk space on the node",
    )


def _inventory_text(
    name: str, nodes: list[SandboxNode], key: Path, known_hosts: Path, api_key: Path
) -> str:
    document = {
        "cluster": name,
        "image": WORKLOAD_IMAGE,
        "accelerator": "cpu",
        "ssh": {"user": "root", "key_file": str(key), "known_hosts": str(known_hosts)},
        "nodes": [
            {"name": n.name, "address": n.address, **({"role": "head"} if i == 0 else {})}
            for i, n in enumerate(nodes)
        ],
        "model_cache": NODE_MODEL_CACHE,
        "network": {"interface": "eth0"},
        "env": {"VLLM_CPU_KVCACHE_SPACE": "1"},
        "secrets": {"api_key": f"file:{api_key}"},
        "model": {
            "name": f"{NODE_MODEL_CACHE}/models/{TINY_MODEL_NAME}",
            "served_name": SERVED_NAME,
            "args": ["--dtype", "bfloat16", "--max-model-len", "256"],
        },
    }
    header = (
        f"# Written by `vcluster sandbox up` for the local sandbox {name!r}.\n"
        "# Use it as is: vcluster up THIS_FILE; vcluster status THIS_FILE; vcluster down THIS_FILE\n"
    )
    return header + yaml.safe_dump(document, sort_keys=False)
