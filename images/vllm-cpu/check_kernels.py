"""The image's build check of vLLM's CPU kernels: load them the way vLLM does, and prove it.

vLLM's CPU build ships one kernel library per x86-64 CPU family and picks one at run time
(`CpuPlatform.import_kernels`). Importing one of them by name would run AVX-512 code on a CPU
that has none (SIGILL), so this check asks vLLM to choose, then verifies that the chosen
library registered its operators: vLLM itself only logs a warning when the import fails.
"""

import sys

import torch
from vllm.platforms.cpu import CpuPlatform

KERNEL_NAMESPACE = "_C::"


def kernel_ops() -> list[str]:
    """The operators vLLM's kernel library registered with torch."""
    return [
        name for name in torch._C._dispatch_get_all_op_names() if name.startswith(KERNEL_NAMESPACE)
    ]


def main() -> int:
    CpuPlatform.import_kernels()
    ops = kernel_ops()
    if not ops:
        print(
            "vLLM loaded no CPU kernel library for this CPU (see the warning above)",
            file=sys.stderr,
        )
        return 1
    print(f"vLLM's CPU kernels loaded: {len(ops)} operators")
    return 0


if __name__ == "__main__":
    sys.exit(main())
