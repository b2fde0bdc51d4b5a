"""Connect a remote command's channel to this terminal: streamed output, or a full PTY session."""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import sys
import termios
import tty
from collections.abc import Iterator
from typing import BinaryIO

import paramiko

_CHUNK = 1 << 15


def stream(channel: paramiko.Channel, out: BinaryIO, err: BinaryIO) -> int:
    """Copy the channel's stdout and stderr as they come; return the remote exit code."""
    channel.shutdown_write()
    while True:
        readable, _, _ = select.select([channel], [], [], 0.5)
        if readable or channel.recv_ready() or channel.recv_stderr_ready():
            _copy_ready(channel, out, err)
        if (
            channel.exit_status_ready()
            and not channel.recv_ready()
            and not channel.recv_stderr_ready()
        ):
            _copy_ready(channel, out, err)
            return channel.recv_exit_status()


def _copy_ready(channel: paramiko.Channel, out: BinaryIO, err: BinaryIO) -> None:
    while channel.recv_ready():
        out.write(channel.recv(_CHUNK))
    while channel.recv_stderr_ready():
        err.write(channel.recv_stderr(_CHUNK))
    out.flush()
    err.flush()


def terminal_size() -> tuple[int, int]:
    size = shutil.get_terminal_size((80, 24))
    return size.columns, size.lines


def interact(channel: paramiko.Channel) -> int:
    """Run an interactive PTY session: keys (Ctrl-C included) go to the remote side, window
    size changes follow; return the remote exit code."""
    stdin_fd = sys.stdin.fileno()
    stdout = sys.stdout.buffer
    with _raw_terminal(stdin_fd), _forward_resizes(channel):
        while True:
            readable, _, _ = select.select([channel, stdin_fd], [], [])
            if channel in readable:
                data = channel.recv(_CHUNK)
                if not data:
                    break
                stdout.write(data)
                stdout.flush()
            if stdin_fd in readable:
                data = os.read(stdin_fd, _CHUNK)
                if not data:
                    channel.shutdown_write()
                else:
                    channel.sendall(data)
    return channel.recv_exit_status()


@contextlib.contextmanager
def _raw_terminal(fd: int) -> Iterator[None]:
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd, termios.TCSADRAIN)  # keep what was typed ahead (TCSAFLUSH drops it)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@contextlib.contextmanager
def _forward_resizes(channel: paramiko.Channel) -> Iterator[None]:
    def resize(*_: object) -> None:
        width, height = terminal_size()
        channel.resize_pty(width=width, height=height)

    previous = signal.signal(signal.SIGWINCH, resize)
    try:
        yield
    finally:
        signal.signal(signal.SIGWINCH, previous)
