#!/bin/bash
# Sandbox node entrypoint (under tini): start dockerd and sshd and stay in the foreground. dockerd
# is started again whenever it exits, as systemd's docker.service (Restart=always) does on a
# server; when sshd exits, or the node is stopped, everything stops.
set -euo pipefail

DOCKERD_START_TIMEOUT_S="${DOCKERD_START_TIMEOUT_S:-60}"

# vcluster mounts this node's host key (made on the controller, so its known_hosts is exact);
# a node started by hand makes its own.
if [ ! -s /etc/ssh/ssh_host_ed25519_key ]; then ssh-keygen -q -t ed25519 -N '' -f /etc/ssh/ssh_host_ed25519_key; fi
mkdir -p /run/sshd /root/.ssh
chmod 700 /root/.ssh
if [ -n "${VCLUSTER_AUTHORIZED_KEYS:-}" ]; then
  printf '%s\n' "${VCLUSTER_AUTHORIZED_KEYS}" > /root/.ssh/authorized_keys
  chmod 600 /root/.ssh/authorized_keys
fi

keep_dockerd() {
  trap 'kill -TERM "$daemon" 2>/dev/null; wait "$daemon"; exit 0' TERM
  while true; do
    dockerd --host unix:///var/run/docker.sock >>/var/log/dockerd.log 2>&1 &
    daemon=$!
    wait "$daemon" || true
    echo "vcluster-node: dockerd exited; starting it again" >&2
    sleep 1
  done
}
keep_dockerd &
dockerd_pid=$!
/usr/sbin/sshd -D -e 2>>/var/log/sshd.log &
sshd_pid=$!

stop() { kill -TERM "$sshd_pid" "$dockerd_pid" 2>/dev/null || true; }
trap 'stop; wait; exit 0' TERM INT

deadline=$((SECONDS + DOCKERD_START_TIMEOUT_S))
until docker info >/dev/null 2>&1; do
  if ! kill -0 "$dockerd_pid" 2>/dev/null || [ "$SECONDS" -ge "$deadline" ]; then
    echo "vcluster-node: dockerd did not come up; /var/log/dockerd.log:" >&2
    tail -n 20 /var/log/dockerd.log >&2
    stop
    exit 1
  fi
  sleep 0.5
done
echo "vcluster-node: dockerd and sshd are running"

status=0
wait -n "$dockerd_pid" "$sshd_pid" || status=$?
echo "vcluster-node: a daemon exited (status $status); stopping" >&2
stop
wait || true
exit "$status"
