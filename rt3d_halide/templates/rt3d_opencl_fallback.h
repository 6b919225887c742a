/* rt3d_opencl_fallback.h: written by rt3d-halide into builds of a comma list of targets with an
 * OpenCL target first and a CPU one last, such as arm-64-android-opencl,arm-64-android.
 *
 * Such a library runs the first target the device can use, and Halide decides that by CPU
 * features only: it does not look for a GPU. On a device without a usable OpenCL driver the
 * OpenCL code is still chosen and every call fails (Halide error -29). Call
 * rt3d_fall_back_without_opencl() once, from one thread, before the first call of any layer: an
 * OpenCL target is then taken only where Halide's OpenCL runtime would find a device, and the
 * next target in the list (the CPU code) runs elsewhere. Each layer function makes its choice on
 * its first call and keeps it.
 *
 * The check follows Halide's own: the driver is looked up through halide_opencl_get_symbol (which
 * an app may override, e.g. to dlopen an Android vendor library), the platform is the one named
 * by halide_opencl_get_platform_name (HL_OCL_PLATFORM_NAME) or else the first, the device type
 * the one halide_opencl_get_device_type (HL_OCL_DEVICE_TYPE) asks for, and a device index that
 * halide_get_gpu_device (HL_GPU_DEVICE) names must be among them. A hook the app installed
 * earlier with halide_set_custom_can_use_target_features is still consulted. */
#ifndef RT3D_OPENCL_FALLBACK_H
#define RT3D_OPENCL_FALLBACK_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "HalideRuntime.h"
#include "HalideRuntimeOpenCL.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Defined by Halide's OpenCL runtime (libhalide_runtime.a of an OpenCL build). */
void *halide_opencl_get_symbol(void *user_context, const char *name);

typedef int32_t (*rt3d_cl_get_platform_ids_t)(uint32_t, void **, uint32_t *);
typedef int32_t (*rt3d_cl_get_platform_info_t)(void *, uint32_t, size_t, void *, size_t *);
typedef int32_t (*rt3d_cl_get_device_ids_t)(void *, uint64_t, uint32_t, void **, uint32_t *);

/* OpenCL constants (CL/cl.h) */
#define RT3D_CL_PLATFORM_NAME 0x0902u
#define RT3D_CL_DEVICE_TYPE_CPU (1u << 1)
#define RT3D_CL_DEVICE_TYPE_GPU (1u << 2)
#define RT3D_CL_DEVICE_TYPE_ACCELERATOR (1u << 3)
#define RT3D_CL_DEVICE_TYPE_ALL 0xFFFFFFFFu

/* The platform Halide would take: the first whose name contains the requested one, else the
 * first platform; NULL when there is none. */
static inline void *rt3d_opencl_platform(void) {
    rt3d_cl_get_platform_ids_t get_platforms;
    rt3d_cl_get_platform_info_t get_info;
    void *platforms[4];
    uint32_t count = 0, i;
    const char *wanted = halide_opencl_get_platform_name(NULL);
    /* Stored through void ** (as for dlsym): ISO C has no cast from object to function pointer. */
    *(void **)&get_platforms = halide_opencl_get_symbol(NULL, "clGetPlatformIDs");
    *(void **)&get_info = halide_opencl_get_symbol(NULL, "clGetPlatformInfo");
    if (!get_platforms || get_platforms(4, platforms, &count) != 0 || count == 0) return NULL;
    if (count > 4) count = 4;
    if (!wanted || !*wanted) return platforms[0];
    for (i = 0; get_info && i < count; i++) {
        char name[256] = {0};
        if (get_info(platforms[i], RT3D_CL_PLATFORM_NAME, sizeof name - 1, name, NULL) == 0 &&
            strstr(name, wanted)) {
            return platforms[i];
        }
    }
    return NULL;
}

/* 1 when that platform has a device of the requested type (the one of the requested index, if
 * one is named), 0 otherwise; probed once. */
static inline int rt3d_opencl_usable(void) {
    static int usable = -1;
    if (usable < 0) {
        rt3d_cl_get_device_ids_t get_devices;
        void *platform = rt3d_opencl_platform();
        const char *type_name = halide_opencl_get_device_type(NULL);
        uint64_t type = 0;
        uint32_t devices = 0;
        const int index = halide_get_gpu_device(NULL); /* -1: Halide chooses */
        if (type_name && strstr(type_name, "cpu")) type |= RT3D_CL_DEVICE_TYPE_CPU;
        if (type_name && strstr(type_name, "gpu")) type |= RT3D_CL_DEVICE_TYPE_GPU;
        if (type_name && strstr(type_name, "acc")) type |= RT3D_CL_DEVICE_TYPE_ACCELERATOR;
        if (type == 0) type = RT3D_CL_DEVICE_TYPE_ALL;
        *(void **)&get_devices = halide_opencl_get_symbol(NULL, "clGetDeviceIDs");
        usable = platform && get_devices && get_devices(platform, type, 0, NULL, &devices) == 0 &&
                 devices > 0 && index >= -1 && index < (int)devices;
    }
    return usable;
}

/* The hook installed before ours: Halide's default unless the app had its own. */
static halide_can_use_target_features_t rt3d_previous_can_use = NULL;

static inline int rt3d_can_use_target_features(int count, const uint64_t *features) {
    const int opencl = (int)halide_target_feature_opencl;
    if (opencl / 64 < count && ((features[opencl / 64] >> (opencl % 64)) & 1) &&
        !rt3d_opencl_usable()) {
        return 0;
    }
    return rt3d_previous_can_use ? rt3d_previous_can_use(count, features)
                                 : halide_default_can_use_target_features(count, features);
}

/* Set by the first call from any source file of the program (a weak definition in each, which
 * the linker merges into one): the hooks of two files must not chain to each other. */
__attribute__((weak)) int rt3d_opencl_fallback_installed = 0;

/* Call from one thread, before the first call of any layer; later calls, from any source file,
 * do nothing. */
static inline void rt3d_fall_back_without_opencl(void) {
    if (rt3d_opencl_fallback_installed) return;
    rt3d_opencl_fallback_installed = 1;
    rt3d_opencl_usable(); /* probed here, not racing inside the layers' first calls */
    rt3d_previous_can_use = halide_set_custom_can_use_target_features(rt3d_can_use_target_features);
}

#ifdef __cplusplus
}
#endif

#endif /* RT3D_OPENCL_FALLBACK_H */
