// The fused CPU kernel's inner loop alone, with its key vectors read three ways: what aligning them would buy.
//
//     g++ -O2 -march=native bench/window_loads.cpp -o /tmp/window_loads && /tmp/window_loads
//
// One channel of one run of 7 window offsets for two blocks of 16 queries (XB = 2, as in run_dots of
// common/ops/csrc/neighborhood_cpu.cpp): 14 multiply-adds, with and without adding the relative embedding to the
// key first (acc += q * (k + rel) against acc += q * k), the data in L1. The key vector of offset dx is read
//   - "unaligned":      at a 4-byte step per offset, as the kernel does (pixels in the lanes): most loads straddle
//                       two cache lines;
//   - "shifted":        as three aligned vectors per channel, shifted in registers (valignd) per offset;
//   - "32-byte steps":  at a 32-byte step per offset, as a layout with 8 heads of one pixel in the lanes would
//                       read them (2 pixels x 8 heads per 16-lane vector);
//   - "none":           not read (a vector kept in a register): the multiply-adds' own rate.
// Needs AVX-512 (the kernel's build on this machine); prints ns per run and channel (median of 5 passes).
//
// Then the loop the kernel runs where the windows of consecutive query rows are whole (rows_dots): 1, 2 or 3 query
// rows of one 16-query block, each key vector read once for all of them (key row y + t is window row t - i of
// query row y + i, each row adding its own embedding entry), against the one-row loop above; ns per multiply-add.

#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace {

enum class Read { unaligned, shifted, step32, none };

#define NA_SHIFT(lo, hi, dx) \
  _mm512_castsi512_ps(_mm512_alignr_epi32(_mm512_castps_si512(hi), _mm512_castps_si512(lo), dx))

// one pass of `iterations` runs; rel is read from memory, as the kernel reads the embedding
template <Read READ, bool REL>
double ns_per_run(const float* buf, float* sink) {
  __m512 acc[14];
  for (int i = 0; i < 14; ++i) acc[i] = _mm512_setzero_ps();
  const long iterations = 10000000;
  const auto start = std::chrono::steady_clock::now();
  for (long it = 0; it < iterations; ++it) {
    const float* k = buf + (it & 63) * 48;  // 64 rows of 48 floats: 12 KiB, in L1
    const float* rel = buf + 8192 + (it & 7);
    const float* q = buf + 4096 + (it & 63) * 32;  // the two blocks' query vectors of this channel
    const __m512 q0 = _mm512_load_ps(q), q1 = _mm512_load_ps(q + 16);
    if constexpr (READ == Read::shifted) {
      const __m512 a0 = _mm512_load_ps(k), a1 = _mm512_load_ps(k + 16), a2 = _mm512_load_ps(k + 32);
#define NA_STEP(dx)                                                                                 \
  {                                                                                                 \
    __m512 k0 = dx == 0 ? a0 : NA_SHIFT(a0, a1, dx), k1 = dx == 0 ? a1 : NA_SHIFT(a1, a2, dx);     \
    if (REL) {                                                                                      \
      const __m512 r = _mm512_set1_ps(rel[dx]);                                                     \
      k0 = _mm512_add_ps(k0, r), k1 = _mm512_add_ps(k1, r);                                         \
    }                                                                                               \
    acc[dx] = _mm512_fmadd_ps(q0, k0, acc[dx]);                                                     \
    acc[7 + dx] = _mm512_fmadd_ps(q1, k1, acc[7 + dx]);                                             \
  }
      NA_STEP(0) NA_STEP(1) NA_STEP(2) NA_STEP(3) NA_STEP(4) NA_STEP(5) NA_STEP(6)
#undef NA_STEP
    } else if constexpr (READ == Read::none) {
#pragma GCC unroll 7
      for (int dx = 0; dx < 7; ++dx) {
        __m512 k0 = q1, k1 = q0;
        asm("" : "+v"(k0), "+v"(k1));
        if constexpr (REL) {
          const __m512 r = _mm512_set1_ps(rel[dx]);
          k0 = _mm512_add_ps(k0, r), k1 = _mm512_add_ps(k1, r);
        }
        acc[dx] = _mm512_fmadd_ps(q0, k0, acc[dx]);
        acc[7 + dx] = _mm512_fmadd_ps(q1, k1, acc[7 + dx]);
      }
    } else {
      constexpr int step = READ == Read::unaligned ? 1 : 8, second = READ == Read::unaligned ? 16 : 64;
#pragma GCC unroll 7
      for (int dx = 0; dx < 7; ++dx) {
        __m512 k0 = _mm512_loadu_ps(k + step * dx), k1 = _mm512_loadu_ps(k + second + step * dx);
        if constexpr (REL) {
          const __m512 r = _mm512_set1_ps(rel[dx]);
          k0 = _mm512_add_ps(k0, r), k1 = _mm512_add_ps(k1, r);
        }
        acc[dx] = _mm512_fmadd_ps(q0, k0, acc[dx]);
        acc[7 + dx] = _mm512_fmadd_ps(q1, k1, acc[7 + dx]);
      }
    }
  }
  const double ns = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - start).count();
  for (int i = 0; i < 14; ++i) sink[i] += _mm512_reduce_add_ps(acc[i]);
  return ns / iterations;
}

// one pass of `iterations` runs of 7 offsets for ROWS query rows of one block sharing each key vector, q . (k + rel)
template <int ROWS>
double ns_per_run_rows(const float* buf, float* sink) {
  __m512 acc[ROWS][7];
  for (int i = 0; i < ROWS; ++i)
    for (int dx = 0; dx < 7; ++dx) acc[i][dx] = _mm512_setzero_ps();
  const long iterations = 10000000;
  const auto start = std::chrono::steady_clock::now();
  for (long it = 0; it < iterations; ++it) {
    const float* k = buf + (it & 63) * 48;
    const float* rel = buf + 8192 + (it & 7);
    const float* q = buf + 4096 + (it & 63) * 48;
    __m512 qv[ROWS];
#pragma GCC unroll 3
    for (int i = 0; i < ROWS; ++i) qv[i] = _mm512_load_ps(q + 16 * i);
#pragma GCC unroll 7
    for (int dx = 0; dx < 7; ++dx) {
      __m512 kv = _mm512_loadu_ps(k + dx);
      asm("" : "+v"(kv));  // one load for all rows (the compiler would fold it into each add)
#pragma GCC unroll 3
      for (int i = 0; i < ROWS; ++i) {
        acc[i][dx] = _mm512_fmadd_ps(qv[i], _mm512_add_ps(kv, _mm512_set1_ps(rel[dx + 8 * i])), acc[i][dx]);
      }
    }
  }
  const double ns = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - start).count();
  for (int i = 0; i < ROWS; ++i)
    for (int dx = 0; dx < 7; ++dx) sink[dx] += _mm512_reduce_add_ps(acc[i][dx]);
  return ns / iterations;
}

// the median of 5 passes of one of the loops above
double median_of_5(double (*pass)(const float*, float*), const float* buf, float* sink) {
  std::vector<double> times;
  for (int i = 0; i < 5; ++i) times.push_back(pass(buf, sink));
  std::sort(times.begin(), times.end());
  return times[2];
}

}  // namespace

int main() {
  float* buf = static_cast<float*>(std::aligned_alloc(64, 16384 * sizeof(float)));  // keys, queries, rel
  for (int i = 0; i < 16384; ++i) buf[i] = 1e-3f * static_cast<float>(i % 17);
  float sink[14] = {};
  std::printf("ns per run of 7 offsets x 2 blocks (14 multiply-adds), one channel, data in L1, median of 5\n");
  std::printf("%-16s %8s %12s\n", "key read", "q . k", "q . (k+rel)");
  std::printf("%-16s %8.2f %12.2f\n", "unaligned", median_of_5(ns_per_run<Read::unaligned, false>, buf, sink),
              median_of_5(ns_per_run<Read::unaligned, true>, buf, sink));
  std::printf("%-16s %8.2f %12.2f\n", "shifted", median_of_5(ns_per_run<Read::shifted, false>, buf, sink),
              median_of_5(ns_per_run<Read::shifted, true>, buf, sink));
  std::printf("%-16s %8.2f %12.2f\n", "32-byte steps", median_of_5(ns_per_run<Read::step32, false>, buf, sink),
              median_of_5(ns_per_run<Read::step32, true>, buf, sink));
  std::printf("%-16s %8.2f %12.2f\n", "none", median_of_5(ns_per_run<Read::none, false>, buf, sink),
              median_of_5(ns_per_run<Read::none, true>, buf, sink));
  std::printf("\nq . (k+rel), ns per multiply-add: query rows sharing each key vector (one block), or one row of\n"
              "two blocks (the loop above)\n");
  std::printf("%-16s %8.3f\n", "1 row x 2 blocks", median_of_5(ns_per_run<Read::unaligned, true>, buf, sink) / 14);
  std::printf("%-16s %8.3f\n", "2 rows", median_of_5(ns_per_run_rows<2>, buf, sink) / 14);
  std::printf("%-16s %8.3f\n", "3 rows", median_of_5(ns_per_run_rows<3>, buf, sink) / 21);
  float total = 0;
  for (float v : sink) total += v;
  std::printf("(checksum %.3g)\n", total);
  std::free(buf);
  return 0;
}
