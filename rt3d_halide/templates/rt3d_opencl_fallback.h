/* rt3d_opencl_fallback.h: written by rt3d-halide into builds with an OpenCL target.
 *
 * A library built for a comma list of targets (arm-64-android-opencl,arm-64-android) runs the
 * first target the device can use. Halide decides that by CPU features only: it does not look for
 * a GPU, so on a device without a usable OpenCL driver the OpenCL code is still chosen and every
 * call fails (Halide error -29). Call rt3d_fall_back_without_opencl() once, before the first layer
 * call, and an OpenCL target is skipped unless an OpenCL platform with a device is found; the
 * next target in the list (the CPU code) runs instead.
 *
 * The driver is looked up the way Halide's own OpenCL runtime does (halide_opencl_get_symbol, which
 * an app may override, e.g. to dlopen an Android vendor library). */
#ifndef RT3D_OPENCL_FALLBACK_H
#define RT3D_OPENCL_FALLBACK_H

#include <stddef.h>
#include <stdint.h>

#include "HalideRuntime.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Defined by Halide's OpenCL runtime (libhalide_runtime.a of an OpenCL build). */
void *halide_opencl_get_symbol(void *user_context, const char *name);

typedef int32_t (*rt3d_cl_get_platform_ids_t)(uint32_t, void **, uint32_t *);
typedef int32_t (*rt3d_cl_get_device_ids_t)(void *, uint64_t, uint32_t, void **, uint32_t *);

/* 1 when some OpenCL platform has a device, 0 otherwise; looked up once. */
static inline int rt3d_opencl_usable(void) {
    static int usable = -1;
    if (usable < 0) {
        rt3d_cl_get_platform_ids_t get_platforms =
            (rt3d_cl_get_platform_ids_t)halide_opencl_get_symbol(NULL, "clGetPlatformIDs");
        rt3d_cl_get_device_ids_t get_devices =
            (rt3d_cl_get_device_ids_t)halide_opencl_get_symbol(NULL, "clGetDeviceIDs");
        void *platforms[16];
        uint32_t count = 0, devices = 0, i;
        int found = 0;
        if (get_platforms && get_devices && get_platforms(16, platforms, &count) == 0) {
            for (i = 0; i < count && i < 16 && !found; i++) {
                /* 0xFFFFFFFF: CL_DEVICE_TYPE_ALL */
                found = get_devices(platforms[i], 0xFFFFFFFFu, 0, NULL, &devices) == 0 &&
                        devices > 0;
            }
        }
        usable = found;
    }
    return usable;
}

static inline int rt3d_can_use_target_features(int count, const uint64_t *features) {
    const int opencl = (int)halide_target_feature_opencl;
    if (opencl / 64 < count && ((features[opencl / 64] >> (opencl % 64)) & 1) &&
        !rt3d_opencl_usable()) {
        return 0;
    }
    return halide_default_can_use_target_features(count, features);
}

/* Call once before the first layer call: targets with OpenCL are taken only where it works. */
static inline void rt3d_fall_back_without_opencl(void) {
    halide_set_custom_can_use_target_features(rt3d_can_use_target_features);
}

#ifdef __cplusplus
}
#endif

#endif /* RT3D_OPENCL_FALLBACK_H */
