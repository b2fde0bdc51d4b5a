"""What `status` needs of one node, in one SSH exec: its GPUs, its container, its supervisor.

The script prints probe-style sections (`cluster.facts.probe`): the nvidia-smi queries
`status` shows (not the whole host probe: no Docker version, routes, fabric), then
`docker inspect` of the vcluster container and, when that container runs and serves vLLM,
the supervisor's state file through `docker exec`. No Docker API connection is opened, so
a node costs one round trip and three short processes instead of a `docker system
dial-stdio` channel and four HTTP requests. Arguments reach the script as argv, never pasted.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass

from cluster.decide.plan import LABEL_EXECUTOR, SUPERVISOR_STATE_DIR
from cluster.errors import VclusterError
from cluster.facts.gpu import COMPUTE_APPS_FIELDS, GPU_QUERY_FIELDS
from cluster.facts.host import HostFacts, parse_probe
from cluster.facts.probe import DEFAULT_COMMAND_TIMEOUT_S, split_sections
from cluster.nodes.containers import ContainerState, state_from_attrs
from cluster.nodes.transport.ssh import SshConnection
from cluster.nodes.vllm import SupervisedVllm, parse_supervisor_state, supervisor_state_argv

_SCRIPT = r"""
name=$1 state=$2 label=$3 role=$4 default=$5 limit=${6:-20} docker_host=${7:-}
export LC_ALL=C
err=$(mktemp 2>/dev/null) || err=/tmp/vcluster-status.$$
trap 'rm -f "$err"' EXIT
[ -n "$docker_host" ] && export DOCKER_HOST="$docker_host"
section() {
  name_=$1
  shift
  tool=$1
  [ "$1" = timeout ] && tool=$3
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "@@vcluster $name_ missing $tool@@"
    rc=missing out=
    return
  fi
  out=$("$@" 2>"$err")
  rc=$?
  echo "@@vcluster $name_ rc=$rc@@"
  [ -n "$out" ] && printf '%s\n' "$out"
  [ -s "$err" ] && echo "@@vcluster $name_ stderr@@" && cat "$err"
}
t=
command -v timeout >/dev/null 2>&1 && t="timeout $limit"
section gpu-query $t nvidia-smi --query-gpu=@GPU_FIELDS@ --format=csv,noheader,nounits
if [ "$rc" != 124 ] && [ "$rc" != missing ]; then
  section gpu-apps $t nvidia-smi --query-compute-apps=@APPS_FIELDS@ --format=csv,noheader,nounits
  section gpu-topology $t nvidia-smi topo -m
fi
section driver cat /proc/driver/nvidia/version
section container $t docker inspect --type container --format '{{json .}}' "$name"
if [ "$rc" = 0 ]; then
  case $out in *'"Status":"running"'*) running=1 ;; *) running=0 ;; esac
  case $role in
    head) serves=1 ;;
    *) case $out in
         *"\"$label\":\"mp\""*) serves=1 ;;
         *"\"$label\":"*) serves=0 ;;
         *) [ "$default" = mp ] && serves=1 || serves=0 ;;
       esac ;;
  esac
  [ "$running" = 1 ] && [ "$serves" = 1 ] && section supervisor $t docker exec "$name" @STATE_ARGV@
fi
echo "@@vcluster end@@"
"""

SNAPSHOT_SCRIPT = (
    _SCRIPT.replace("@GPU_FIELDS@", ",".join(GPU_QUERY_FIELDS))
    .replace("@APPS_FIELDS@", ",".join(COMPUTE_APPS_FIELDS))
    .replace("@STATE_ARGV@", shlex.join(supervisor_state_argv(SUPERVISOR_STATE_DIR)))
)

_NO_CONTAINER = "No such container"


@dataclass(frozen=True)
class NodeSnapshot:
    """The node's container (None: there is none), its supervisor's report, its GPU facts."""

    state: ContainerState | None
    supervised: SupervisedVllm | None
    facts: HostFacts


def snapshot_argv(
    container: str,
    *,
    head: bool,
    default_executor: str,
    command_timeout_s: int = DEFAULT_COMMAND_TIMEOUT_S,
    docker_host: str | None = None,
) -> list[str]:
    """The one command run on a node; `docker_host` only where the engine is not the default."""
    role = "head" if head else "worker"
    return [
        "sh",
        "-c",
        SNAPSHOT_SCRIPT,
        "vcluster-status",
        container,
        SUPERVISOR_STATE_DIR,
        LABEL_EXECUTOR,
        role,
        default_executor,
        str(command_timeout_s),
        docker_host or "",
    ]


def parse_snapshot(output: str, container: str, where: str) -> NodeSnapshot:
    """The snapshot from the script's output; a Docker engine that does not answer is an error."""
    sections = split_sections(output)
    facts = parse_probe(output)
    inspected = sections.get("container")
    if inspected is None or inspected.missing:
        raise VclusterError(
            "Docker is not installed" if inspected else "the status script was cut off",
            where=where,
            fix="install Docker on the host" if inspected else "run the command again",
        )
    if not inspected.ok:
        text = (inspected.stderr or inspected.stdout).strip()
        if _NO_CONTAINER in text:
            return NodeSnapshot(None, None, facts)
        raise VclusterError(
            f"Docker did not answer ({text.splitlines()[-1][:200] if text else inspected.message()})",
            where=where,
            fix="check `docker info` on the host (the daemon may be restarting), "
            "then run the command again",
        )
    attrs = json.loads(inspected.stdout)
    state = state_from_attrs(container, attrs[0] if isinstance(attrs, list) else attrs)
    read = sections.get("supervisor")
    supervised = parse_supervisor_state(read.stdout) if read is not None and read.ok else None
    return NodeSnapshot(state, supervised, facts)


def node_snapshot(
    ssh: SshConnection,
    container: str,
    *,
    head: bool,
    default_executor: str,
    docker_host: str | None = None,
) -> NodeSnapshot:
    """One round trip: run the script on the node, parse what it printed."""
    argv = snapshot_argv(
        container, head=head, default_executor=default_executor, docker_host=docker_host
    )
    return parse_snapshot(ssh.run(argv).stdout, container, ssh.target.name)
