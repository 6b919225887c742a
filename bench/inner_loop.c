/* The sparse CPU kernel's inner loop, alone, on one core: how close to the FMA peak can a block
 * of LANES output channels x VECTORS vectors of positions get, with every input in L1?
 *
 * Per entry of a list (as the generated code does): load the entry's input offset, load VECTORS
 * input vectors from there, broadcast each of the LANES packed weights once, issue LANES x VECTORS
 * FMAs. Mode "aligned" rounds every offset down to a whole vector (no load straddles two cache
 * lines; a 3-wide kernel's real offsets cannot all be). Mode "peak" runs the same number of
 * independent FMAs on registers only (no loads): the core's FMA peak. Built and run by inner_loop_ceiling.py with -DLANES=.. -DVECTORS=.. .
 */
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define ENTRIES 84  /* a chunk's list per group in C3D conv3b at 26 % kept */
#define WINDOW 4096 /* floats the offsets spread over: 16 KiB, the input chunk in L1 */
#define WORK 400000000L

static float input[WINDOW + 64] __attribute__((aligned(64)));
static float weights[ENTRIES * LANES] __attribute__((aligned(64)));
static int offsets[ENTRIES];

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static float reduce(__m256 acc[LANES][VECTORS]) {
  __m256 s = _mm256_setzero_ps();
  for (int l = 0; l < LANES; l++)
    for (int v = 0; v < VECTORS; v++) s = _mm256_add_ps(s, acc[l][v]);
  float out[8];
  _mm256_storeu_ps(out, s);
  return out[0];
}

__attribute__((noinline)) static float entries(long passes) {
  __m256 acc[LANES][VECTORS];
  for (int l = 0; l < LANES; l++)
    for (int v = 0; v < VECTORS; v++) acc[l][v] = _mm256_setzero_ps();
  for (long p = 0; p < passes; p++) {
    const float *w = weights;
    for (int e = 0; e < ENTRIES; e++, w += LANES) {
      const float *in = input + offsets[e];
      __m256 x[VECTORS];
#pragma GCC unroll 16
      for (int v = 0; v < VECTORS; v++) x[v] = _mm256_loadu_ps(in + 8 * v);
#pragma GCC unroll 16
      for (int l = 0; l < LANES; l++) {
        __m256 b = _mm256_broadcast_ss(w + l);
#pragma GCC unroll 16
        for (int v = 0; v < VECTORS; v++) acc[l][v] = _mm256_fmadd_ps(b, x[v], acc[l][v]);
      }
    }
  }
  return reduce(acc);
}

/* Distinct starting values: equal chains were folded into one by the compiler. */
__attribute__((noinline)) static float peak(long passes) {
  __m256 acc[LANES][VECTORS];
  for (int l = 0; l < LANES; l++)
    for (int v = 0; v < VECTORS; v++) acc[l][v] = _mm256_set1_ps(1e-9f * (1 + l * VECTORS + v));
  __m256 b = _mm256_set1_ps(1e-9f);
  for (long p = 0; p < passes * ENTRIES; p++) {
#pragma GCC unroll 16
    for (int l = 0; l < LANES; l++)
#pragma GCC unroll 16
      for (int v = 0; v < VECTORS; v++) acc[l][v] = _mm256_fmadd_ps(b, acc[l][v], b);
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
    offsets[e] = rand() % (WINDOW - 8 * VECTORS);
    if (aligned) offsets[e] &= ~7;
  }
  long passes = WORK / ((long)ENTRIES * LANES * VECTORS);
  int is_peak = strcmp(mode, "peak") == 0;
  double start = now();
  float sink = is_peak ? peak(passes) : entries(passes);
  double seconds = now() - start;
  double flops = 16.0 * passes * ENTRIES * LANES * VECTORS;
  printf("{\"mode\": \"%s\", \"lanes\": %d, \"vectors\": %d, \"gflops\": %.2f, \"sink\": %g}\n",
         mode, LANES, VECTORS, flops / seconds / 1e9, sink);
  return 0;
}
