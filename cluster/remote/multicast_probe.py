"""NVLink multicast on this host's GPUs, read and tried through the CUDA driver API.

Shipped to every node by the host probe and run with the host's own `python3` (3.8 or later,
standard library only: ctypes and the driver's libcuda.so.1). It prints one line,
`VCLUSTER-MULTICAST {json}`, parsed by `cluster.facts.fabric.parse_multicast`.

The driver's attribute (CU_DEVICE_ATTRIBUTE_MULTICAST_SUPPORTED) can say 1 where creating and
binding a multicast object still fails (a fabric manager that is not reachable), so in `try`
mode, where every GPU's attribute says 1, it also creates a small multicast object over all
GPUs, adds each GPU, binds 2 MiB of each GPU's memory to it, and reports every call's result
code; then it releases everything. `read` mode only reads the attributes. Without a driver it
says so and exits 0: a missing driver is a fact, not a failure of the probe.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
from typing import Any

MARKER = "VCLUSTER-MULTICAST "
MULTICAST_SUPPORTED = 132  # CU_DEVICE_ATTRIBUTE_MULTICAST_SUPPORTED
HANDLE_TYPE_FABRIC_SUPPORTED = 128  # CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_FABRIC_SUPPORTED
POSIX_FILE_DESCRIPTOR = 1  # CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR: what NCCL and torch use
PINNED = 1  # CU_MEM_ALLOCATION_TYPE_PINNED
LOCATION_DEVICE = 1  # CU_MEM_LOCATION_TYPE_DEVICE


class MulticastProp(ctypes.Structure):
    _fields_ = [
        ("numDevices", ctypes.c_uint),
        ("size", ctypes.c_size_t),
        ("handleTypes", ctypes.c_ulonglong),
        ("flags", ctypes.c_ulonglong),
    ]


class Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class AllocationFlags(ctypes.Structure):
    _fields_ = [
        ("compressionType", ctypes.c_ubyte),
        ("gpuDirectRDMACapable", ctypes.c_ubyte),
        ("usage", ctypes.c_ushort),
        ("reserved", ctypes.c_ubyte * 4),
    ]


class AllocationProp(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("requestedHandleTypes", ctypes.c_int),
        ("location", Location),
        ("win32HandleMetaData", ctypes.c_void_p),
        ("allocFlags", AllocationFlags),
    ]


class Driver:
    """libcuda's functions by name; a function this driver lacks answers `missing`."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self.library = library
        self.steps: list[dict[str, Any]] = []

    def call(self, name: str, *args: Any) -> int | None:
        function = getattr(self.library, name, None)
        if function is None:
            return None
        return int(function(*args))

    def error_name(self, code: int | None) -> str:
        if code is None:
            return "missing"
        text = ctypes.c_char_p()
        if self.call("cuGetErrorName", code, ctypes.byref(text)) == 0 and text.value:
            return text.value.decode()
        return "CUDA error " + str(code)

    def step(self, name: str, gpu: int | None, *args: Any) -> bool:
        """Call `name` and record its result code; True when it succeeded."""
        code = self.call(name, *args)
        self.steps.append({"call": name, "gpu": gpu, "code": code, "name": self.error_name(code)})
        return code == 0


def read_gpus(driver: Driver) -> list[dict[str, Any]]:
    count = ctypes.c_int()
    if driver.call("cuDeviceGetCount", ctypes.byref(count)) != 0:
        return []
    gpus = []
    for ordinal in range(count.value):
        device = ctypes.c_int()
        driver.call("cuDeviceGet", ctypes.byref(device), ordinal)
        bus = ctypes.create_string_buffer(32)
        driver.call("cuDeviceGetPCIBusId", bus, 32, device)
        name = ctypes.create_string_buffer(128)
        driver.call("cuDeviceGetName", name, 128, device)
        gpu = {
            "ordinal": ordinal,
            "device": device.value,
            "bus_id": bus.value.decode(),
            "name": name.value.decode(),
        }
        for key, attribute in (
            ("multicast_attribute", MULTICAST_SUPPORTED),
            ("fabric_handle_attribute", HANDLE_TYPE_FABRIC_SUPPORTED),
        ):
            value = ctypes.c_int()
            code = driver.call("cuDeviceGetAttribute", ctypes.byref(value), attribute, device)
            gpu[key] = value.value if code == 0 else None
        gpus.append(gpu)
    return gpus


def round_up(size: int, granularity: int) -> int:
    return (size + granularity - 1) // granularity * granularity if granularity else size


def try_multicast(driver: Driver, gpus: list[dict[str, Any]]) -> None:
    """Create one multicast object over every GPU, add each, bind memory of each, release."""
    contexts: list[tuple[dict[str, Any], ctypes.c_void_p]] = []
    for gpu in gpus:
        context = ctypes.c_void_p()
        if not driver.step(
            "cuDevicePrimaryCtxRetain", gpu["ordinal"], ctypes.byref(context), gpu["device"]
        ):
            return release_contexts(driver, contexts)
        contexts.append((gpu, context))
    driver.call("cuCtxSetCurrent", contexts[0][1])
    prop = MulticastProp(numDevices=len(gpus), size=0, handleTypes=POSIX_FILE_DESCRIPTOR)
    granularity = ctypes.c_size_t()
    if not driver.step(
        "cuMulticastGetGranularity", None, ctypes.byref(granularity), ctypes.byref(prop), 0
    ):
        return release_contexts(driver, contexts)
    size = round_up(2 << 20, granularity.value)
    prop.size = size
    handle = ctypes.c_ulonglong()
    if not driver.step("cuMulticastCreate", None, ctypes.byref(handle), ctypes.byref(prop)):
        return release_contexts(driver, contexts)
    added = all(
        [driver.step("cuMulticastAddDevice", gpu["ordinal"], handle, gpu["device"]) for gpu in gpus]
    )
    if added:
        for gpu, context in contexts:
            bind_memory(driver, gpu, context, handle, size)
    driver.step("cuMemRelease", None, handle)
    return release_contexts(driver, contexts)


def bind_memory(
    driver: Driver,
    gpu: dict[str, Any],
    context: ctypes.c_void_p,
    handle: ctypes.c_ulonglong,
    size: int,
) -> None:
    driver.call("cuCtxSetCurrent", context)
    prop = AllocationProp(
        type=PINNED,
        requestedHandleTypes=POSIX_FILE_DESCRIPTOR,
        location=Location(LOCATION_DEVICE, gpu["device"]),
    )
    granularity = ctypes.c_size_t()
    driver.call("cuMemGetAllocationGranularity", ctypes.byref(granularity), ctypes.byref(prop), 0)
    memory = ctypes.c_ulonglong()
    length = round_up(size, granularity.value)
    if not driver.step(
        "cuMemCreate",
        gpu["ordinal"],
        ctypes.byref(memory),
        ctypes.c_size_t(length),
        ctypes.byref(prop),
        ctypes.c_ulonglong(0),
    ):
        return
    if driver.step(
        "cuMulticastBindMem",
        gpu["ordinal"],
        handle,
        ctypes.c_size_t(0),
        memory,
        ctypes.c_size_t(0),
        ctypes.c_size_t(size),
        ctypes.c_ulonglong(0),
    ):
        driver.step(
            "cuMulticastUnbind",
            gpu["ordinal"],
            handle,
            gpu["device"],
            ctypes.c_size_t(0),
            ctypes.c_size_t(size),
        )
    driver.step("cuMemRelease", gpu["ordinal"], memory)


def release_contexts(
    driver: Driver, contexts: list[tuple[dict[str, Any], ctypes.c_void_p]]
) -> None:
    for gpu, _ in contexts:
        name = "cuDevicePrimaryCtxRelease_v2"
        if getattr(driver.library, name, None) is None:
            name = "cuDevicePrimaryCtxRelease"
        driver.call(name, gpu["device"])


def main(argv: list[str]) -> int:
    mode = argv[1] if len(argv) > 1 and argv[1] in ("try", "read") else "try"
    # the driver's ordinals in PCI order, like nvidia-smi's indices
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    report: dict[str, Any] = {
        "mode": mode,
        "driver": None,
        "init": None,
        "gpus": [],
        "tried": False,
        "not_tried": None,
        "steps": [],
        "error": None,
    }
    try:
        library = ctypes.CDLL("libcuda.so.1")
    except OSError as error:
        report["error"] = "no CUDA driver (" + str(error) + ")"
        print(MARKER + json.dumps(report, sort_keys=True))
        return 0
    driver = Driver(library)
    for name in ("cuInit", "cuDeviceGetAttribute", "cuDeviceGetCount", "cuDeviceGet"):
        if getattr(library, name, None) is None:
            report["error"] = "the CUDA driver lacks " + name
    version = ctypes.c_int()
    if driver.call("cuDriverGetVersion", ctypes.byref(version)) == 0:
        report["driver"] = version.value
    if report["error"] is None:
        code = driver.call("cuInit", 0)
        report["init"] = {"code": code, "name": driver.error_name(code)}
        if code == 0:
            report["gpus"] = read_gpus(driver)
    gpus = report["gpus"]
    if report["error"] is not None or not gpus:
        report["not_tried"] = "no GPU"
    elif mode == "read":
        report["not_tried"] = "read mode"
    elif any(gpu["multicast_attribute"] != 1 for gpu in gpus):
        report["not_tried"] = "the multicast attribute is not 1 on every GPU"
    elif getattr(library, "cuMulticastCreate", None) is None:
        report["not_tried"] = "the CUDA driver has no cuMulticastCreate (older than CUDA 12.1)"
    else:
        report["tried"] = True
        try_multicast(driver, gpus)
    report["steps"] = driver.steps
    print(MARKER + json.dumps(report, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
