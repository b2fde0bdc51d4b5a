"""`vcluster sandbox up / down`: N local nodes, the workload image and the tiny model on each,
and an inventory for them that `vcluster up` uses as is.

`up` is a list of small steps, each reporting one line with its duration. It converges: nodes
already running with the same spec are kept, an image or model already on a node is not sent
again, so a second `up` takes seconds. Everything vcluster writes lies in the workdir (keys,
known_hosts, inventory, API key, `sandbox.json`) or is a Docker object labelled
`io.vcluster.sandbox=<name>`; `~/.ssh` is never touched.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cluster.nodes.transport.fanout import fan_out
from cluster.nodes.transport.ssh import (
    HostUnreachable,
    SshConnection,
    SshTarget,
    SshTimeouts,
    connect,
)
from cluster.progress import prefixed
from cluster.sandbox import keys
from cluster.sandbox.dockerd import RUN_DIR, LocalDocker, ensure_local_docker
from cluster.sandbox.filelock import file_lock
from cluster.sandbox.images import (
    NODE_IMAGE,
    WORKLOAD_IMAGE,
    BuildRecord,
    build_images,
    image_id,
)
from cluster.sandbox.inventory_file import inventory_text, write_inventory
from cluster.sandbox.model import TINY_MODEL_SEEDS, ensure_tiny_model
from cluster.sandbox.nodes import (
    NODE_LABEL,
    NODE_MODEL_CACHE,
    NodeSettings,
    SandboxError,
    SandboxNode,
    create_network,
    labelled,
    leftovers,
    plan_nodes,
    remove_all,
    running_storage,
    start_node,
    wait_until_ready,
)
from cluster.sandbox.storage import AUTO, NodeStorage, choose_node_storage, mem_total_bytes
from cluster.sandbox.transfer import image_to_nodes, model_to_node

Progress = Callable[[str], None]
DEFAULT_NAME = "sandbox"
DEFAULT_NODES = 2
MAX_NODES = 16
WORKDIR_ROOT = Path("/var/lib/vcluster")
STATE_FILE = "sandbox.json"
SSH_TIMEOUTS = SshTimeouts(connect=5.0, command=120.0)
SSH_READY_TIMEOUT_S = 30.0
"""How long a node's sshd may refuse connections after its entrypoint said it runs."""


def default_workdir(name: str = DEFAULT_NAME) -> Path:
    """`/var/lib/vcluster/<name>`: one place per machine, as the sandbox's Docker objects are."""
    return WORKDIR_ROOT / name


@dataclass(frozen=True)
class Sandbox:
    name: str
    workdir: Path
    inventory: Path
    nodes: tuple[SandboxNode, ...]
    image_id: str


class Steps:
    """Runs named steps; each reports one line with its duration when it ends (or fails)."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.detail = prefixed(progress, "    ")
        """A step's own lines, indented under it (live lines stay live)."""

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[list[str]]:
        """`with steps.step("nodes") as done: ... done.append("2 nodes running")`."""
        started = time.monotonic()
        done: list[str] = []
        try:
            yield done
        except BaseException:
            self.progress(f"✗ {what} ({time.monotonic() - started:.1f}s)")
            raise
        self.progress(f"✓ {'; '.join(done) or what} ({time.monotonic() - started:.1f}s)")


def _sandbox_lock(name: str) -> contextlib.AbstractContextManager[None]:
    """One `up` or `down` of a sandbox at a time on this machine; a second one is refused."""

    def refuse() -> None:
        raise SandboxError(
            f"another `vcluster sandbox up/down` of sandbox {name!r} is running",
            where="localhost",
            fix="wait for it to finish, or use another --name",
        )

    return file_lock(RUN_DIR / f"sandbox-{name}.lock", when_busy=refuse)


def name_in(workdir: Path) -> str | None:
    """The name of the sandbox whose workdir this is (from its `sandbox.json`), if any."""
    try:
        return json.loads((workdir / STATE_FILE).read_text())["name"]
    except (OSError, ValueError, KeyError):
        return None


def _write_state(workdir: Path, name: str, nodes: list[SandboxNode] | None = None) -> None:
    state = {"name": name, "nodes": [n.__dict__ for n in nodes or []]}
    (workdir / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")


def sandbox_up(
    nodes: int = DEFAULT_NODES,
    workdir: Path | None = None,
    name: str = DEFAULT_NAME,
    progress: Progress = print,
    node_storage: str = AUTO,
) -> Sandbox:
    """Bring the sandbox up, or complete or resize one that exists; idempotent.

    `node_storage` (auto, memory or disk) says where the nodes keep their Docker data.
    """
    if not 1 <= nodes <= MAX_NODES:
        raise SandboxError(f"--nodes must be 1 to {MAX_NODES}, got {nodes}")
    workdir = (workdir or default_workdir(name)).resolve()
    owner = name_in(workdir)
    if owner not in (None, name):
        raise SandboxError(
            f"{workdir} belongs to sandbox {owner!r}",
            fix=f"use --name {owner}, or another --workdir",
        )
    steps = Steps(progress)
    with _sandbox_lock(name):
        workdir.mkdir(parents=True, exist_ok=True)
        _write_state(workdir, name)
        local = _docker_step(steps)
        workload = _images_step(steps, local)
        workload_id = workload.image_id
        with steps.step("tiny models") as done:
            model_dirs = [
                ensure_tiny_model(docker=local, progress=steps.detail, name=name)
                for name in TINY_MODEL_SEEDS
            ]
            done.append(f"models {', '.join(TINY_MODEL_SEEDS)} ready in {model_dirs[0].parent}")
        storage = choose_node_storage(
            node_storage,
            nodes,
            workload.size_bytes,
            _machine_memory(),
            running_mode=running_storage(local, name),
        )
        planned, known_hosts = _nodes_step(steps, local, name, nodes, workdir, storage, workload_id)
        key = keys.client_key(workdir)
        with steps.step("SSH") as done:
            connections = _connect_all(planned, key, known_hosts)
            done.append(f"SSH to {len(connections)} node(s), host keys checked")
        try:
            with steps.step(f"{WORKLOAD_IMAGE} on every node") as done:
                sent = image_to_nodes(
                    local, connections, WORKLOAD_IMAGE, workload_id, progress=steps.detail
                )
                how = f"streamed to {sent}" if sent else "already on every node"
                done.append(f"{WORKLOAD_IMAGE} {workload_id[7:19]} on every node ({how})")
            with steps.step("model on every node") as done:
                copied = fan_out(
                    connections,
                    lambda c: sum(model_to_node(c, d) for d in model_dirs),
                    name=_name,
                )
                count = sum(1 for n in copied.values() if n)
                done.append(f"model in {NODE_MODEL_CACHE} on every node (copied to {count})")
        finally:
            for connection in connections:
                connection.close()
        inventory = write_inventory(
            workdir,
            inventory_text(
                name,
                WORKLOAD_IMAGE,
                planned,
                key_file=key,
                known_hosts=known_hosts,
                api_key_file=keys.api_key_file(workdir),
            ),
        )
        _write_state(workdir, name, planned)
    return Sandbox(name, workdir, inventory, tuple(planned), workload_id)


def _docker_step(steps: Steps) -> LocalDocker:
    with steps.step("local Docker") as done:
        local = ensure_local_docker()
        if local.data_root is None:
            done.append(f"Docker: the running daemon at {local.host}")
        else:
            done.append(f"Docker: vcluster's daemon at {local.host}, data in {local.data_root}")
    return local


def _images_step(steps: Steps, local: LocalDocker) -> BuildRecord:
    """Build what is missing; the workload image's record (its ID and size)."""
    with steps.step("images") as done:
        records = build_images(progress=steps.detail, docker=local)
        built = [r.image for r in records if r.action == "built"]
        done.append(f"images: built {', '.join(built)}" if built else "images: all cached")
    workload = next((r for r in records if r.image == WORKLOAD_IMAGE and r.image_id), None)
    if workload is None:
        raise SandboxError(f"{WORKLOAD_IMAGE} is missing after the build", where="localhost")
    return workload


def _machine_memory() -> int:
    try:
        return mem_total_bytes(Path("/proc/meminfo").read_text())
    except (OSError, ValueError) as exc:
        raise SandboxError(
            f"cannot read this machine's memory size: {exc}",
            where="localhost",
            fix="choose with --node-storage memory or disk",
        ) from exc


def _nodes_step(
    steps: Steps,
    local: LocalDocker,
    name: str,
    count: int,
    workdir: Path,
    storage: NodeStorage,
    workload_id: str,
) -> tuple[list[SandboxNode], Path]:
    with steps.step("nodes") as done:
        steps.detail(f"{storage.describe()}: {storage.reason}")
        node_image_id = image_id(local, NODE_IMAGE)
        if node_image_id is None:
            raise SandboxError(f"{NODE_IMAGE} is missing after the build", where="localhost")
        subnet = create_network(local, name)
        planned = plan_nodes(name, count, subnet)
        _remove_extra_nodes(local, name, {n.name for n in planned})
        authorized = keys.authorized_key(keys.client_key(workdir))
        host_keys = {n.name: keys.host_key(workdir, n.name) for n in planned}
        settings = NodeSettings(node_image_id, authorized, storage, workload_id)
        started = [start_node(local, name, n, host_keys[n.name], settings) for n in planned]
        for node in planned:
            wait_until_ready(local, node)
        known_hosts = keys.write_known_hosts(
            workdir, [(n.address, host_keys[n.name]) for n in planned]
        )
        kept = started.count(False)
        done.append(
            f"{count} node(s) on {subnet}: "
            + ", ".join(f"{n.name} {n.address}" for n in planned)
            + (f" ({kept} kept running)" if kept else "")
        )
        done.append(storage.describe())
    return planned, known_hosts


def _remove_extra_nodes(local: LocalDocker, name: str, wanted: set[str]) -> None:
    """After `up --nodes 3` then `up --nodes 2`, node-3 goes (with its volume)."""
    for container in labelled(local, "container", name):
        node = _container_node(local, container)
        if node is not None and node not in wanted:
            volume = f"vcluster-{name}-{node}-docker"
            for argv in (("rm", "--force", container), ("volume", "rm", "--force", volume)):
                _run_docker(local, *argv)


def _container_node(local: LocalDocker, container: str) -> str | None:
    fmt = '{{index .Config.Labels "' + NODE_LABEL + '"}}'
    node = _run_docker(local, "inspect", "--format", fmt, container).strip()
    return node or None


def _run_docker(local: LocalDocker, *args: str) -> str:
    done = subprocess.run(
        local.argv(*args), capture_output=True, text=True, timeout=120, check=False
    )
    return done.stdout


def _target(node: SandboxNode, key: Path, known_hosts: Path) -> SshTarget:
    return SshTarget(name=node.name, host=node.address, key_file=key, known_hosts=known_hosts)


def _name(connection: SshConnection) -> str:
    return connection.target.name


def _connect_all(nodes: list[SandboxNode], key: Path, known_hosts: Path) -> list[SshConnection]:
    """One connection per node, in parallel; close the opened ones if any node fails."""
    targets = [_target(n, key, known_hosts) for n in nodes]
    outcome = fan_out(targets, _connect_when_ready, name=lambda t: t.name)
    if outcome.failed:
        for connection in outcome.succeeded.values():
            connection.close()
    return outcome.values()


def _connect_when_ready(target: SshTarget) -> SshConnection:
    """Connect once the node's sshd accepts; a host key or auth problem fails at once."""
    deadline = time.monotonic() + SSH_READY_TIMEOUT_S
    while True:
        try:
            return connect(target, SSH_TIMEOUTS)
        except HostUnreachable:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.3)


def sandbox_down(
    name: str = DEFAULT_NAME, workdir: Path | None = None, progress: Progress = print
) -> list[str]:
    """Remove every Docker object of the sandbox; fine when there is nothing left.

    With a workdir, the sandbox is the one that workdir belongs to. The workdir itself (keys)
    is kept, so a later `up` gives the nodes the same host keys.
    """
    if workdir is not None:
        name = name_in(workdir.resolve()) or name
    with _sandbox_lock(name):
        local = ensure_local_docker()
        removed = remove_all(local, name)
        remaining = {kind: ids for kind, ids in leftovers(local, name).items() if ids}
    if remaining:
        raise SandboxError(
            f"these remain after removal: {remaining}",
            where="localhost",
            fix=f"remove them by hand: docker ... --filter label=io.vcluster.sandbox={name}",
        )
    progress(f"sandbox {name}: " + (", ".join(removed) + " removed" if removed else "nothing left"))
    return removed
