/* A stand-in for the CUDA driver's libcuda.so.1, for testing the multicast program's ctypes
 * calls where no GPU is (tests/unit/test_fabric_facts.py builds it with cc).
 *
 * It implements the calls the program makes, with the driver API's signatures (cuda.h), and
 * checks the arguments the real driver would: a wrong structure layout, size or handle gives
 * CUDA_ERROR_INVALID_VALUE (1), which the test sees in the program's report.
 * Set by the environment: FAKE_CUDA_DEVICES (2), FAKE_CUDA_MULTICAST (the attribute, 1),
 * FAKE_CUDA_BIND_FAIL (a device whose cuMulticastBindMem returns 401, none by default).
 */
#include <stddef.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>

typedef int CUresult;
typedef int CUdevice;
typedef void *CUcontext;
typedef unsigned long long CUmemGenericAllocationHandle;

typedef struct {
    unsigned int numDevices;
    size_t size;
    unsigned long long handleTypes;
    unsigned long long flags;
} CUmulticastObjectProp;

typedef struct {
    int type;
    int requestedHandleTypes;
    struct { int type; int id; } location;
    void *win32HandleMetaData;
    struct { unsigned char compressionType, gpuDirectRDMACapable; unsigned short usage;
             unsigned char reserved[4]; } allocFlags;
} CUmemAllocationProp;

#define GRANULARITY (2u << 20)
#define MC_HANDLE 0x4d43ull
static int initialized, added, bound;
static size_t mc_size;
static char context_of[64];

static int env(const char *name, int fallback) {
    const char *value = getenv(name);
    return value ? atoi(value) : fallback;
}

CUresult cuInit(unsigned int flags) { initialized = flags == 0; return flags ? 1 : 0; }
CUresult cuDriverGetVersion(int *version) { *version = 13000; return 0; }
CUresult cuDeviceGetCount(int *count) { *count = env("FAKE_CUDA_DEVICES", 2); return initialized ? 0 : 3; }
CUresult cuDeviceGet(CUdevice *device, int ordinal) { *device = ordinal; return 0; }
CUresult cuDeviceGetPCIBusId(char *bus, int length, CUdevice device) {
    snprintf(bus, length, "0000:00:%02X.0", 6 + device);
    return 0;
}
CUresult cuDeviceGetName(char *name, int length, CUdevice device) {
    snprintf(name, length, "Fake GPU %d", device);
    return 0;
}
CUresult cuDeviceGetAttribute(int *value, int attribute, CUdevice device) {
    if (attribute == 132) { *value = env("FAKE_CUDA_MULTICAST", 1); return 0; }
    if (attribute == 128) { *value = 0; return 0; }
    return 1;
}
CUresult cuGetErrorName(CUresult code, const char **name) {
    switch (code) {
    case 0: *name = "CUDA_SUCCESS"; return 0;
    case 1: *name = "CUDA_ERROR_INVALID_VALUE"; return 0;
    case 401: *name = "CUDA_ERROR_ILLEGAL_STATE"; return 0;
    default: return 1;
    }
}
CUresult cuDevicePrimaryCtxRetain(CUcontext *context, CUdevice device) {
    *context = &context_of[device];
    return 0;
}
CUresult cuDevicePrimaryCtxRelease_v2(CUdevice device) { return 0; }
CUresult cuCtxSetCurrent(CUcontext context) { return 0; }
CUresult cuMulticastGetGranularity(size_t *granularity, const CUmulticastObjectProp *prop, int option) {
    if (prop->numDevices != (unsigned)env("FAKE_CUDA_DEVICES", 2) || option != 0) return 1;
    *granularity = GRANULARITY;
    return 0;
}
CUresult cuMulticastCreate(CUmemGenericAllocationHandle *handle, const CUmulticastObjectProp *prop) {
    if (prop->size == 0 || prop->size % GRANULARITY || prop->handleTypes != 1 || prop->flags) return 1;
    mc_size = prop->size;
    *handle = MC_HANDLE;
    return 0;
}
CUresult cuMulticastAddDevice(CUmemGenericAllocationHandle handle, CUdevice device) {
    if (handle != MC_HANDLE || bound) return 1;
    added++;
    return 0;
}
CUresult cuMemGetAllocationGranularity(size_t *granularity, const CUmemAllocationProp *prop, int option) {
    *granularity = GRANULARITY;
    return 0;
}
CUresult cuMemCreate(CUmemGenericAllocationHandle *handle, size_t size, const CUmemAllocationProp *prop,
                     unsigned long long flags) {
    if (prop->type != 1 || prop->location.type != 1 || size % GRANULARITY || flags) return 1;
    *handle = 0x1000ull + (unsigned)prop->location.id;
    return 0;
}
CUresult cuMulticastBindMem(CUmemGenericAllocationHandle mc, size_t mc_offset, CUmemGenericAllocationHandle memory,
                            size_t memory_offset, size_t size, unsigned long long flags) {
    if (mc != MC_HANDLE || mc_offset || memory_offset || flags || size != mc_size) return 1;
    if (added != env("FAKE_CUDA_DEVICES", 2)) return 1;  /* every device added first */
    if ((int)(memory - 0x1000ull) == env("FAKE_CUDA_BIND_FAIL", -1)) return 401;
    bound++;
    return 0;
}
CUresult cuMulticastUnbind(CUmemGenericAllocationHandle mc, CUdevice device, size_t offset, size_t size) {
    return mc == MC_HANDLE && size == mc_size && offset == 0 ? 0 : 1;
}
CUresult cuMemRelease(CUmemGenericAllocationHandle handle) { return handle ? 0 : 1; }
