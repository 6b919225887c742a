/* The sparse CPU kernel's inner loop, alone, on one core: how close to the FMA peak can a block
 * of LANES output channels x VECTORS vectors of positions get, with every input in L1?
 *
 * Per entry of a list (as the generated code does): load the entry's input offset, load VECTORS
 * input vectors from there, broadcast each of the LANES packed weights once, issue LANES x VECTORS
 * FMAs. Mode "swept" runs that list over a chunk's blocks as a layer does, its inputs from L2
 * (see there). Mode "aligned" rounds every offset down to a whole vector (no load straddles two
 * cache lines; a 3-wide kernel's real offsets cannot all be). Mode "peak" runs the same number of
 * independent FMAs on registers only (no loads): the core's FMA peak. Modes "broadcast" (AVX2
 * only), "quads" and "blocked": the kernels of temporal-only layers, and "copy": making the
 * blocked copy (see below). Built and run by inner_loop_ceiling.py with -DLANES=.. -DVECTORS=..
 * and -DWIDTH=8 (AVX2) or 16 (AVX-512: every loop in 16-float vectors; the planar loop's weight
 * broadcasts fold into the FMAs' memory operands). Prints one JSON line: GFLOP/s and
 * "input_bytes", the size of the input array the mode reads; for "copy", "ms" and "bytes".
 */
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define ENTRIES 84  /* a chunk's list per group in C3D conv3b at 26 % kept */
#define WINDOW 4096 /* floats the offsets spread over: 16 KiB, the input chunk in L1 */
#define WORK 400000000L

#if WIDTH == 16
typedef __m512 vec;
#define REGISTERS 32
#define VZERO _mm512_setzero_ps
#define VSET1 _mm512_set1_ps
#define VLOADU _mm512_loadu_ps
#define VLOAD _mm512_load_ps
#define VSTOREU _mm512_storeu_ps
#define VADD _mm512_add_ps
#define VFMA _mm512_fmadd_ps
#elif WIDTH == 8
typedef __m256 vec;
#define REGISTERS 16
#define VZERO _mm256_setzero_ps
#define VSET1 _mm256_set1_ps
#define VLOADU _mm256_loadu_ps
#define VLOAD _mm256_load_ps
#define VSTOREU _mm256_storeu_ps
#define VADD _mm256_add_ps
#define VFMA _mm256_fmadd_ps
#else
#error "WIDTH must be 8 (AVX2) or 16 (AVX-512)"
#endif

static float input[WINDOW + 64] __attribute__((aligned(64)));
static float weights[ENTRIES * LANES] __attribute__((aligned(64)));
static int offsets[ENTRIES];

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static float reduce(vec acc[LANES][VECTORS]) {
  vec s = VZERO();
  for (int l = 0; l < LANES; l++)
    for (int v = 0; v < VECTORS; v++) s = VADD(s, acc[l][v]);
  float out[WIDTH];
  VSTOREU(out, s);
  return out[0];
}

/* One pass of the list over one block: the entries' inputs at ``base`` plus their offsets. */
static inline __attribute__((always_inline)) void run_list(vec acc[LANES][VECTORS],
                                                           const float *base,
                                                           const int *list) {
  const float *w = weights;
  for (int e = 0; e < ENTRIES; e++, w += LANES) {
    const float *in = base + list[e];
    vec x[VECTORS];
#pragma GCC unroll 16
    for (int v = 0; v < VECTORS; v++) x[v] = VLOADU(in + WIDTH * v);
#pragma GCC unroll 16
    for (int l = 0; l < LANES; l++) {
      vec b = VSET1(w[l]);
#pragma GCC unroll 16
      for (int v = 0; v < VECTORS; v++) acc[l][v] = VFMA(b, x[v], acc[l][v]);
    }
  }
}

__attribute__((noinline)) static float entries(long passes) {
  vec acc[LANES][VECTORS];
  for (int l = 0; l < LANES; l++)
    for (int v = 0; v < VECTORS; v++) acc[l][v] = VZERO();
  for (long p = 0; p < passes; p++) run_list(acc, input, offsets);
  return reduce(acc);
}

/* "swept": the same list as a group meets it in a layer, where its list runs over every block of
 * a task (sparse_schedules: per chunk, each group over every block): the offsets spread over half
 * a chunk of input (the family's CHUNK_BYTES: 128 KiB on AVX-512, 32 KiB on AVX2), in ascending
 * order as the baked lists hold them, and each pass is the next block, every offset moved on by
 * the block's VECTORS vectors, for half a chunk of positions; then the sweep starts again. A
 * block reads lines the one before did not, so the inputs come from L2 wherever the chunk
 * outgrows L1, in as many streams as the list has entries. */
#if WIDTH == 16
#define SWEPT_FLOATS 32768
#else
#define SWEPT_FLOATS 8192
#endif
#define SWEPT_BLOCKS (SWEPT_FLOATS / 2 / (WIDTH * VECTORS))
static float swept_input[SWEPT_FLOATS + 64] __attribute__((aligned(64)));
static int swept_offsets[ENTRIES];

static int ascending(const void *a, const void *b) {
  return *(const int *)a - *(const int *)b;
}

__attribute__((noinline)) static float swept(long passes) {
  vec acc[LANES][VECTORS];
  for (int l = 0; l < LANES; l++)
    for (int v = 0; v < VECTORS; v++) acc[l][v] = VZERO();
  for (long p = 0; p < passes; p += SWEPT_BLOCKS)
    for (long block = 0; block < SWEPT_BLOCKS && p + block < passes; block++)
      run_list(acc, swept_input + block * WIDTH * VECTORS, swept_offsets);
  return reduce(acc);
}

/* The in-place kernels of temporal-only layers (R(2+1)D-18's 288-channel 3x1x1 conv): every
 * group of 8 output channels passes over one block's inputs (in L1) while the groups' weights
 * (144 KiB, as at a third kept) stream from L2. "broadcast" (AVX2 only): output channels as the
 * lanes, one broadcast input float per FMA, 14 positions. "quads": 4 input channels loaded once
 * per position into every 4-float part of a vector, times that many output channels' weights,
 * as many positions as the registers hold beside one input vector each and a weight vector (the
 * generated code's block, in its instruction order): AVX2 3 positions x 4 vectors of 2
 * channels, AVX-512 10 positions x 2 vectors of 4 channels. */
#define CHANNELS 288
#define GROUPS 16
#define QUADS 72 /* per group: a third of 288 channels x 3 depths, 4 channels each */
#define QUAD_VECTORS (32 / WIDTH) /* per position: 8 channels x 4 inputs */
#define QUAD_POSITIONS ((REGISTERS - 1) / (QUAD_VECTORS + 1))
static float pixels[16 * CHANNELS] __attribute__((aligned(64)));
static float group_weights[GROUPS * QUADS * 32] __attribute__((aligned(64)));
static int quad_offsets[QUADS];
/* Each group's block: at most 768 floats (AVX-512 "blocked" below: 8 channels x 6 vectors). */
static float group_sums[GROUPS * 768] __attribute__((aligned(64)));

#if WIDTH == 8
__attribute__((noinline)) static float broadcast(long passes) {
  for (long p = 0; p < passes; p++) {
    const float *w = group_weights;
    for (int g = 0; g < GROUPS; g++) {
      __m256 acc[14];
      for (int x = 0; x < 14; x++) acc[x] = _mm256_setzero_ps();
      for (int e = 0; e < QUADS * 4; e++, w += 8) {
        __m256 wv = _mm256_load_ps(w);
        const float *in = pixels + quad_offsets[e / 4] + e % 4;
#pragma GCC unroll 16
        for (int x = 0; x < 14; x++)
          acc[x] = _mm256_fmadd_ps(wv, _mm256_broadcast_ss(in + CHANNELS * x), acc[x]);
      }
      for (int x = 0; x < 14; x++) _mm256_store_ps(group_sums + (g * 14 + x) * 8, acc[x]);
    }
  }
  return group_sums[0];
}

#define BROADCAST_QUAD(p) _mm256_broadcast_ps((const __m128 *)(p))
#else
#define BROADCAST_QUAD(p) _mm512_broadcast_f32x4(_mm_loadu_ps(p))
#endif

/* passes * 14 / QUAD_POSITIONS block passes: about the positions of `passes` broadcast passes. */
__attribute__((noinline)) static float quads(long passes) {
  for (long p = 0; p < passes * 14 / QUAD_POSITIONS; p++) {
    const float *w = group_weights;
    for (int g = 0; g < GROUPS; g++) {
      vec acc[QUAD_VECTORS][QUAD_POSITIONS];
      for (int k = 0; k < QUAD_VECTORS; k++)
        for (int x = 0; x < QUAD_POSITIONS; x++) acc[k][x] = VZERO();
      for (int q = 0; q < QUADS; q++, w += 32) {
        const float *in = pixels + quad_offsets[q];
        vec v[QUAD_POSITIONS];
#pragma GCC unroll 16
        for (int x = 0; x < QUAD_POSITIONS; x++) v[x] = BROADCAST_QUAD(in + CHANNELS * x);
#pragma GCC unroll 4
        for (int k = 0; k < QUAD_VECTORS; k++) {
          vec wv = VLOAD(w + WIDTH * k);
#pragma GCC unroll 16
          for (int x = 0; x < QUAD_POSITIONS; x++) acc[k][x] = VFMA(wv, v[x], acc[k][x]);
        }
      }
      for (int k = 0; k < QUAD_VECTORS; k++)
        for (int x = 0; x < QUAD_POSITIONS; x++)
          VSTOREU(group_sums + ((g * QUAD_VECTORS + k) * QUAD_POSITIONS + x) * WIDTH, acc[k][x]);
    }
  }
  return group_sums[0];
}

/* "blocked": the same quads from a quad-blocked copy of the block's inputs (frame, quad, position,
 * 4 channels), so that one vector load holds 4 input channels of WIDTH / 4 positions, and each
 * output channel's 4 weights of a quad are broadcast instead: 4 of a group's 8 channels at a time
 * (two passes over its list) x BLOCKED_VECTORS vectors of positions. Not a kernel of the
 * generator: the ceiling of that layout. */
#define BLOCKED_CHANNELS 4
#define BLOCKED_VECTORS ((REGISTERS - 1) / (BLOCKED_CHANNELS + 1))
#define BLOCKED_POSITIONS (WIDTH / 4 * BLOCKED_VECTORS)
static float blocked_inputs[3 * (CHANNELS / 4) * BLOCKED_POSITIONS * 4] __attribute__((aligned(64)));
static int blocked_offsets[QUADS];

__attribute__((noinline)) static float blocked(long passes) {
  for (long p = 0; p < passes * 14 / BLOCKED_POSITIONS; p++) {
    for (int g = 0; g < GROUPS; g++) {
      for (int half = 0; half < 8 / BLOCKED_CHANNELS; half++) {
        const float *w = group_weights + g * QUADS * 32 + half * BLOCKED_CHANNELS * 4;
        vec acc[BLOCKED_CHANNELS][BLOCKED_VECTORS];
        for (int k = 0; k < BLOCKED_CHANNELS; k++)
          for (int x = 0; x < BLOCKED_VECTORS; x++) acc[k][x] = VZERO();
        for (int q = 0; q < QUADS; q++, w += 32) {
          const float *in = blocked_inputs + blocked_offsets[q];
          vec v[BLOCKED_VECTORS];
#pragma GCC unroll 16
          for (int x = 0; x < BLOCKED_VECTORS; x++) v[x] = VLOAD(in + WIDTH * x);
#pragma GCC unroll 4
          for (int k = 0; k < BLOCKED_CHANNELS; k++) {
            vec wv = BROADCAST_QUAD(w + 4 * k);
#pragma GCC unroll 16
            for (int x = 0; x < BLOCKED_VECTORS; x++) acc[k][x] = VFMA(wv, v[x], acc[k][x]);
          }
        }
        for (int k = 0; k < BLOCKED_CHANNELS; k++)
          for (int x = 0; x < BLOCKED_VECTORS; x++)
            VSTOREU(group_sums + ((g * 8 + half * BLOCKED_CHANNELS + k) * BLOCKED_VECTORS + x) *
                                     WIDTH,
                    acc[k][x]);
      }
    }
  }
  return group_sums[0];
}

/* "copy": what the blocked layout costs to make, once per call: R(2+1)D-18's 288-channel 3x1x1
 * conv's whole input (8 frames of 28 x 28, channels innermost) into (frame, quad, position, 4
 * channels), 16 bytes at a time, one core. */
#define COPY_FRAMES 8
#define COPY_POSITIONS (28 * 28)
#define COPY_FLOATS ((long)COPY_FRAMES * COPY_POSITIONS * CHANNELS)

__attribute__((noinline)) static float blocked_copy(const float *src, float *dst, long passes) {
  for (long p = 0; p < passes; p++)
    for (long f = 0; f < COPY_FRAMES; f++)
      for (long x = 0; x < COPY_POSITIONS; x++) {
        const float *in = src + (f * COPY_POSITIONS + x) * CHANNELS;
        float *out = dst + f * COPY_POSITIONS * CHANNELS + x * 4;
        for (long q = 0; q < CHANNELS / 4; q++)
          _mm_store_ps(out + q * COPY_POSITIONS * 4, _mm_loadu_ps(in + 4 * q));
      }
  return dst[COPY_FLOATS - 1];
}

/* Distinct starting values: equal chains were folded into one by the compiler. */
__attribute__((noinline)) static float peak(long passes) {
  vec acc[LANES][VECTORS];
  for (int l = 0; l < LANES; l++)
    for (int v = 0; v < VECTORS; v++) acc[l][v] = VSET1(1e-9f * (1 + l * VECTORS + v));
  vec b = VSET1(1e-9f);
  for (long p = 0; p < passes * ENTRIES; p++) {
#pragma GCC unroll 16
    for (int l = 0; l < LANES; l++)
#pragma GCC unroll 16
      for (int v = 0; v < VECTORS; v++) acc[l][v] = VFMA(b, acc[l][v], b);
  }
  return reduce(acc);
}

int main(int argc, char **argv) {
  const char *mode = argc > 1 ? argv[1] : "entries";
  for (int i = 0; i < WINDOW + 64; i++) input[i] = 1e-9f;
  for (int i = 0; i < ENTRIES * LANES; i++) weights[i] = 1e-9f;
  int aligned = strcmp(mode, "aligned") == 0;
  srand(1);
  for (int e = 0; e < ENTRIES; e++) {
    offsets[e] = rand() % (WINDOW - WIDTH * VECTORS);
    if (aligned) offsets[e] &= ~(WIDTH - 1);
  }
  for (int i = 0; i < SWEPT_FLOATS + 64; i++) swept_input[i] = 1e-9f;
  for (int e = 0; e < ENTRIES; e++) swept_offsets[e] = rand() % (SWEPT_FLOATS / 2 - WIDTH * VECTORS);
  qsort(swept_offsets, ENTRIES, sizeof swept_offsets[0], ascending);
  for (int i = 0; i < 16 * CHANNELS; i++) pixels[i] = 1e-9f;
  for (int i = 0; i < GROUPS * QUADS * 32; i++) group_weights[i] = 1e-9f;
  for (int q = 0; q < QUADS; q++) quad_offsets[q] = 4 * (rand() % (CHANNELS / 4)) + CHANNELS * (q % 2);
  for (int i = 0; i < 3 * CHANNELS * BLOCKED_POSITIONS; i++) blocked_inputs[i] = 1e-9f;
  for (int q = 0; q < QUADS; q++)
    blocked_offsets[q] = (q % 3 * (CHANNELS / 4) + rand() % (CHANNELS / 4)) * BLOCKED_POSITIONS * 4;
  if (strcmp(mode, "copy") == 0) {
    float *src = aligned_alloc(64, sizeof(float) * COPY_FLOATS);
    float *dst = aligned_alloc(64, sizeof(float) * COPY_FLOATS);
    if (src == NULL || dst == NULL) {
      fprintf(stderr, "out of memory\n");
      return 1;
    }
    for (long i = 0; i < COPY_FLOATS; i++) src[i] = dst[i] = 1e-9f;
    long copies = 50;
    blocked_copy(src, dst, 2); /* warm: both buffers in cache, as a layer called repeatedly */
    double start = now();
    float sink = blocked_copy(src, dst, copies);
    double ms = (now() - start) / copies * 1e3;
    printf("{\"mode\": \"copy\", \"ms\": %.4f, \"bytes\": %ld, \"sink\": %g}\n", ms,
           (long)sizeof(float) * COPY_FLOATS, sink);
    free(src);
    free(dst);
    return 0;
  }
  int temporal = strcmp(mode, "broadcast") == 0 || strcmp(mode, "quads") == 0 ||
                 strcmp(mode, "blocked") == 0;
#if WIDTH != 8
  if (strcmp(mode, "broadcast") == 0) {
    fprintf(stderr, "mode broadcast is AVX2 code: build with -DWIDTH=8\n");
    return 2;
  }
#endif
  /* Each temporal mode does 16 x 14 positions x 288 entries x 8 channels FMAs per pass, quads
   * and blocked in 14 / (their block's positions) passes of their block. */
  long passes = temporal ? WORK / (16L * 14 * QUADS * 4) : WORK / ((long)ENTRIES * LANES * VECTORS);
  long positions = 0, input_bytes = sizeof input;
  double start = now(), flops;
  float sink;
  if (strcmp(mode, "blocked") == 0) {
    sink = blocked(passes);
    positions = BLOCKED_POSITIONS * (passes * 14 / BLOCKED_POSITIONS);
    input_bytes = sizeof blocked_inputs;
  } else if (strcmp(mode, "quads") == 0) {
    sink = quads(passes);
    positions = QUAD_POSITIONS * (passes * 14 / QUAD_POSITIONS);
    input_bytes = sizeof pixels;
#if WIDTH == 8
  } else if (strcmp(mode, "broadcast") == 0) {
    sink = broadcast(passes);
    positions = 14 * passes;
    input_bytes = sizeof pixels;
#endif
  } else if (strcmp(mode, "swept") == 0) {
    sink = swept(passes);
    input_bytes = sizeof swept_input;
  } else {
    sink = strcmp(mode, "peak") == 0 ? peak(passes) : entries(passes);
    if (strcmp(mode, "peak") == 0) input_bytes = 0;
  }
  flops = temporal ? 2.0 * 8 * GROUPS * QUADS * 4 * positions
                   : 2.0 * WIDTH * passes * ENTRIES * LANES * VECTORS;
  double seconds = now() - start;
  printf("{\"mode\": \"%s\", \"lanes\": %d, \"vectors\": %d, \"gflops\": %.2f, "
         "\"input_bytes\": %ld, \"sink\": %g}\n",
         mode, LANES, VECTORS, flops / seconds / 1e9, input_bytes, sink);
  return 0;
}
