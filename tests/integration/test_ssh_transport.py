"""The SSH transport against real OpenSSH servers: what a command sees, what every failure says."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import replace

import pytest

from cluster.nodes.transport.fanout import FanOutError, fan_out
from cluster.nodes.transport.ssh import (
    NO_EXIT_STATUS,
    AuthenticationFailed,
    CommandFailed,
    CommandResult,
    CommandTimeout,
    HostKeyChanged,
    HostKeyUnknown,
    HostUnreachable,
    SshConnection,
    SshError,
    SshTarget,
    SshTimeouts,
    connect,
)
from tests.support.ssh_lab import SshLab

TIMEOUTS = SshTimeouts(connect=5, command=30)
SHORT_CONNECT = SshTimeouts(connect=1, command=30)
MARGIN_S = 2.0
"""Slack on top of a timeout for thread start-up and a loaded machine."""


@pytest.fixture
def node01(target_for) -> Iterator[SshConnection]:
    with connect(target_for("node01"), TIMEOUTS) as connection:
        yield connection


def assert_one_line_for_people(error: SshError, *expected: str) -> None:
    """The error renders as one line, without a traceback, naming everything expected."""
    line = error.one_line()
    assert "\n" not in line
    assert "Traceback" not in line
    for text in expected:
        assert text in line, f"{text!r} missing from {line!r}"


def ghost(lab: SshLab) -> SshTarget:
    """A host on the lab's network that nothing answers for."""
    return SshTarget(
        name="ghost",
        host=lab.unused_address(),
        key_file=lab.client_key,
        known_hosts=lab.known_hosts,
    )


def public_key_of(lab: SshLab, host: str) -> str:
    """`TYPE BASE64` of the host's current host key."""
    path = lab.host(host).host_key_path
    kind, blob = path.with_name(path.name + ".pub").read_text().split()[:2]
    return f"{kind} {blob}"


# -- commands ------------------------------------------------------------------------------------


def test_a_command_returns_its_stdout_stderr_and_exit_code(node01):
    result = node01.run(["sh", "-c", "echo out; echo err >&2; exit 3"])

    assert result == CommandResult(
        argv=("sh", "-c", "echo out; echo err >&2; exit 3"),
        exit_code=3,
        stdout="out\n",
        stderr="err\n",
        duration_s=result.duration_s,
    )
    assert not result.ok
    assert 0 < result.duration_s < 5


def test_the_command_runs_on_the_host_it_was_sent_to(target_for):
    for name in ("node01", "node04", "jump"):
        with connect(target_for(name), TIMEOUTS) as connection:
            assert connection.run(["hostname"], check=True).stdout == f"{name}\n"


def test_a_failing_command_with_check_names_the_host_the_command_and_its_error(node01):
    with pytest.raises(CommandFailed) as failed:
        node01.run(["ls", "/no/such/dir"], check=True, fix="create the directory")

    assert failed.value.result.exit_code == 2
    assert_one_line_for_people(
        failed.value,
        "node01",
        "`ls /no/such/dir` exited 2",
        "No such file or directory",
        "(fix: create the directory)",
    )


def test_without_check_a_failing_command_is_a_result_not_an_error(node01):
    assert node01.run(["false"]).exit_code == 1


def test_an_argument_arrives_verbatim_and_is_not_run_by_a_shell(node01):
    result = node01.run(["printf", "%s", "a b; echo pwned"], check=True)

    assert result.stdout == "a b; echo pwned"


def test_every_argument_keeps_its_bytes_and_its_boundaries(node01, tmp_path):
    witness = tmp_path / "pwned"  # the lab's hosts share this machine's file system
    arguments = [
        "one two",
        "",
        f"$(touch {witness})",
        f"`touch {witness}`",
        f"; touch {witness}",
        f"&& touch {witness} || touch {witness}",
        'it\'s "quoted"',
        "$HOME",
        "*",
        "line one\nline two",
        "back\\slash",
        "--",
        "tab\there",
        "naïve ✓",
    ]

    result = node01.run(["printf", "%s\\0", *arguments], check=True)

    assert result.stdout.split("\0")[:-1] == arguments
    assert not witness.exists()


def test_stdin_bytes_are_streamed_to_the_command(node01):
    payload = os.urandom(5 * 1024 * 1024)

    result = node01.run(["sha256sum"], stdin=payload, check=True)

    assert result.stdout.split()[0] == hashlib.sha256(payload).hexdigest()


def test_stdin_from_a_file_object_is_streamed_to_the_command(node01):
    payload = os.urandom(5 * 1024 * 1024 + 7)

    result = node01.run(["wc", "-c"], stdin=io.BytesIO(payload), check=True)

    assert result.stdout.strip() == str(len(payload))


def test_without_stdin_the_command_reads_end_of_file_at_once(node01):
    result = node01.run(["cat"], timeout=5, check=True)

    assert result.stdout == ""


def test_a_command_that_exits_without_reading_its_stdin_still_gives_its_result(node01):
    result = node01.run(["sh", "-c", "exit 4"], stdin=os.urandom(5 * 1024 * 1024), timeout=10)

    assert result.exit_code == 4


class FailingDisk(io.RawIOBase):
    """An input file whose disk fails after the first read."""

    def __init__(self) -> None:
        self.reads = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        self.reads += 1
        if self.reads > 1:
            raise OSError(errno.EIO, "Input/output error")
        return b"partial input"


def test_an_input_that_cannot_be_read_stops_the_command_and_says_so(node01):
    started = time.monotonic()
    with pytest.raises(SshError) as unreadable:
        node01.run(["cat"], stdin=FailingDisk(), timeout=20)

    assert type(unreadable.value) is SshError  # neither a timeout nor a lost connection
    assert time.monotonic() - started < 5
    assert_one_line_for_people(
        unreadable.value, "node01", "reading the input for `cat` failed", "Input/output error"
    )


def test_one_connection_carries_many_commands(ssh_lab, node01, target_for):
    seen = {node01.run(["printenv", "SSH_CONNECTION"], check=True).stdout for _ in range(20)}

    assert len(seen) == 1, f"the remote saw {len(seen)} connections"
    source_address, source_port = seen.pop().split()[:2]
    assert source_address == ssh_lab.gateway
    with connect(target_for("node01"), TIMEOUTS) as another:
        other = another.run(["printenv", "SSH_CONNECTION"], check=True).stdout
    assert other.split()[1] != source_port


def test_small_packets_leave_at_once_instead_of_waiting_for_a_delayed_ack(node01):
    # With Nagle's algorithm on (paramiko's default) every command took ~40 ms, not a round trip.
    assert node01.transport.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_openssh_and_vcluster_agree_on_aes_gcm_the_cheapest_cipher_to_stream_with(node01):
    # Streaming an image to many nodes at once is bound by the controller's CPU per byte.
    assert node01.transport.local_cipher == "aes128-gcm@openssh.com"
    assert node01.transport.remote_cipher == "aes128-gcm@openssh.com"


def test_a_command_that_hangs_times_out_and_the_connection_stays_usable(node01):
    started = time.monotonic()
    with pytest.raises(CommandTimeout) as timed_out:
        node01.run(["sleep", "30"], timeout=1)

    assert time.monotonic() - started < 1 + MARGIN_S
    assert_one_line_for_people(timed_out.value, "node01", "`sleep 30`", "within 1s", "fix:")
    assert node01.run(["echo", "still here"], check=True).stdout == "still here\n"


def test_a_command_that_ignores_its_stdin_times_out_too(node01):
    started = time.monotonic()
    with pytest.raises(CommandTimeout):
        node01.run(["sleep", "30"], stdin=os.urandom(8 * 1024 * 1024), timeout=1)

    assert time.monotonic() - started < 1 + MARGIN_S


def test_a_command_killed_by_a_signal_fails_without_an_exit_status(node01):
    assert node01.run(["sh", "-c", 'kill -9 "$$"']).exit_code == NO_EXIT_STATUS

    with pytest.raises(CommandFailed) as failed:
        node01.run(["sh", "-c", 'kill -9 "$$"'], check=True)

    assert_one_line_for_people(failed.value, "node01", "killed by a signal")
    assert node01.run(["true"], check=True).ok


def test_a_connection_lost_mid_command_is_reported_at_once(node01):
    """The command kills the sshd serving it: the TCP connection drops under the command."""
    started = time.monotonic()
    with pytest.raises(HostUnreachable) as lost:
        node01.run(["sh", "-c", 'kill -9 "$PPID"; sleep 30'], timeout=20)

    assert time.monotonic() - started < 5
    assert_one_line_for_people(lost.value, "node01", "connection was lost", "sleep 30")


# -- host keys -----------------------------------------------------------------------------------


def test_an_unknown_host_key_is_refused_with_the_host_and_the_fix(target_for, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")

    with pytest.raises(HostKeyUnknown) as refused:
        connect(target_for("node02", known_hosts=empty), TIMEOUTS)

    host = target_for("node02").host
    assert_one_line_for_people(
        refused.value, "node02", str(empty), f"ssh-keyscan -p 22 {host} >> {empty}"
    )
    assert empty.read_text() == ""


def test_a_missing_known_hosts_file_refuses_every_key(target_for, tmp_path):
    missing = tmp_path / "no" / "known_hosts"

    with pytest.raises(HostKeyUnknown):
        connect(target_for("node02", known_hosts=missing), TIMEOUTS)

    assert not missing.exists()


def test_trust_on_first_use_records_the_key_and_later_connections_check_it(
    ssh_lab, target_for, tmp_path
):
    known_hosts = tmp_path / "ssh" / "known_hosts"
    first = target_for("node02", known_hosts=known_hosts, trust_on_first_use=True)

    with connect(first, TIMEOUTS) as connection:
        assert connection.run(["hostname"], check=True).stdout == "node02\n"

    assert known_hosts.read_text() == f"{first.host} {public_key_of(ssh_lab, 'node02')}\n"
    strict = target_for("node02", known_hosts=known_hosts)
    with connect(strict, TIMEOUTS) as connection:
        assert connection.run(["hostname"], check=True).stdout == "node02\n"
    assert known_hosts.read_text().count("\n") == 1


def test_trust_on_first_use_reaches_hosts_behind_a_jump_host(ssh_lab, target_for, tmp_path):
    known_hosts = tmp_path / "known_hosts"
    behind = target_for("behind", known_hosts=known_hosts, trust_on_first_use=True)

    with connect(behind, TIMEOUTS) as connection:
        assert connection.run(["hostname"], check=True).stdout == "behind\n"

    assert known_hosts.read_text() == f"{behind.host} {public_key_of(ssh_lab, 'behind')}\n"


@pytest.fixture
def node04_with_a_new_host_key(ssh_lab) -> Iterator[str]:
    """node04 reinstalled: a new host key, so every known_hosts entry for it is now wrong."""
    ssh_lab.regenerate_host_key("node04")
    try:
        yield "node04"
    finally:
        ssh_lab.rewrite_known_hosts()


@pytest.mark.parametrize("trust_on_first_use", [False, True])
def test_a_changed_host_key_is_refused_even_with_trust_on_first_use(
    ssh_lab, target_for, tmp_path, node04_with_a_new_host_key, trust_on_first_use
):
    known_hosts = tmp_path / "known_hosts"
    shutil.copy(ssh_lab.known_hosts, known_hosts)  # still holds node04's old key
    before = known_hosts.read_bytes()
    target = target_for(
        node04_with_a_new_host_key, known_hosts=known_hosts, trust_on_first_use=trust_on_first_use
    )

    with pytest.raises(HostKeyChanged) as refused:
        connect(target, TIMEOUTS)

    assert known_hosts.read_bytes() == before
    assert_one_line_for_people(
        refused.value, "node04", "HOST KEY CHANGED", f"ssh-keygen -f {known_hosts} -R"
    )


# -- authentication and reachability -------------------------------------------------------------


def test_a_key_the_host_does_not_trust_fails_authentication(ssh_lab, target_for):
    wrong_key = ssh_lab.wrong_client_key()

    with pytest.raises(AuthenticationFailed) as refused:
        connect(target_for("node01", key_file=wrong_key), TIMEOUTS)

    assert_one_line_for_people(refused.value, "node01", "root", str(wrong_key), "authorized_keys")


def test_an_address_nobody_answers_is_unreachable_within_the_connect_timeout(ssh_lab):
    started = time.monotonic()
    with pytest.raises(HostUnreachable) as unreachable:
        connect(ghost(ssh_lab), SHORT_CONNECT)

    assert time.monotonic() - started < SHORT_CONNECT.connect + MARGIN_S
    assert_one_line_for_people(unreachable.value, "ghost", ssh_lab.unused_address(), "port 22")


@pytest.fixture
def node03_without_sshd(ssh_lab) -> Iterator[str]:
    """node03 is up, but nothing listens on its SSH port."""
    ssh_lab.stop_sshd("node03")
    try:
        yield "node03"
    finally:
        ssh_lab.start_sshd("node03")


def test_a_host_without_sshd_reports_connection_refused(target_for, node03_without_sshd):
    started = time.monotonic()
    with pytest.raises(HostUnreachable) as refused:
        connect(target_for(node03_without_sshd), TIMEOUTS)

    assert time.monotonic() - started < TIMEOUTS.connect  # refused at once, not timed out
    assert_one_line_for_people(
        refused.value, "node03", "connection refused on port 22", "start sshd"
    )


# -- jump hosts ----------------------------------------------------------------------------------


def test_a_host_behind_a_jump_host_is_reached_through_it(ssh_lab, target_for):
    behind = target_for("behind")
    assert behind.jump is not None and behind.jump.name == "jump"

    with connect(behind, TIMEOUTS) as connection:
        assert connection.run(["hostname"], check=True).stdout == "behind\n"
        source_address = connection.run(["printenv", "SSH_CONNECTION"]).stdout.split()[0]

    assert ssh_lab.behind_subnet is not None
    assert source_address == str(ssh_lab.behind_subnet.network_address + 1)  # the jump host


def test_without_its_jump_host_the_host_behind_is_unreachable(target_for):
    direct = replace(target_for("behind"), jump=None)

    # Unreachable, or (where a proxy answers for unknown networks) not an sshd: never `behind`.
    with pytest.raises(SshError) as unreachable:
        connect(direct, SHORT_CONNECT)

    assert_one_line_for_people(unreachable.value, "behind", direct.host)


def test_a_jump_host_that_cannot_reach_the_target_says_so(ssh_lab, target_for):
    lost = replace(target_for("behind"), name="lost", host="10.255.255.1")

    with pytest.raises(HostUnreachable) as unreachable:
        connect(lost, SHORT_CONNECT)

    assert_one_line_for_people(unreachable.value, "lost", "jump host", "10.255.255.1:22")


# -- many hosts at once --------------------------------------------------------------------------


def test_fan_out_reports_every_hosts_outcome_and_failures_do_not_stop_the_others(
    ssh_lab, target_for
):
    jobs = [(target_for(host), ["hostname"]) for host in ssh_lab.hosts]
    jobs.append((ghost(ssh_lab), ["hostname"]))
    jobs.append((replace(target_for("node02"), name="broken"), ["ls", "/no/such/dir"]))

    def run_job(job: tuple[SshTarget, list[str]]) -> str:
        target, argv = job
        with connect(target, SHORT_CONNECT) as connection:
            return connection.run(argv, check=True).stdout.strip()

    outcome = fan_out(jobs, run_job, name=lambda job: job[0].name)

    assert [o.host for o in outcome] == [host.name for host in ssh_lab.hosts] + ["ghost", "broken"]
    assert outcome.succeeded == {host.name: host.name for host in ssh_lab.hosts}
    assert isinstance(outcome.failed["ghost"], HostUnreachable)
    assert isinstance(outcome.failed["broken"], CommandFailed)
    with pytest.raises(FanOutError) as failed:
        outcome.values()
    lines = failed.value.lines()
    assert len(lines) == 2
    assert lines[0].startswith("ghost (root@")
    assert lines[1].startswith("broken (root@") and "`ls /no/such/dir` exited 2" in lines[1]
    for line in lines:
        assert "\n" not in line and "Traceback" not in line
