// The GPU half of bench/opencl_gpu.py: runs and times generated OpenCL layers on a real GPU.
//
// Linked on the build machine with every row's library, one Halide runtime and a generated table
// (functions.inc: declarations; function_table.inc: {name, fn} entries), it needs on the GPU
// machine only an OpenCL ICD loader and the vendor's driver.
//
// usage: opencl_timer PLAN ROUNDS MIN_SECONDS
// PLAN has one line per function: NAME IN.bin OUT.bin N T H W C N T H W C (input, output dims).
// Each function first runs once on its input with a NaN-poisoned output, written to OUT.bin for
// the caller's check. Then every round times each function in turn (interleaved, so a slow
// spell of the machine hurts every row alike): as many back-to-back calls as fill MIN_SECONDS,
// then halide_device_sync, wall time divided by the calls. Prints one line per function:
// NAME CALLS_PER_SAMPLE SECONDS_PER_CALL... (one per round).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "HalideBuffer.h"
#include "HalideRuntime.h"
#include "HalideRuntimeOpenCL.h"

using LayerFn = int (*)(halide_buffer_t *, halide_buffer_t *);
#include "functions.inc"

struct Entry {
    const char *name;
    LayerFn fn;
};
static const Entry kFunctions[] = {
#include "function_table.inc"
    {nullptr, nullptr}};

using Buffer = Halide::Runtime::Buffer<float>;

struct Row {
    std::string name;
    LayerFn fn = nullptr;
    Buffer *input = nullptr;
    std::unique_ptr<Buffer> output;
    int calls = 1;
    std::vector<double> seconds;
};

static double now() {
    using clock = std::chrono::steady_clock;
    return std::chrono::duration<double>(clock::now().time_since_epoch()).count();
}

static void fail(const std::string &what, int halide_error = 0) {
    if (halide_error) {
        std::fprintf(stderr, "opencl_timer: %s (Halide error %d)\n", what.c_str(), halide_error);
    } else {
        std::fprintf(stderr, "opencl_timer: %s\n", what.c_str());
    }
    std::exit(1);
}

static LayerFn find_function(const std::string &name) {
    for (const Entry *e = kFunctions; e->name; ++e) {
        if (name == e->name) return e->fn;
    }
    fail("no function " + name + " in this binary");
    return nullptr;
}

static std::unique_ptr<Buffer> make_buffer(const int numpy_dims[5]) {
    // numpy (N, T, H, W, C) -> Halide (c, x, y, t, n)
    return std::make_unique<Buffer>(numpy_dims[4], numpy_dims[3], numpy_dims[2], numpy_dims[1],
                                    numpy_dims[0]);
}

static Buffer *load_input(std::map<std::string, std::unique_ptr<Buffer>> &inputs,
                          const std::string &path, const int dims[5]) {
    auto found = inputs.find(path);
    if (found != inputs.end()) return found->second.get();
    auto buf = make_buffer(dims);
    std::ifstream in(path, std::ios::binary);
    const auto bytes = static_cast<std::streamsize>(buf->number_of_elements() * sizeof(float));
    if (!in.read(reinterpret_cast<char *>(buf->data()), bytes)) fail("cannot read " + path);
    buf->set_host_dirty();
    Buffer *raw = buf.get();
    inputs[path] = std::move(buf);
    return raw;
}

// One call with the output poisoned on the device, copied back and written for the check.
static void run_checked(Row &row, const std::string &out_path) {
    row.output->fill(NAN);
    row.output->set_host_dirty();
    int err = row.output->copy_to_device(halide_opencl_device_interface());
    if (err) fail("poisoning the output of " + row.name, err);
    if ((err = row.fn(*row.input, *row.output))) fail(row.name + " failed", err);
    if ((err = row.output->copy_to_host())) fail("copying back " + row.name, err);
    std::ofstream out(out_path, std::ios::binary);
    out.write(reinterpret_cast<const char *>(row.output->data()),
              static_cast<std::streamsize>(row.output->number_of_elements() * sizeof(float)));
    if (!out) fail("cannot write " + out_path);
}

static double time_calls(Row &row, int calls) {
    const double start = now();
    for (int i = 0; i < calls; ++i) {
        if (int err = row.fn(*row.input, *row.output)) fail(row.name + " failed", err);
    }
    if (int err = row.output->device_sync()) fail("device_sync after " + row.name, err);
    return (now() - start) / calls;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        std::fprintf(stderr, "usage: %s PLAN ROUNDS MIN_SECONDS\n", argv[0]);
        return 64;
    }
    const int rounds = std::atoi(argv[2]);
    const double min_seconds = std::atof(argv[3]);
    if (rounds < 1 || min_seconds < 0) fail("ROUNDS must be >= 1 and MIN_SECONDS >= 0");
    std::ifstream plan(argv[1]);
    if (!plan) fail(std::string("cannot open ") + argv[1]);
    std::map<std::string, std::unique_ptr<Buffer>> inputs;
    std::vector<Row> rows;
    std::string line;
    while (std::getline(plan, line)) {
        if (line.empty()) continue;
        std::istringstream fields(line);
        Row row;
        std::string in_path, out_path;
        int in_dims[5], out_dims[5];
        fields >> row.name >> in_path >> out_path;
        for (int &d : in_dims) fields >> d;
        for (int &d : out_dims) fields >> d;
        if (!fields) fail("bad plan line: " + line);
        row.fn = find_function(row.name);
        row.input = load_input(inputs, in_path, in_dims);
        row.output = make_buffer(out_dims);
        const double started = now();
        run_checked(row, out_path);
        std::fprintf(stderr, "%s: first call (OpenCL compile included) %.3f s\n",
                     row.name.c_str(), now() - started);
        rows.push_back(std::move(row));
    }
    for (Row &row : rows) {
        time_calls(row, 1);  // warm
        const double one = time_calls(row, 1);
        row.calls = std::clamp(static_cast<int>(std::ceil(min_seconds / one)), 1, 1000);
    }
    for (int r = 0; r < rounds; ++r) {
        for (Row &row : rows) row.seconds.push_back(time_calls(row, row.calls));
    }
    for (const Row &row : rows) {
        std::printf("%s %d", row.name.c_str(), row.calls);
        for (double s : row.seconds) std::printf(" %.9g", s);
        std::printf("\n");
    }
    return 0;
}
