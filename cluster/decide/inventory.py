"""The inventory: its schema, and loading it with errors that name the file, line and key.

This is the only module that reads the inventory YAML. Validation is in two passes: the
schema (types, unknown keys, ranges) through pydantic, then the rules across fields (unique
names, one head, TP x PP against the declared GPUs). Every problem of both passes is reported
at once, each as `file:line key.path: message`.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from cluster.decide.secrets import SecretRef
from cluster.decide.state_paths import generated_ray_token_path
from cluster.decide.traps import TRAP_NAMES
from cluster.decide.yaml_positions import (
    KeyPath,
    PositionedDocument,
    format_key_path,
    load_positioned_yaml,
)
from cluster.errors import InventoryError, Problem

CONTAINER_CACHE_PATH = "/root/.cache/huggingface"

_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
_IMAGE = re.compile(r"^[a-z0-9][a-z0-9._/:-]*(@sha256:[0-9a-f]{64})?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_RESERVED_ENV = {
    "VLLM_HOST_IP",
    "NCCL_SOCKET_IFNAME",
    "GLOO_SOCKET_IFNAME",
    "VLLM_API_KEY",
    "HF_TOKEN",
    "HF_TOKEN_PATH",
    "RAY_AUTH_MODE",
    "RAY_AUTH_TOKEN",
    "RAY_AUTH_TOKEN_PATH",
}
_DEV_ROUTES_ENV = "VLLM_SERVER_DEV_MODE"
"""Opens vLLM's development routes (sleep, wake, collective_rpc...) on every model's server:
vcluster turns it on only for sleeping models' ranks, behind the agent's guard."""

Port = Annotated[int, Field(ge=1, le=65535)]
Auto = Literal["auto"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _absolute(value: str | None, what: str) -> str | None:
    if value is None:
        return None
    if not (value.startswith("/") or value.startswith("~")):
        raise ValueError(f"{what} must be an absolute path (or start with ~), got {value!r}")
    return value


def _check_address(value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if not _HOSTNAME.match(value):
            raise ValueError(f"{value!r} is neither an IP address nor a host name") from None
    return value


class JumpHost(_Strict):
    """A bastion: vcluster reaches the node through an SSH connection to this host."""

    address: str
    user: str | None = None
    port: Port = 22

    @field_validator("address")
    @classmethod
    def _address_format(cls, value: str) -> str:
        return _check_address(value)


class SshSettings(_Strict):
    """How to reach hosts over SSH; defaults at the top, overridable per node."""

    user: str | None = None
    port: Port | None = None
    key_file: str | None = None
    known_hosts: str | None = None
    jump: JumpHost | None = None

    @field_validator("key_file", "known_hosts")
    @classmethod
    def _paths_absolute(cls, value: str | None) -> str | None:
        return _absolute(value, "the path")


class SshDefaults(SshSettings):
    trust_on_first_use: bool = False
    connect_timeout: Annotated[float, Field(gt=0, le=600)] = 10.0
    command_timeout: Annotated[float, Field(gt=0, le=86400)] = 120.0


class Node(_Strict):
    """One server of the cluster."""

    address: str
    name: str | None = None
    role: Literal["head", "worker"] | None = None
    gpus: Annotated[int, Field(ge=1, le=64)] | None = None
    gpu_ids: list[Annotated[int, Field(ge=0, le=63)]] | None = Field(
        default=None, min_length=1, max_length=64
    )
    """The GPUs vcluster may use (nvidia-smi's indices); the others stay untouched. On CPU
    nodes: the device slots, one vLLM rank each (default: one)."""
    ssh: SshSettings = SshSettings()

    @field_validator("address")
    @classmethod
    def _address_format(cls, value: str) -> str:
        return _check_address(value)

    @field_validator("name")
    @classmethod
    def _name_format(cls, value: str | None) -> str | None:
        if value is not None and not _NAME.match(value):
            raise ValueError(f"{value!r} must be lowercase letters, digits and '-'")
        return value

    @field_validator("gpu_ids")
    @classmethod
    def _unique_ids(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError(f"{value} names a GPU twice")
        return value

    @model_validator(mode="after")
    def _ids_match_count(self) -> Node:
        if self.gpus is not None and self.gpu_ids is not None and self.gpus != len(self.gpu_ids):
            raise ValueError(
                f"gpus: {self.gpus} but gpu_ids names {len(self.gpu_ids)}; drop gpus "
                "(gpu_ids gives the count)"
            )
        return self

    @property
    def declared_gpus(self) -> int | None:
        """The GPUs this node gives the cluster, when the inventory says."""
        return len(self.gpu_ids) if self.gpu_ids is not None else self.gpus

    @property
    def node_name(self) -> str:
        """The node's name, or its address made into one."""
        return self.name or re.sub(r"[^a-z0-9-]", "-", self.address.lower())


class Ports(_Strict):
    ray: Port = 6379
    vllm: Port = 8000
    master: Port = 29501  # torch.distributed rendezvous of vLLM's own multi-node mode
    ray_metrics: Port = 8080  # Ray's Prometheus metrics on every node (random otherwise)
    collective: Port = 29512  # the collective check's rendezvous on the head, while it runs
    agent: Port = 29513  # each node's model agent, with several models (token required)
    models: Port = 30100
    """With several models, model i's API server listens on models + 2i (with a key), its
    ranks meet on models + 2i + 1."""


class RouterSettings(_Strict):
    """The endpoint: vcluster's router, in front of every model (one or several)."""

    request_wait_s: float = Field(default=300.0, gt=0, le=86400)
    """How long a request for a model that is starting waits before a 503 with Retry-After."""
    start_timeout_s: float = Field(default=1800.0, gt=0, le=86400)
    """A model not serving this long after its start counts as failed and is stopped."""
    allow_anonymous: bool = False
    """Serve without `secrets.api_key`: anyone who reaches the endpoint uses the models
    (`up` refuses a cluster without a key unless this says so; `check` WARNs)."""


class Network(_Strict):
    interface: str | None = None
    firewall: bool = True
    """Let only the cluster's nodes (and loopback) reach the ports that have no authentication
    of their own (rendezvous stores, the ranks' traffic, metrics): a chain of vcluster's own on
    every node, installed by `up`, removed by `down`."""
    ib_hcas: list[str] | None = Field(default=None, min_length=1)
    """The InfiniBand/RoCE HCAs (`mlx5_0`, or one port: `mlx5_0:1`) NCCL may use between
    nodes (default: every active one); see docs/gpu-fabrics.md."""

    @field_validator("interface")
    @classmethod
    def _interface_name(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^[A-Za-z0-9_.:@-]{1,15}$", value):
            raise ValueError(f"{value!r} is not a network interface name")
        return value

    @field_validator("ib_hcas")
    @classmethod
    def _hca_names(cls, value: list[str] | None) -> list[str] | None:
        for name in value or ():
            if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}(:\d{1,3})?", name):
                raise ValueError(f"{name!r} is not an HCA name like mlx5_0 or mlx5_0:1")
        return value


class RaySettings(_Strict):
    """How Ray's own endpoints are exposed; its RPC ports always require the cluster's token."""

    dashboard_host: str = "127.0.0.1"
    """The address Ray's dashboard (HTTP, with the token) listens on; 0.0.0.0 for every one."""
    wheelhouse: str | None = None
    """A folder of wheels on this machine to add Ray to an image without it (air-gapped sites)."""
    index_url: str = "https://pypi.org/simple"
    """The package index the head installs Ray from when there is no wheelhouse."""
    version: str | None = None
    """The Ray version to add (default: the one that matches the image's vLLM)."""

    @field_validator("wheelhouse")
    @classmethod
    def _wheelhouse_absolute(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("/", "~")):
            raise ValueError(f"must be an absolute path on this machine, got {value!r}")
        return value

    @field_validator("index_url")
    @classmethod
    def _index_url(cls, value: str) -> str:
        if re.match(r"^\w+://[^/]*@", value):
            # it is written into the derived image's recipe, which `docker history` shows
            raise ValueError(
                "must not hold credentials (they would stay in the Ray-ready image's history); "
                "use an index the head reaches without them, or ray.wheelhouse"
            )
        if not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", value):
            raise ValueError(
                f"{value!r} is not an http(s) URL of an index (no spaces, query or fragment)"
            )
        return value

    @field_validator("version")
    @classmethod
    def _ray_version(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"\d+(\.\d+){1,2}", value):
            raise ValueError(f"{value!r} is not a Ray version like 2.60.0")
        return value

    @field_validator("dashboard_host")
    @classmethod
    def _dashboard_address(cls, value: str) -> str:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address (127.0.0.1, 0.0.0.0, ...)") from None
        return value


class CollectiveSettings(_Strict):
    """The all-reduce check across every GPU (`vcluster check --collective`, or inside `up`)."""

    in_up: bool = False
    """Run it in `up`, after the containers and before vLLM starts (a FAIL stops `up`)."""
    max_size_mib: int = Field(default=1024, ge=1, le=16384)
    """The largest all-reduce; sizes go from 1 MiB up, by 4."""
    join_timeout_s: float = Field(default=60.0, ge=5, le=3600)
    """How long every rank may take to join; a rank not there by then is a FAIL."""
    time_limit_s: float = Field(default=600.0, ge=10, le=7200)
    """The whole check, on every node: past it every process of it is stopped."""

    @model_validator(mode="after")
    def _join_within_the_limit(self) -> CollectiveSettings:
        if self.join_timeout_s >= self.time_limit_s:
            raise ValueError(
                "join_timeout_s must be below time_limit_s (the joining is part of it)"
            )
        return self


class Secrets(_Strict):
    """Secrets by reference only; the values are read on the controller when needed."""

    hf_token: SecretRef | None = None
    api_key: SecretRef | None = None
    ray_token: SecretRef | None = None
    """Ray's cluster token; vcluster makes one per cluster when this is left out."""

    @field_validator("hf_token", "api_key", "ray_token", mode="before")
    @classmethod
    def _parse(cls, value: Any) -> Any:
        if isinstance(value, str):
            return SecretRef.parse(value)
        if value is not None:
            raise ValueError("a secret must be a reference string, 'env:NAME' or 'file:/path'")
        return value


_SERVED_NAME_MAX = 128
_SERVED_NAME = re.compile(r"^[A-Za-z0-9._:/-]+$")
_REVISION = re.compile(r"^[A-Za-z0-9._/-]{1,256}$")
_SET = "is set by vcluster;"
_USE_KEYS = f"{_SET} use the inventory keys (tensor_parallel, pipeline_parallel, ports, nodes)"
_MANAGED_OPTIONS = {
    "--tensor-parallel-size": f"{_SET} use tensor_parallel",
    "-tp": f"{_SET} use tensor_parallel",
    "--pipeline-parallel-size": f"{_SET} use pipeline_parallel",
    "-pp": f"{_SET} use pipeline_parallel",
    "--distributed-executor-backend": f"{_SET} use executor",
    "--port": _USE_KEYS,
    "--host": _USE_KEYS,
    "--nnodes": _USE_KEYS,
    "--node-rank": _USE_KEYS,
    "--master-addr": _USE_KEYS,
    "--master-port": _USE_KEYS,
    "--headless": _USE_KEYS,
    "--api-key": f"{_SET} the key is given by secrets.api_key (never in args: `ps` shows them)",
    "--served-model-name": f"{_SET} use served_name",
    "--enable-sleep-mode": f"{_SET} use sleep: 1 or 2 (docs/models.md)",
    "--hf-token": "is refused (args show in `ps`): give the token by secrets.hf_token",
    "--config": "is refused (a config file could set what vcluster manages); put its options "
    "into args",
}
"""vLLM options that vcluster sets, with what to use instead."""


def _managed_option(arg: str) -> tuple[str, str] | None:
    """(the user's spelling, the managed option) when `arg` names one vLLM would take as it.

    vLLM reads `_` as `-` in long option names and `--name.key=value` as part of `--name`;
    argparse takes any unambiguous prefix (`--api-k`) for the whole name.
    """
    spelling = arg.split("=", 1)[0].split(".", 1)[0]
    if spelling.startswith("--"):
        name = "--" + spelling[2:].replace("_", "-")
        if name == "--":
            return None
        candidates = [m for m in _MANAGED_OPTIONS if m.startswith("--")]
    elif spelling.startswith("-") and len(spelling) > 1:
        name = spelling
        candidates = [m for m in _MANAGED_OPTIONS if not m.startswith("--")]
    else:
        return None
    managed = next((m for m in candidates if m.startswith(name)), None)
    return (spelling, managed) if managed is not None else None


def _served_name_problem(name: str, max_length: int = _SERVED_NAME_MAX) -> str | None:
    """Why `name` cannot be a served name (it goes into URLs, logs and plans), or None."""
    if len(name) > max_length:
        return f"at most {max_length} characters"
    if not _SERVED_NAME.match(name):
        return "only letters, digits and . _ - / : (no spaces or line breaks)"
    if name.startswith("/"):
        return "must not start with /"
    if any(part in ("", ".", "..") for part in name.split("/")):
        return "no `.` or `..` part, no `//` and no trailing /"
    return None


class Model(_Strict):
    """What `vllm serve` serves, and how it is split over the GPUs."""

    name: str = Field(min_length=1)
    served_name: str | None = None
    tensor_parallel: Annotated[int, Field(ge=1)] | Auto = "auto"
    pipeline_parallel: Annotated[int, Field(ge=1)] | Auto = "auto"
    args: list[str] = []
    source: str | None = None
    """A folder on this machine with the model's files: `up` and `models pull` send it to every
    node (once, passed on from node to node), checked file by file."""
    download: Literal["controller", "head", "nodes"] | None = None
    """Where a hub model without `source` is downloaded from the hub: once, on this machine
    (`controller`, the default) or on the head (`head`), then sent to every node like a
    `source`; or by each node's vLLM at start (`nodes`). docs/distribution.md."""
    revision: str | None = None
    """The hub revision downloaded (a branch, tag or commit; default main)."""
    keep_loaded: bool | None = None
    """Never unloaded (default: yes for a cluster with one model, no with several)."""
    unload_after_s: Annotated[float, Field(gt=0)] | None = None
    """Unloaded after this many seconds without a request (default: only to make room)."""
    sleep: Literal[1, 2, "off"] | None = None
    """How the model gives way: put to vLLM's sleep level 1 (weights to host memory) or 2
    (weights dropped, read from disk again on wake), or `off` (stopped). Default: 1 where the
    nodes have the host memory for its weights, else 2; off on the CPU platform."""

    @field_validator("sleep", mode="before")
    @classmethod
    def _sleep_level(cls, value: Any) -> Any:
        if value is False or value == "off":  # YAML reads a bare `off` as false
            return "off"
        if value is None or (type(value) is int and value in (1, 2)):
            return value
        raise ValueError(f"must be 1, 2 or off (vLLM's sleep level), got {value!r}")

    @field_validator("source")
    @classmethod
    def _source_absolute(cls, value: str | None) -> str | None:
        if value is not None and ".." in PurePosixPath(value).parts:
            raise ValueError(f"source must not go up a folder (`..`), got {value!r}")
        return _absolute(value, "source")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        # a local path (leading /) or a Hugging Face id; it is also the served name by default
        problem = _served_name_problem(value.removeprefix("/"), max_length=4096)
        if problem:
            raise ValueError(f"{problem}, got {value!r}")
        return value

    @field_validator("served_name")
    @classmethod
    def _safe_served_name(cls, value: str | None) -> str | None:
        problem = None if value is None else _served_name_problem(value)
        if problem:
            raise ValueError(f"{problem}, got {value!r}")
        return value

    @model_validator(mode="after")
    def _served_name_length(self) -> Model:
        if self.served_name is None and len(self.name) > _SERVED_NAME_MAX:
            raise ValueError(
                f"the name is served as it is, and a served name has at most {_SERVED_NAME_MAX} "
                "characters: give a shorter served_name"
            )
        return self

    @field_validator("revision")
    @classmethod
    def _safe_revision(cls, value: str | None) -> str | None:
        if value is not None and (
            not _REVISION.match(value) or ".." in value or value.startswith("/")
        ):
            raise ValueError(
                f"a branch, tag or commit of letters, digits and . _ - /, got {value!r}"
            )
        return value

    @model_validator(mode="after")
    def _download_only_from_the_hub(self) -> Model:
        if self.download is None and self.revision is None:
            return self
        if self.name.startswith("/"):
            raise ValueError(
                "a model named by a path is not downloaded: drop download and revision"
            )
        if self.source is not None:
            raise ValueError(
                "a model with source: is sent from that folder: drop download and revision"
            )
        if self.download == "nodes" and self.revision is not None:
            raise ValueError(
                "with download: nodes vLLM downloads the model: give it the revision in args "
                "(--revision REV) instead of revision:"
            )
        return self

    @model_validator(mode="after")
    def _kept_is_never_idle(self) -> Model:
        if self.keep_loaded and self.unload_after_s is not None:
            raise ValueError(
                "keep_loaded: true is never unloaded; drop unload_after_s, or keep_loaded"
            )
        return self

    @property
    def served(self) -> str:
        """The name clients ask for (`served_name`, or the model's name)."""
        return self.served_name or self.name

    @field_validator("args")
    @classmethod
    def _no_managed_args(cls, value: list[str]) -> list[str]:
        for arg in value:
            found = _managed_option(arg)
            if found is not None:
                spelling, managed = found  # the option's name only: its value may be a secret
                raise ValueError(f"{spelling} {_MANAGED_OPTIONS[managed]}")
        return value


class Inventory(_Strict):
    """A validated inventory. Build it with `load_inventory`."""

    cluster: str
    image: str
    accelerator: Literal["nvidia", "cpu"] = "nvidia"
    executor: Literal["ray", "mp"] | None = None
    ssh: SshDefaults = SshDefaults()
    nodes: list[Node] = Field(min_length=1)
    model_cache: str
    network: Network = Network()
    ports: Ports = Ports()
    env: dict[str, str] = {}
    secrets: Secrets = Secrets()
    ray: RaySettings = RaySettings()
    collective: CollectiveSettings = CollectiveSettings()
    model: Model | None = None
    models: list[Model] = []
    router: RouterSettings = RouterSettings()
    traps: dict[str, bool | Literal["on", "off"]] = {}
    """Known vLLM traps (cluster/decide/traps.py) turned off by name: `traps: {NAME: off}`."""
    source: str | None = Field(default=None, exclude=True)

    @field_validator("traps")
    @classmethod
    def _known_traps(cls, value: dict[str, bool | str]) -> dict[str, bool | str]:
        for name in value:
            if name not in TRAP_NAMES:
                raise ValueError(f"unknown trap {name!r}; known: {', '.join(sorted(TRAP_NAMES))}")
        return value

    @property
    def traps_off(self) -> frozenset[str]:
        """The traps the inventory turned off (`off`, which YAML also reads as false)."""
        return frozenset(name for name, on in self.traps.items() if on in (False, "off"))

    @field_validator("cluster")
    @classmethod
    def _cluster_name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(f"{value!r} must be lowercase letters, digits and '-', at most 63")
        return value

    @field_validator("image")
    @classmethod
    def _image_ref(cls, value: str) -> str:
        if not _IMAGE.match(value):
            raise ValueError(f"{value!r} is not an image reference (repo:tag or repo@sha256:...)")
        return value

    @field_validator("model_cache")
    @classmethod
    def _cache_absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"must be an absolute path on the hosts, got {value!r}")
        if ".." in value.split("/"):
            raise ValueError("must not hold a `..` segment: give the folder's own path")
        return value

    @field_validator("env")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not _ENV_NAME.match(name):
                raise ValueError(f"{name!r} is not an environment variable name")
            if name in _RESERVED_ENV:
                raise ValueError(f"{name} is set by vcluster (secrets: or network: set it)")
            if name == _DEV_ROUTES_ENV:
                raise ValueError(
                    f"{name} would open vLLM's development routes on every model; remove it "
                    "(a model's `sleep:` turns them on for that model, behind the agent's token)"
                )
        return value

    @model_validator(mode="after")
    def _one_way_to_name_models(self) -> Inventory:
        if (self.model is None) == (not self.models):
            raise ValueError(
                "give either model: (one model) or models: (a list), not "
                + ("both" if self.model is not None else "neither")
            )
        return self

    @property
    def model_list(self) -> tuple[Model, ...]:
        """Every model the cluster serves, in the inventory's order."""
        return (self.model,) if self.model is not None else tuple(self.models)

    @property
    def primary_model(self) -> Model:
        """The first model: the only one, on a cluster that serves one."""
        return self.model_list[0]

    def keeps_loaded(self, model: Model) -> bool:
        """Whether `model` is loaded by `up` and never unloaded."""
        if model.keep_loaded is not None:
            return model.keep_loaded
        return len(self.model_list) == 1 and model.unload_after_s is None

    @property
    def routed(self) -> bool:
        """Whether the router loads models through agents: with several models, or one loaded
        on demand. One model always loaded runs under the head's supervisor, with the router
        in front of it all the same."""
        return len(self.model_list) > 1 or not self.keeps_loaded(self.primary_model)

    @property
    def default_executor(self) -> Literal["ray", "mp"]:
        """`executor`, or the default: Ray on GPUs, vLLM's own mode on CPUs (vLLM's Ray
        executor refuses the CPU platform) and for routed models (each gets its GPUs by
        CUDA_VISIBLE_DEVICES in vLLM's multi-node mode)."""
        if self.executor is not None:
            return self.executor
        return "mp" if self.accelerator == "cpu" or self.routed else "ray"

    @property
    def head(self) -> Node:
        """The node with role head, or the first node."""
        return next((n for n in self.nodes if n.role == "head"), self.nodes[0])

    @property
    def workers(self) -> list[Node]:
        return [n for n in self.nodes if n is not self.head]

    @property
    def head_first(self) -> list[Node]:
        """Every node, the head first, then the workers in the inventory's order."""
        return [self.head, *self.workers]

    @property
    def ray_token(self) -> SecretRef:
        """Ray's token: `secrets.ray_token`, or the file vcluster keeps for this cluster."""
        if self.secrets.ray_token is not None:
            return self.secrets.ray_token
        return SecretRef("file", str(generated_ray_token_path(self.cluster)))

    @property
    def ray_token_is_generated(self) -> bool:
        return self.secrets.ray_token is None

    def container_model_path(self, model: Model | None = None) -> str:
        """The model (the first by default) as `vllm serve` inside the container sees it (host
        paths are mapped)."""
        name = (model or self.primary_model).name
        if not name.startswith("/"):
            return name
        relative = PurePosixPath(name).relative_to(self.model_cache)
        return str(PurePosixPath(CONTAINER_CACHE_PATH) / relative)


def load_inventory(path: Path | str) -> Inventory:
    """Read and validate an inventory file; raise `InventoryError` with every problem found."""
    path = Path(path)
    document = load_positioned_yaml(path)
    problems = [
        Problem(f"{path}:{line}", format_key_path(key), "duplicate key (the YAML has it twice)")
        for key, line in document.duplicate_keys
    ]
    if not isinstance(document.data, dict):
        problems.append(document.problem((), "the inventory must be a YAML mapping"))
        raise InventoryError(problems)
    problems += _cross_field_problems(document)
    try:
        inventory = Inventory.model_validate({**document.data, "source": str(path)})
    except ValidationError as exc:
        problems += [_problem_from_pydantic(document, error) for error in exc.errors()]
        inventory = None
    if problems:
        raise InventoryError(_sorted_unique(problems, document))
    assert inventory is not None
    return inventory


def _problem_from_pydantic(document: PositionedDocument, error: Any) -> Problem:
    location: KeyPath = tuple(p for p in error["loc"] if not _is_union_tag(p))
    kind = error["type"]
    if kind == "extra_forbidden":
        return document.problem(location, "unknown key (check its spelling in docs/inventory.md)")
    if kind == "missing":
        return document.problem(location, "required key is missing")
    message = str(error["msg"]).removeprefix("Value error, ")
    return document.problem(location, message)


def _is_union_tag(part: str | int) -> bool:
    # pydantic adds the union member ("int", "literal['auto']", "function-after[...]") to the loc
    return isinstance(part, str) and ("[" in part or part in {"int", "str", "float", "bool"})


def _sorted_unique(problems: list[Problem], document: PositionedDocument) -> list[Problem]:
    unique = list(dict.fromkeys(problems))

    def line(problem: Problem) -> int:
        return int(problem.location.rsplit(":", 1)[-1]) if ":" in problem.location else 0

    return sorted(unique, key=line)


def _cross_field_problems(document: PositionedDocument) -> list[Problem]:
    """Rules across fields, checked on the raw data so they show up with schema errors."""
    data = document.data
    nodes = data.get("nodes")
    if not isinstance(nodes, list):
        return []
    problems: list[Problem] = []
    entries = [(i, n) for i, n in enumerate(nodes) if isinstance(n, dict)]

    for key in ("address", "name"):
        counts = Counter(n.get(key) for _, n in entries if isinstance(n.get(key), str))
        for index, node in entries:
            value = node.get(key)
            if isinstance(value, str) and counts[value] > 1:
                first = next(i for i, n in entries if n.get(key) == value)
                if index != first:
                    message = f"duplicate {key} {value!r} (also nodes[{first}])"
                    problems.append(document.problem(("nodes", index, key), message))

    heads = [i for i, n in entries if n.get("role") == "head"]
    for index in heads[1:]:
        message = f"a second head (nodes[{heads[0]}] is the head); one node only has role: head"
        problems.append(document.problem(("nodes", index, "role"), message))

    problems += _parallelism_problems(document, entries)
    problems += _port_problems(document)
    problems += _model_path_problems(document)
    problems += _sleep_problems(document)
    return problems


def _sleep_problems(document: PositionedDocument) -> list[Problem]:
    """A sleep level where it cannot work: on the CPU platform (vLLM has no sleep mode
    there), or for a model kept loaded (it never gives way)."""
    data = document.data
    models = _model_entries(data)
    routed = _is_routed(data, models)
    problems = []
    for path, model in models:
        level = model.get("sleep")
        if level not in (1, 2) or isinstance(level, bool):
            continue
        if data.get("accelerator") == "cpu":
            message = (
                "vLLM has no sleep mode on the CPU platform (it refuses --enable-sleep-mode): "
                "set sleep: off or leave it out"
            )
            problems.append(document.problem((*path, "sleep"), message))
        elif model.get("keep_loaded") is True or not routed:
            message = (
                "a model kept loaded never gives way, so it never sleeps: "
                "leave sleep out, or set keep_loaded: false"
            )
            problems.append(document.problem((*path, "sleep"), message))
    return problems


def _model_entries(data: dict) -> list[tuple[KeyPath, dict]]:
    """(key path, raw entry) of every model: `model:` or each of `models:`."""
    if isinstance(data.get("model"), dict):
        return [(("model",), data["model"])]
    models = data.get("models")
    if not isinstance(models, list):
        return []
    return [(("models", i), m) for i, m in enumerate(models) if isinstance(m, dict)]


def _is_routed(data: dict, models: list[tuple[KeyPath, dict]]) -> bool:
    """`Inventory.routed`, on the raw data."""
    if len(models) != 1:
        return len(models) > 1
    only = models[0][1]
    return only.get("keep_loaded") is False or (
        only.get("keep_loaded") is None and only.get("unload_after_s") is not None
    )


def _parallelism_problems(
    document: PositionedDocument, entries: list[tuple[int, dict]]
) -> list[Problem]:
    data = document.data
    models = _model_entries(data)
    if _is_routed(data, models):
        return _routed_problems(document, entries, models)
    if not models:
        return []
    model = models[0][1]
    tp = model.get("tensor_parallel", "auto")
    pp = model.get("pipeline_parallel", "auto")
    declared = [g for _, n in entries if isinstance(g := _declared_gpus(n), int)]
    all_declared = bool(entries) and len(declared) == len(entries)
    if data.get("accelerator", "nvidia") == "cpu":
        if isinstance(pp, int) and pp > len(entries):
            message = f"pipeline_parallel {pp} is more than the {len(entries)} nodes"
            return [document.problem((*models[0][0], "pipeline_parallel"), message)]
        return []
    if not all_declared:
        return []
    if len(set(declared)) > 1:
        message = (
            f"nodes declare different GPU counts {sorted(set(declared))}; "
            "tensor parallel = GPUs per node needs the same count on every node"
        )
        return [document.problem(("nodes",), message)]
    total = sum(declared)
    if isinstance(tp, int) and isinstance(pp, int) and tp * pp != total:
        message = (
            f"tensor_parallel x pipeline_parallel = {tp} x {pp} = {tp * pp}, but the nodes "
            f"declare {total} GPUs; make them equal or use 'auto'"
        )
        return [document.problem((*models[0][0], "tensor_parallel"), message)]
    return []


def _declared_gpus(node: dict) -> int | None:
    ids = node.get("gpu_ids")
    if isinstance(ids, list):
        return len(ids)
    gpus = node.get("gpus")
    return gpus if isinstance(gpus, int) else None


def _routed_problems(
    document: PositionedDocument,
    entries: list[tuple[int, dict]],
    models: list[tuple[KeyPath, dict]],
) -> list[Problem]:
    """Several models: unique served names, vLLM's own mode, and each model fits the nodes."""
    data = document.data
    problems: list[Problem] = []
    if data.get("executor") == "ray":
        message = (
            "several models (or one on demand) run in vLLM's multi-node mode, each on its own "
            "GPUs; remove executor: ray or set executor: mp"
        )
        problems.append(document.problem(("executor",), message))
    seen: dict[str, KeyPath] = {}
    for path, model in models:
        served = model.get("served_name") or model.get("name")
        if isinstance(served, str) and served in seen:
            message = f"served name {served!r} is also {format_key_path(seen[served])}'s"
            problems.append(document.problem((*path, "served_name"), message))
        elif isinstance(served, str):
            seen[served] = path
    cpu = data.get("accelerator", "nvidia") == "cpu"
    per_node = [1 if cpu and g is None else g for _, n in entries for g in [_declared_gpus(n)]]
    for path, model in models:
        pp = model.get("pipeline_parallel", "auto")
        tp = model.get("tensor_parallel", "auto")
        if isinstance(pp, int) and pp > len(entries):
            message = (
                f"pipeline_parallel {pp} is more than the {len(entries)} nodes: it can never load"
            )
            problems.append(document.problem((*path, "pipeline_parallel"), message))
            continue
        if not isinstance(tp, int) or None in per_node or not entries:
            continue
        nodes = len(entries) if pp == "auto" else pp
        fitting = [g for g in per_node if g is not None and g >= tp]
        if len(fitting) < nodes:
            message = (
                f"needs {nodes} node(s) with {tp} GPU(s) each; the nodes give "
                f"{sorted(g for g in per_node if g is not None)}: it can never load"
            )
            problems.append(document.problem((*path, "tensor_parallel"), message))
    return problems


def _port_problems(document: PositionedDocument) -> list[Problem]:
    ports = document.data.get("ports")
    if not isinstance(ports, dict):
        ports = {}
    by_value: dict[int, str] = {}
    problems: list[Problem] = []
    for key, value in ports.items():
        if isinstance(value, int) and value in by_value:
            message = f"port {value} is also ports.{by_value[value]}; each port must differ"
            problems.append(document.problem(("ports", key), message))
        elif isinstance(value, int):
            by_value[value] = key
    models = _model_entries(document.data)
    count = len(models)
    base = ports.get("models", Ports().models)
    if isinstance(base, int) and _is_routed(document.data, models):
        if base + 2 * count - 1 > 65535:
            problems.append(document.problem(("ports", "models"), "the model ports pass 65535"))
        taken = {v: k for k, v in Ports().model_dump().items()} | {
            v: k for v, k in by_value.items()
        }
        for value, key in taken.items():
            if key != "models" and base <= value < base + 2 * count:
                message = (
                    f"ports.models uses {base}-{base + 2 * count - 1}, which holds ports.{key}"
                )
                problems.append(document.problem(("ports", "models"), message))
    return problems


def _model_path_problems(document: PositionedDocument) -> list[Problem]:
    cache = document.data.get("model_cache")
    if not isinstance(cache, str) or not cache.startswith("/"):
        return []
    problems = []
    for path, model in _model_entries(document.data):
        name = model.get("name")
        if not isinstance(name, str) or not name.startswith("/"):
            continue
        if ".." in PurePosixPath(name).parts:
            continue  # Model refuses it; is_relative_to would not (it does not resolve `..`)
        if not PurePosixPath(name).is_relative_to(cache):
            message = (
                f"a local model path must be inside model_cache ({cache}), which is what the "
                "containers mount; move the model there or use a Hugging Face id"
            )
            problems.append(document.problem((*path, "name"), message))
    return problems
