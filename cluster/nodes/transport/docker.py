"""The Docker SDK over an open SSH connection, with the inventory's credentials.

docker-py's own `ssh://` support opens a second SSH connection configured from `~/.ssh`; here
every HTTP connection of the SDK is instead a channel on the vcluster `SshConnection` running
`docker system dial-stdio` on the host (what the Docker CLI does for `ssh://` contexts), so the
inventory's key, port, jump host and strict host keys apply and the host needs only sshd and
Docker.
"""

from __future__ import annotations

from collections.abc import Sequence

import docker
import urllib3.connection
from docker.transport.basehttpadapter import BaseHTTPAdapter
from docker.transport.sshconn import SSHConnectionPool

from cluster.nodes.transport.ssh import SshConnection

DOCKER_API_VERSION = "1.41"
"""Docker 20.10's API, understood by every supported engine; fixed so that creating a client
costs no round trip."""
DEFAULT_TIMEOUT_S = 120.0
_MOUNT_PREFIX = "http+docker://ssh"


def dial_stdio_argv(docker_host: str | None = None) -> list[str]:
    """The remote command that bridges one HTTP connection to the host's Docker engine."""
    argv = ["docker"]
    if docker_host is not None:
        argv += ["--host", docker_host]
    return [*argv, "system", "dial-stdio"]


class _DialStdioConnection(urllib3.connection.HTTPConnection):
    def __init__(self, ssh: SshConnection, argv: Sequence[str], timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._ssh = ssh
        self._argv = list(argv)
        self._timeout_s = timeout

    def connect(self) -> None:
        channel = self._ssh.open_channel(self._argv)
        channel.settimeout(self._timeout_s)
        self.sock = channel


class _DialStdioPool(SSHConnectionPool):
    """docker-py's pool for SSH channels (it avoids urllib3 calling fileno()), fed our channels."""

    def __init__(self, ssh: SshConnection, argv: Sequence[str], timeout: float) -> None:
        super().__init__(ssh_client=None, timeout=timeout, maxsize=8, host=ssh.target.host)
        self._ssh = ssh
        self._argv = argv
        self._timeout_s = timeout

    def _new_conn(self) -> _DialStdioConnection:
        return _DialStdioConnection(self._ssh, self._argv, self._timeout_s)


class _DialStdioAdapter(BaseHTTPAdapter):
    def __init__(self, ssh: SshConnection, argv: Sequence[str], timeout: float) -> None:
        self._pool = _DialStdioPool(ssh, argv, timeout)
        super().__init__()

    def get_connection(self, url: str, proxies: object = None) -> _DialStdioPool:
        return self._pool

    def close(self) -> None:
        super().close()
        self._pool.close()


def docker_client(
    ssh: SshConnection,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    docker_host: str | None = None,
) -> docker.DockerClient:
    """A Docker SDK client whose every request travels over `ssh`; no extra SSH login."""
    client = docker.DockerClient(
        base_url="ssh://vcluster",  # only selects the SDK's SSH URL scheme; never dialled
        version=DOCKER_API_VERSION,
        timeout=int(timeout_s),
        use_ssh_client=True,  # keeps the SDK from opening its own paramiko connection
    )
    adapter = _DialStdioAdapter(ssh, dial_stdio_argv(docker_host), timeout_s)
    client.api.mount(_MOUNT_PREFIX, adapter)
    # The SDK reads this attribute for attach/exec sockets and closes it with the client.
    client.api._custom_adapter = adapter
    return client
