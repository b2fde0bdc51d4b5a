"""Real OpenSSH servers for the integration tests: one lab per test session, shared read-only.

A test that changes a host (its host key, its sshd) puts it back before it ends, so the order
the tests run in never matters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cluster.nodes.transport.ssh import SshTarget
from tests.support.ssh_lab import LabHost, SshLab, cleanup_stale

LAB_HOSTS = 4
HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test in this folder needs the lab's network namespaces: mark it `integration`."""
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def ssh_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshLab]:
    """node01..node04, `jump`, and `behind` (reachable only through `jump`)."""
    cleanup_stale()
    lab = SshLab(tmp_path_factory.mktemp("ssh-lab"), LAB_HOSTS, with_jump=True)
    try:
        yield lab
    finally:
        lab.close()


def lab_target(
    lab: SshLab,
    host: LabHost | str,
    *,
    key_file: Path | None = None,
    known_hosts: Path | None = None,
    trust_on_first_use: bool = False,
) -> SshTarget:
    """How vcluster would reach a lab host: the lab's client key, its known_hosts, strict.

    A host behind a jump gets the jump host's target as its `jump`, built the same way.
    """
    host = lab.host(host) if isinstance(host, str) else host
    return SshTarget(
        name=host.name,
        host=host.address,
        port=host.port,
        user="root",
        key_file=key_file or lab.client_key,
        known_hosts=known_hosts or lab.known_hosts,
        trust_on_first_use=trust_on_first_use,
        jump=lab_target(lab, host.jump) if host.jump is not None else None,
    )


@pytest.fixture
def target_for(ssh_lab: SshLab) -> Callable[..., SshTarget]:
    """`target_for("node01", known_hosts=...)`: an `SshTarget` for a host of the session's lab."""

    def build(host: LabHost | str, **overrides: object) -> SshTarget:
        return lab_target(ssh_lab, host, **overrides)  # type: ignore[arg-type]

    return build
