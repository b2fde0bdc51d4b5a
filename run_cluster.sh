#!/usr/bin/env bash
# A drop-in for vLLM's examples/online_serving/run_cluster.sh, with vcluster's conventions.
#
#   run_cluster.sh IMAGE HEAD_ADDRESS --head|--worker HF_HOME [additional docker args...]
#
# Same arguments and behaviour as vLLM's script: starts a container with host networking, the
# Hugging Face cache mounted at /root/.cache/huggingface and `ray start --block` in it, blocks,
# and removes the container when it exits. Differences, so that `vcluster status` sees the node:
# the container is named vcluster-$VCLUSTER_CLUSTER (default "manual") and carries vcluster's
# labels; --gpus all is left out when the host has no nvidia-smi (CPU images). Set
# VCLUSTER_CLUSTER to the inventory's cluster name and VCLUSTER_NODE to the node's name to match
# an inventory.
#
# Ray's token authentication: export RAY_AUTH_TOKEN (the same value on every node, e.g. the file
# `vcluster up` made: ~/.local/state/vcluster/clusters/CLUSTER/ray-token) and Ray requires it
# (RAY_AUTH_MODE=token); the value reaches the container from the environment, never from argv.
# Without it, Ray accepts anyone who can reach the head (a warning says so).
set -euo pipefail

usage() {
  echo "usage: $0 IMAGE HEAD_ADDRESS --head|--worker HF_HOME [additional docker args...]" >&2
  exit 2
}

[ $# -ge 4 ] || usage
image=$1
head_address=$2
node_type=$3
hf_home=$4
shift 4
additional_args=("$@")

case $node_type in
  --head) role=head ;;
  --worker) role=worker ;;
  *) echo "error: the third argument must be --head or --worker, got '$node_type'" >&2; usage ;;
esac

cluster=${VCLUSTER_CLUSTER:-manual}
node=${VCLUSTER_NODE:-$(hostname -s)}
ray_port=${VCLUSTER_RAY_PORT:-6379}
container=vcluster-$cluster

if [[ ! $cluster =~ ^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$ ]]; then
  echo "error: VCLUSTER_CLUSTER '$cluster' must be lowercase letters, digits and '-'" >&2
  exit 2
fi
if [ ! -d "$hf_home" ]; then
  echo "error: HF_HOME '$hf_home' is not a directory on this host; create it or fix the path" >&2
  exit 2
fi

# As upstream: when VLLM_HOST_IP is passed with -e, Ray must use the same address.
ray_ip_args=()
for ((i = 0; i < ${#additional_args[@]}; i++)); do
  arg=${additional_args[$i]}
  value=""
  if [ "$arg" = "-e" ] && [ $((i + 1)) -lt ${#additional_args[@]} ]; then
    value=${additional_args[$((i + 1))]}
  elif [[ $arg == -e* ]]; then
    value=${arg#-e}
  fi
  if [[ $value == VLLM_HOST_IP=* ]]; then
    ip=${value#VLLM_HOST_IP=}
    ray_ip_args=(-e "RAY_NODE_IP_ADDRESS=$ip" -e "RAY_OVERRIDE_NODE_IP_ADDRESS=$ip")
  fi
done

if [ $role = head ]; then
  ray_start=(ray start --block --head "--node-ip-address=$head_address" "--port=$ray_port")
else
  ray_start=(ray start --block "--address=$head_address:$ray_port")
fi

auth_args=()
if [ -n "${RAY_AUTH_TOKEN:-}" ]; then
  auth_args=(-e RAY_AUTH_MODE=token -e RAY_AUTH_TOKEN)
else
  echo "warning: RAY_AUTH_TOKEN is not set: Ray will run tasks for anyone who can reach $head_address:$ray_port (see docs/security.md)" >&2
fi

gpu_args=()
if command -v nvidia-smi >/dev/null 2>&1; then
  gpu_args=(--gpus all)
fi

cleanup() {
  docker stop "$container" >/dev/null 2>&1 || true
  docker rm "$container" >/dev/null 2>&1 || true
}
trap cleanup EXIT

docker run \
  --entrypoint "${ray_start[0]}" \
  --network host \
  --shm-size 10.24g \
  --name "$container" \
  --label "vcluster.cluster=$cluster" \
  --label "vcluster.node=$node" \
  --label "vcluster.role=$role" \
  --label "vcluster.started-by=run_cluster.sh" \
  "${gpu_args[@]}" \
  "${auth_args[@]}" \
  -v "$hf_home:/root/.cache/huggingface" \
  "${ray_ip_args[@]}" \
  "${additional_args[@]}" \
  "$image" "${ray_start[@]:1}"
