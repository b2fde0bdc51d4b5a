"""The host probe: one POSIX sh script that gathers every fact of a host in one remote exec.

The script prints one section per fact, each opened by a marker line:

    @@vcluster NAME rc=N@@          the command ran and exited N; its stdout follows
    @@vcluster NAME stderr@@        what it wrote on stderr, when it wrote anything
    @@vcluster NAME missing TOOL@@  TOOL is not installed; nothing follows

and ends with `@@vcluster end@@`, so a cut-off output is told from a complete one. A missing
or failing tool only marks its own section: the script itself always exits 0. The head
address, the model cache path and the per-command time limit reach it as positional
arguments (`probe_argv`), never pasted into the text; the transport quotes argv.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from typing import Literal

from cluster.facts.fabric import INFINIBAND_SCRIPT, multicast_program
from cluster.facts.gpu import COMPUTE_APPS_FIELDS, GPU_QUERY_FIELDS

DEFAULT_COMMAND_TIMEOUT_S = 20
"""How long one slow command (nvidia-smi, docker) may run: a lost GPU can hang nvidia-smi."""

_SCRIPT = r"""
head=$1 cache=$2 limit=${3:-20}
export LC_ALL=C
case $head in *[!0-9.:]*)  # a name: route to the address it resolves to here
  address=$(getent ahosts "$head" 2>/dev/null | sed -n '1s/ .*//p')
  [ -n "$address" ] && head=$address ;;
esac
err=$(mktemp 2>/dev/null) || err=/tmp/vcluster-probe.$$
trap 'rm -f "$err"' EXIT
section() {
  name=$1
  shift
  if ! command -v "$1" >/dev/null 2>&1; then
    echo "@@vcluster $name missing $1@@"
    rc=missing
    return
  fi
  case $1 in
    nvidia-smi|docker|python3) command -v timeout >/dev/null 2>&1 && set -- timeout "$limit" "$@" ;;
  esac
  out=$("$@" 2>"$err")
  rc=$?
  echo "@@vcluster $name rc=$rc@@"
  [ -n "$out" ] && printf '%s\n' "$out"
  [ -s "$err" ] && echo "@@vcluster $name stderr@@" && cat "$err"
}
section clock date +%s.%N
section hostname uname -n
section cpus nproc
section memory grep -E '^(MemTotal|MemAvailable):' /proc/meminfo
section gpu-query nvidia-smi --query-gpu=@GPU_FIELDS@ --format=csv,noheader,nounits
if [ "$rc" != 124 ]; then  # a hanging nvidia-smi would hang again: spare the time limit
  section gpu-apps nvidia-smi --query-compute-apps=@APPS_FIELDS@ --format=csv,noheader,nounits
  section gpu-topology nvidia-smi topo -m
  section gpu-fabric nvidia-smi -q -x
  [ -n "${4:-}" ] && section multicast python3 -c "$4" "${5:-try}"
fi
section driver cat /proc/driver/nvidia/version
section docker-version docker version --format '{{.Server.Version}}'
[ "$rc" != 124 ] && section docker-runtimes docker info --format '{{json .Runtimes}}'
section nvidia-toolkit sh -c 'for t in nvidia-container-runtime-hook nvidia-ctk; do command -v "$t"; done; true'
section shm df -Pk /dev/shm
section cache-disk sh -c 'd=$1; while [ ! -e "$d" ]; do d=$(dirname "$d"); done; df -Pk "$d"' \
  sh "$cache"
section route ip -o route get "$head"
section addresses ip -o addr show
section listening cat /proc/net/tcp /proc/net/tcp6
section infiniband sh -c @INFINIBAND@
section rdma-modules grep -E '^(nvidia_peermem|nv_peer_mem|ib_core|ib_uverbs|rdma_ucm|mlx5_ib|rdma_rxe) ' \
  /proc/modules
echo "@@vcluster end@@"
"""

PROBE_SCRIPT = (
    _SCRIPT.replace("@GPU_FIELDS@", ",".join(GPU_QUERY_FIELDS))
    .replace("@APPS_FIELDS@", ",".join(COMPUTE_APPS_FIELDS))
    .replace("@INFINIBAND@", shlex.quote(INFINIBAND_SCRIPT))
)
"""The probe, run as `sh -c PROBE_SCRIPT vcluster-probe HEAD CACHE TIMEOUT MULTICAST MODE`."""


def probe_argv(
    *,
    head_address: str,
    model_cache: str,
    command_timeout_s: int = DEFAULT_COMMAND_TIMEOUT_S,
    multicast: Literal["try", "read"] = "try",
) -> list[str]:
    """The one command that gathers a host's facts: run it over SSH, parse with `parse_probe`.

    `multicast`: `try` creates and binds a small NVLink multicast object where the driver says
    it can (`cluster.facts.fabric`); `read` only reads the driver's attribute.
    """
    return [
        "sh",
        "-c",
        PROBE_SCRIPT,
        "vcluster-probe",
        head_address,
        model_cache,
        str(command_timeout_s),
        multicast_program(),
        multicast,
    ]


TIMED_OUT_EXIT_CODE = 124
"""What `timeout` exits with when it had to stop the command."""

_MARKER = re.compile(r"^@@vcluster (?P<name>[a-z-]+)(?: (?P<what>rc=\d+|stderr|missing \S+))?@@$")


@dataclass(frozen=True)
class Section:
    """What one command of the probe printed: exit code, stdout and stderr, or that it is missing.

    `missing` names the tool that is not installed (then `exit_code` is None).
    """

    exit_code: int | None
    stdout: str = ""
    stderr: str = ""
    missing: str | None = None

    @property
    def ok(self) -> bool:
        """The command ran and exited 0."""
        return self.exit_code == 0

    @property
    def timed_out(self) -> bool:
        """The command ran past the probe's time limit and was stopped."""
        return self.exit_code == TIMED_OUT_EXIT_CODE

    def message(self) -> str:
        """Why it did not work, on one line: the tool missing, or the last line it printed."""
        if self.missing:
            return f"{self.missing} is not installed"
        if self.timed_out:
            return "timed out"
        lines = [line.strip() for line in (self.stderr + "\n" + self.stdout).splitlines()]
        last = next((line for line in reversed(lines) if line), "no output")
        return f"exit {self.exit_code}: {last}"


@dataclass(frozen=True)
class ProbeOutput:
    """The probe's output split into sections; `complete` is False when it was cut off."""

    sections: dict[str, Section]
    complete: bool

    def get(self, name: str) -> Section | None:
        """The section of that name, or None when the output does not have it."""
        return self.sections.get(name)


def split_sections(output: str) -> ProbeOutput:
    """Split the probe's output at its markers; text before the first marker is ignored."""
    parts: dict[str, dict[str, list[str]]] = {}
    codes: dict[str, int | None] = {}
    missing: dict[str, str] = {}
    current: list[str] | None = None
    complete = False
    for line in output.splitlines():
        match = _MARKER.match(line)
        if match is None:
            if current is not None:
                current.append(line)
            continue
        name, what = match["name"], match["what"] or ""
        if name == "end" and not what:
            complete = True
            current = None
        elif what.startswith("rc="):
            codes[name] = int(what.removeprefix("rc="))
            current = parts.setdefault(name, {}).setdefault("stdout", [])
        elif what == "stderr":
            current = parts.setdefault(name, {}).setdefault("stderr", [])
        elif what.startswith("missing "):
            codes[name] = None
            missing[name] = what.removeprefix("missing ")
            current = None
    sections = {
        name: Section(
            exit_code=code,
            stdout="\n".join(parts.get(name, {}).get("stdout", [])),
            stderr="\n".join(parts.get(name, {}).get("stderr", [])),
            missing=missing.get(name),
        )
        for name, code in codes.items()
    }
    return ProbeOutput(sections=sections, complete=complete)
