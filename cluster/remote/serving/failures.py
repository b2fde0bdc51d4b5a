"""Why vLLM failed, read from its log: the causes `up`, the router and `status` name."""

from __future__ import annotations

import re
from dataclasses import dataclass

_CAUSES = [
    (
        re.compile(
            r"out of memory|OutOfMemoryError|Insufficient space in /dev/shm|Cannot allocate memory",
            re.I,
        ),
        "out of memory (GPU, host or /dev/shm)",
        "lower --max-model-len or --gpu-memory-utilization, use more GPUs, or give the node more shared memory",
    ),
    (
        re.compile(
            r"Repository Not Found|is not a local folder and is not a valid model|does not appear to have a file named|"
            r"HFValidationError|No such file or directory: .*config\.json|Can't load the configuration",
            re.I,
        ),
        "the model was not found",
        "check model.name, that the model is in model_cache on every node, or set secrets.hf_token",
    ),
    (
        re.compile(
            r"unrecognized arguments|invalid choice|error: argument|ValueError: .*argument", re.I
        ),
        "a bad vllm serve argument",
        "fix model.args in the inventory (see `vllm serve --help`)",
    ),
    (
        re.compile(r"cannot open shared object file", re.I),
        "a shared library is missing in the image",
        "use an image with every library vLLM needs (the message names it)",
    ),
    (
        re.compile(r"No working C\+\+ compiler|Python\.h: No such file", re.I),
        "torch.compile needs a C++ compiler and Python headers that the image lacks",
        "use an image with g++ and python3-dev, or add --enforce-eager to model.args",
    ),
    (
        re.compile(r"Address already in use", re.I),
        "a port is already in use",
        "free the port on the node, or change ports: in the inventory",
    ),
]


_ERROR_LINE = re.compile(r"\b\w*(Error|Exception)\b[:(]|error:")
_LOG_PREFIX = re.compile(r"^\(\S+ pid=\d+\)\s+(ERROR|WARNING|INFO)\s+\S+ \S+ \[[^]]+\]\s*")


def error_lines(log: str, limit: int = 3) -> list[str]:
    """The last distinct error lines of a log, without vLLM's process/time prefixes."""
    found: list[str] = []
    for line in log.splitlines():
        text = _LOG_PREFIX.sub("", line).strip()
        if _ERROR_LINE.search(text) and text not in found and not text.startswith("raise "):
            found.append(text)
    return found[-limit:]


@dataclass(frozen=True)
class FailureCause:
    summary: str
    fix: str


def likely_cause(log_tail: str) -> FailureCause | None:
    """The most likely reason vLLM exited, read from the end of its log."""
    for pattern, summary, fix in _CAUSES:
        if pattern.search(log_tail):
            return FailureCause(summary, fix)
    return None
