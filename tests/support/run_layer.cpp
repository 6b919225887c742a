// Runs one generated layer function on raw float32 files: the on-target half of the tests.
// Linked with a build's lib<model>.a and libhalide_runtime.a plus a generated table of functions
// (functions.inc), it is also the "small C++ program that links against the library" check.
//
// usage: run_layer FUNCTION IN.bin OUT.bin N T H W C  N T H W C   (input dims, then output dims)
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "HalideBuffer.h"
#include "HalideRuntime.h"
#include MODEL_HEADER
#ifdef RT3D_OPENCL_FALLBACK
#include "rt3d_opencl_fallback.h"
#endif

struct Entry {
    const char *name;
    int (*fn)(halide_buffer_t *, halide_buffer_t *);
};
static const Entry kFunctions[] = {
#include "functions.inc"
    {nullptr, nullptr}};

static bool read_file(const char *path, std::vector<float> &data) {
    FILE *f = std::fopen(path, "rb");
    if (!f) return false;
    size_t got = std::fread(data.data(), sizeof(float), data.size(), f);
    std::fclose(f);
    return got == data.size();
}

int main(int argc, char **argv) {
    if (argc != 14) {
        std::fprintf(stderr, "usage: %s FUNCTION IN.bin OUT.bin N T H W C N T H W C\n", argv[0]);
        return 64;
    }
    const Entry *entry = nullptr;
    for (const Entry *e = kFunctions; e->name; ++e) {
        if (std::strcmp(e->name, argv[1]) == 0) entry = e;
    }
    if (!entry) {
        std::fprintf(stderr, "no function %s in this build\n", argv[1]);
        return 65;
    }
    int in_dims[5], out_dims[5];
    for (int i = 0; i < 5; ++i) {
        in_dims[4 - i] = std::atoi(argv[4 + i]);  // numpy (N,T,H,W,C) -> Halide (c,x,y,t,n)
        out_dims[4 - i] = std::atoi(argv[9 + i]);
    }
    Halide::Runtime::Buffer<float> input(in_dims[0], in_dims[1], in_dims[2], in_dims[3], in_dims[4]);
    Halide::Runtime::Buffer<float> output(out_dims[0], out_dims[1], out_dims[2], out_dims[3],
                                          out_dims[4]);
    std::vector<float> staging(input.number_of_elements());
    if (!read_file(argv[2], staging)) {
        std::fprintf(stderr, "cannot read %zu floats from %s\n", staging.size(), argv[2]);
        return 66;
    }
    std::memcpy(input.data(), staging.data(), staging.size() * sizeof(float));
    output.fill(NAN);
    // An OpenCL target copies both to the device: the poison too, which an element the code
    // leaves unwritten keeps (a fresh device buffer holds whatever it holds).
    input.set_host_dirty();
    output.set_host_dirty();
#ifdef RT3D_OPENCL_FALLBACK
    rt3d_fall_back_without_opencl();
#endif
    int err = entry->fn(input, output);
    if (err == 0) err = output.copy_to_host();  // an OpenCL target leaves it on the device
    if (err != 0) {
        std::fprintf(stderr, "%s returned Halide error %d\n", argv[1], err);
        return 1;
    }
    FILE *f = std::fopen(argv[3], "wb");
    if (!f) return 67;
    std::fwrite(output.data(), sizeof(float), output.number_of_elements(), f);
    std::fclose(f);
    return 0;
}
