"""A node's vcluster container, through the Docker SDK: inspect, create from a spec, remove."""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass

import docker
import docker.errors
from docker.types import DeviceRequest, Mount, Ulimit

from cluster.decide.plan import (
    LABEL_CLUSTER,
    LABEL_EXECUTOR,
    LABEL_NODE,
    LABEL_RAY,
    LABEL_ROLE,
    LABEL_SPEC_HASH,
    SECRETS_PATH,
    SUPERVISOR_STATE_DIR,
    ContainerSpec,
    supervisor_argv,
)
from cluster.decide.secrets import redact
from cluster.errors import VclusterError

STOP_TIMEOUT_S = 10
SHM_SIZE_WITHOUT_HOST_IPC = "10g"


class ContainerError(VclusterError):
    """Docker refused or failed an operation on a node's container."""


@dataclass(frozen=True)
class ContainerState:
    """What runs on a node under the vcluster container name."""

    name: str
    status: str  # docker's: created, running, exited, ...
    image_id: str
    spec_hash: str | None
    role: str | None
    started_at: str
    exit_code: int
    ray: bool = True
    """False when the container runs no Ray (vLLM's own multi-node mode without Ray)."""
    executor: str | None = None
    """vLLM's executor the container was planned for (None: made before vcluster said)."""

    @property
    def running(self) -> bool:
        return self.status == "running"


def inspect_container(client: docker.DockerClient, name: str) -> ContainerState | None:
    """The container `name` on this node, or None when there is none."""
    try:
        container = client.containers.get(name)
    except docker.errors.NotFound:
        return None
    return state_from_attrs(name, container.attrs)


def state_from_attrs(name: str, attrs: dict) -> ContainerState:
    """The state from Docker's inspect document (the API's, or `docker inspect`'s)."""
    labels = attrs["Config"].get("Labels") or {}
    return ContainerState(
        name=name,
        status=attrs["State"]["Status"],
        image_id=attrs["Image"],
        spec_hash=labels.get(LABEL_SPEC_HASH),
        role=labels.get(LABEL_ROLE),
        started_at=attrs["State"].get("StartedAt", ""),
        exit_code=int(attrs["State"].get("ExitCode", 0)),
        ray=labels.get(LABEL_RAY) != "no",
        executor=labels.get(LABEL_EXECUTOR),
    )


def create_container(
    client: docker.DockerClient, spec: ContainerSpec, secrets: dict[str, str]
) -> ContainerState:
    """Start the node's container from `spec`; `secrets` are the resolved secret files.

    The secrets are written into the created container's own file system (owner-only files)
    before it starts, so that neither `docker inspect` nor the process list shows them.

    The image's entrypoint is replaced by vcluster's supervisor, which runs the spec's Ray
    command and vLLM (like vLLM's run_cluster.sh replaces it with `ray start`), so the same spec
    runs on `vllm/vllm-openai`, whose entrypoint is `vllm serve`.
    """
    environment = dict(spec.environment)
    if spec.gpus == "all":
        device_requests = [DeviceRequest(count=-1, capabilities=[["gpu"]])]
    elif spec.gpus:
        ids = [str(i) for i in spec.gpus]  # the container sees them as 0..n-1
        device_requests = [DeviceRequest(device_ids=ids, capabilities=[["gpu"]])]
    else:
        device_requests = None
    argv = supervisor_argv(spec)
    try:
        container = client.containers.create(
            spec.image,
            entrypoint=argv[:1],
            command=argv[1:],
            name=spec.name,
            environment=environment,
            labels=spec.labels,
            mounts=[
                Mount(m.target, m.source, type="bind", read_only=m.read_only) for m in spec.mounts
            ],
            network_mode=spec.network_mode,
            ipc_mode=spec.ipc_mode,
            shm_size=None if spec.ipc_mode == "host" else SHM_SIZE_WITHOUT_HOST_IPC,
            device_requests=device_requests,
            restart_policy={"Name": spec.restart_policy},
            # InfiniBand/RoCE (cluster/facts/fabric.py): the devices, pinned memory, IPC_LOCK
            devices=[f"{device}:{device}:rwm" for device in spec.devices] or None,
            ulimits=[Ulimit(name=u.name, soft=u.soft, hard=u.hard) for u in spec.ulimits] or None,
            cap_add=list(spec.cap_add) or None,
        )
        if not container.put_archive("/", secret_archive(secrets)):
            raise ContainerError(f"docker could not write the secret files into {spec.name}")
        container.start()
    except docker.errors.ImageNotFound:
        raise ContainerError(
            f"image {spec.image} is not on this node",
            fix="run `vcluster up` again: it copies the image to every node",
        ) from None
    except docker.errors.APIError as exc:
        raise ContainerError(
            f"docker could not start {spec.name}: {redact(_explain(exc), list(secrets.values()))}",
            fix=_fix_for(exc),
        ) from None
    state = inspect_container(client, spec.name)
    if state is None:
        raise ContainerError(f"{spec.name} vanished right after it was created")
    return state


def secret_archive(secrets: dict[str, str]) -> bytes:
    """A tar of the secret files at their place in the container: root's, 0400 in a 0700 folder."""
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        state = tarfile.TarInfo(SUPERVISOR_STATE_DIR.lstrip("/"))
        state.type, state.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(state)
        folder = tarfile.TarInfo(SECRETS_PATH.lstrip("/"))
        folder.type, folder.mode = tarfile.DIRTYPE, 0o700
        tar.addfile(folder)
        for name, value in sorted(secrets.items()):
            data = value.encode()
            info = tarfile.TarInfo(f"{folder.name}/{name}")
            info.size, info.mode = len(data), 0o400
            tar.addfile(info, io.BytesIO(data))
    return archive.getvalue()


def remove_container(client: docker.DockerClient, name: str) -> bool:
    """Stop and remove `name`; True when there was one. Idempotent."""
    try:
        container = client.containers.get(name)
    except docker.errors.NotFound:
        return False
    try:
        container.remove(force=True, v=True)
    except docker.errors.NotFound:
        return False
    except docker.errors.APIError as exc:
        raise ContainerError(f"docker could not remove {name}: {_explain(exc)}") from None
    return True


def container_logs(client: docker.DockerClient, name: str, tail: int = 20) -> str:
    """The last `tail` lines the container printed, or '' when there is no such container."""
    try:
        output = client.containers.get(name).logs(tail=tail)
    except docker.errors.NotFound:
        return ""
    return output.decode(errors="replace")


def cluster_containers(client: docker.DockerClient, cluster: str) -> list[dict[str, str]]:
    """Every container on this node labelled with `cluster` (also those run_cluster.sh started)."""
    found = client.containers.list(all=True, filters={"label": f"{LABEL_CLUSTER}={cluster}"})
    return [
        {
            "name": c.name,
            "status": c.status,
            "node": c.labels.get(LABEL_NODE, ""),
        }
        for c in found
    ]


def _explain(exc: docker.errors.APIError) -> str:
    return str(exc.explanation or exc).strip()


def _fix_for(exc: docker.errors.APIError) -> str:
    text = _explain(exc)
    if "could not select device driver" in text or "nvidia" in text.lower():
        return "install the NVIDIA container toolkit on this node and restart docker"
    if "Conflict" in text or "already in use" in text:
        return "run `vcluster down` and `vcluster up` again, or `vcluster up --recreate`"
    return "see the docker message above"
