"""Delete what the sandbox's vLLM never loads, in the layer that installed it.

Every megabyte here is streamed to every node on every `sandbox up` after a `down`.
This script imports nothing from the venv itself: `strip` rewrites files in place, and a
library this process had mapped would crash it.

vLLM's kernel builds (`vllm/_C*.so`, one per x86-64 CPU family) all stay: vLLM picks one at
run time from the CPU it runs on, and the image must run on any CPU, not only the builder's.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

VENV = Path(sys.prefix)
SITE = VENV / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


def is_elf(path: Path) -> bool:
    with path.open("rb") as head:
        return head.read(4) == b"\x7fELF"


def loadable(path: Path) -> bool:
    """Whether every LOAD segment's file offset and address agree modulo its alignment, as the
    dynamic loader requires ("ELF load command address/offset not page-aligned" otherwise)."""
    headers = subprocess.run(["readelf", "-lW", str(path)], capture_output=True, text=True)
    for fields in (line.split() for line in headers.stdout.splitlines()):
        if fields and fields[0] == "LOAD":
            offset, address, align = int(fields[1], 16), int(fields[2], 16), int(fields[-1], 16)
            if align > 1 and offset % align != address % align:
                return False
    return True


def deletions(site: Path) -> list[Path]:
    """What is removed outright: torch's C++ test binaries and protoc, Ray's Java jars."""
    doomed = [
        path
        for path in sorted((site / "torch" / "bin").glob("*"))
        if path.name != "torch_shm_manager" and path.is_file()
    ]
    jars = site / "ray" / "jars"
    return [*doomed, jars] if jars.exists() else doomed


def strip_venv(venv: Path) -> None:
    """Strip debug info and static symbol tables that wheels ship from the venv's ELF files.

    vllm/_C alone is 213 MB with them, 37 MB without; .symtab/.strtab are 168 MB over the venv
    (libtorch_cpu: 89 MB).
    """
    # `strip --strip-unneeded` keeps the dynamic symbols that loading and linking need (and that
    # name most frames in a backtrace); only names of internal functions go. strip comes with g++.
    # Libraries that auditwheel vendored (`*.libs/`) are left alone: patchelf rewrote their program
    # headers, and strip leaves them unloadable ("ELF load command address/offset not page-aligned").
    # Any other file that strip would leave so is put back as it was.
    for path in sorted(venv.rglob("*")):
        if path.is_symlink() or not path.is_file() or path.stat().st_size < 100_000:
            continue
        if path.parent.name.endswith(".libs") or not is_elf(path):
            continue
        sections = subprocess.run(
            ["readelf", "-S", "-W", str(path)], capture_output=True, text=True
        )
        if ".symtab" in sections.stdout or ".debug_info" in sections.stdout:
            before = path.stat().st_size
            original = path.with_name(path.name + ".unstripped")
            shutil.copy2(path, original)
            subprocess.run(["strip", "--strip-unneeded", str(path)], check=True)
            if not loadable(path):
                os.replace(original, path)
                print(
                    "kept", path.relative_to(venv), "as it was (strip breaks its program headers)"
                )
                continue
            original.unlink()
            saved = (before - path.stat().st_size) // 1_000_000
            if saved:
                print("stripped", path.relative_to(venv), f"(-{saved} MB)")


def main() -> None:
    for path in deletions(SITE):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    strip_venv(VENV)


if __name__ == "__main__":
    main()
