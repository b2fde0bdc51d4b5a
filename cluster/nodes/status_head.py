"""Ray's view for `status`, in one SSH exec on the head, run while the nodes are asked.

The script checks the head container (running, with Ray) with `docker inspect` and only then
runs the Ray query in it with `docker exec`, so it needs nothing `status` learns elsewhere and
never waits on a Ray that is not there.
"""

from __future__ import annotations

from cluster.decide.plan import LABEL_RAY
from cluster.facts.ray import RayQueryError, alive_by_address, parse_ray_nodes, ray_nodes_argv
from cluster.nodes.transport.ssh import SshConnection

_SCRIPT = r"""
name=$1 label=$2 docker_host=$3
shift 3
[ -n "$docker_host" ] && export DOCKER_HOST="$docker_host"
state=$(docker inspect --type container --format "{{.State.Status}} {{index .Config.Labels \"$label\"}}" "$name" 2>/dev/null) || {
  echo "@@vcluster-ray absent@@"; exit 0; }
case $state in
  "running no") echo "@@vcluster-ray no-ray@@" ;;
  running*) exec docker exec "$name" "$@" ;;
  *) echo "@@vcluster-ray not-running@@" ;;
esac
"""

HEAD_NOT_RUNNING = "head container not running"
RAY_NOT_ANSWERING = "Ray head not answering"

RayView = tuple[set[str], dict[str, float], str | None]


def ray_view_argv(
    container: str, head_address: str, ray_port: int, docker_host: str | None = None
) -> list[str]:
    return [
        "sh",
        "-c",
        _SCRIPT,
        "vcluster-ray",
        container,
        LABEL_RAY,
        docker_host or "",
        *ray_nodes_argv(head_address, ray_port),
    ]


def parse_ray_view(output: str) -> RayView:
    """Alive addresses, summed resources and an error, as `status` shows them."""
    if "@@vcluster-ray absent@@" in output or "@@vcluster-ray not-running@@" in output:
        return set(), {}, HEAD_NOT_RUNNING
    if "@@vcluster-ray no-ray@@" in output:
        return set(), {}, None
    try:
        alive = alive_by_address(parse_ray_nodes(output))
    except RayQueryError:
        return set(), {}, RAY_NOT_ANSWERING
    resources = {
        "CPU": sum(n.cpus for n in alive.values()),
        "GPU": sum(n.gpus for n in alive.values()),
    }
    return set(alive), resources, None


def head_ray_view(
    ssh: SshConnection,
    container: str,
    head_address: str,
    ray_port: int,
    docker_host: str | None = None,
) -> RayView:
    result = ssh.run(ray_view_argv(container, head_address, ray_port, docker_host))
    return parse_ray_view(result.stdout + "\n" + result.stderr)
