// Fused neighbourhood attention for the CPU: forward and backward in one pass each over the image, no
// k*k-expanded tensor and no GEMM on halo keys. Built on first use by common/ops/jit_build.py and wrapped
// by common/ops/neighborhood_cpu.py (which documents the method); the oracle is `reference_attention` in
// common/ops/neighborhood.py.
//
// Vectorisation runs along image rows: one SIMD vector holds L consecutive query pixels of one channel, so
// every dot product of the window is a vertical multiply-add and no horizontal reduction is needed in the
// inner loops. Each work item first copies the rows it reads into channel-major planes (C, hk, wk), zero-
// padded by r = k // 2 on every side and with rows rounded up to whole vectors (or to half of one, which a
// kernel of half the width computes), so a window read never needs a bounds check. Unless a window_mask has
// zero columns to skip, three (or two) consecutive query rows are computed at once, one vector of each, and
// each key and value vector read serves all of them (see rows_dots). Otherwise two neighbouring vectors of one
// row are processed together where the row is long enough, which doubles the independent accumulator chains
// and shares every relative-embedding broadcast.
//
// Threads: torch's thread count, on a pool of our own whose threads sleep while idle (see Pool); one task
// per pass. The forward pass hands out (plane, row band) items; the backward pass hands out (batch, head)
// planes, each processed in the same order whatever the thread count, so the backward pass is deterministic
// (bitwise, for any number of threads).

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/library.h>

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <new>
#include <system_error>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace {

#ifndef NA_VBYTES
#if defined(__AVX512F__)
#define NA_VBYTES 64
#elif defined(__AVX__)
#define NA_VBYTES 32
#else
#define NA_VBYTES 16
#endif
#endif

// Simd<T, VB>::V: a vector of VB bytes of T. Rows are processed VB / sizeof(T) pixels at a time: the widest
// vectors the CPU has (NA_VBYTES), and half of one for the last pixels of a row where they fit in it (Geo).
template <typename T, int VB>
struct Simd {
  typedef T V __attribute__((vector_size(VB)));
};

// Unaligned loads and stores through a vector type that aliases its element type only (so that stores do not
// make the compiler reload unrelated integers, as memcpy would).
template <typename V, typename T>
inline V loadu(const T* p) {
  typedef T U __attribute__((vector_size(sizeof(V)), aligned(sizeof(T))));
  return *reinterpret_cast<const U*>(p);
}

template <typename V, typename T>
inline void storeu(T* p, const V& v) {
  typedef T U __attribute__((vector_size(sizeof(V)), aligned(sizeof(T))));
  *reinterpret_cast<U*>(p) = v;
}

// Keeps v in a register, so that one load serves several multiply-adds (a compiler folds the load into each
// of them as a memory operand, which reads the memory again).
template <typename V>
inline void in_register(V& v) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  asm("" : "+v"(v));
#endif
}

// acc + a * b with one rounding where the CPU has fused multiply-adds. Every dot-product loop uses it, so that the
// loops that can compute the same logits (one query row alone, or rows together; the backward pass recomputes the
// forward's, whichever loop each used) give bitwise the same sums: left to the compiler's contraction of a * b + c,
// one loop was fused and another not in an AVX2 build, and P = 1 of a one-offset window came back as 1 + 1e-7,
// whose dS should be exactly 0.
#define NA_FMADD(PREFIX, VF, VD)                                                                         \
  {                                                                                                      \
    if constexpr (std::is_same_v<std::remove_cv_t<std::remove_reference_t<decltype(a[0])>>, float>) {    \
      return __builtin_bit_cast(V, PREFIX##_fmadd_ps(__builtin_bit_cast(VF, a), __builtin_bit_cast(VF, b), \
                                                     __builtin_bit_cast(VF, acc)));                      \
    } else {                                                                                             \
      return __builtin_bit_cast(V, PREFIX##_fmadd_pd(__builtin_bit_cast(VD, a), __builtin_bit_cast(VD, b), \
                                                     __builtin_bit_cast(VD, acc)));                      \
    }                                                                                                    \
  }

template <typename V>
inline V madd(const V& acc, const V& a, const V& b) {
#if defined(__AVX512F__)
  if constexpr (sizeof(V) == 64) NA_FMADD(_mm512, __m512, __m512d)
#endif
#if defined(__FMA__)
  if constexpr (sizeof(V) == 32) NA_FMADD(_mm256, __m256, __m256d)
  if constexpr (sizeof(V) == 16) NA_FMADD(_mm, __m128, __m128d)
#endif
  return acc + a * b;  // no fused multiply-add on this CPU: nothing to contract either
}
#undef NA_FMADD

// out[i] = in[i] for the n < L elements of a row's end (or of a row shorter than a vector), touching no memory
// past them: with AVX-512, one masked load and store; elsewhere one by one. (Copied one by one, rows shorter than a
// vector made the copies into padded planes a quarter of a call's time on 8x8 maps with 64-channel heads.)
template <typename V, typename T>
inline void copy_short(const T* in, T* out, int64_t n) {
#if defined(__AVX512F__)
  if constexpr (sizeof(V) == 64 && std::is_same_v<T, float>) {
    const auto m = static_cast<__mmask16>((1u << n) - 1);
    _mm512_mask_storeu_ps(out, m, _mm512_maskz_loadu_ps(m, in));
    return;
  } else if constexpr (sizeof(V) == 64 && std::is_same_v<T, double>) {
    const auto m = static_cast<__mmask8>((1u << n) - 1);
    _mm512_mask_storeu_pd(out, m, _mm512_maskz_loadu_pd(m, in));
    return;
  }
#endif
  for (int64_t i = 0; i < n; ++i) out[i] = in[i];
}

template <typename V, typename T>
inline void store_n(T* p, V v, int64_t n) {  // the first n lanes
  if (n * static_cast<int64_t>(sizeof(T)) >= static_cast<int64_t>(sizeof(V))) {
    storeu(p, v);
  } else if (n > 0) {
    std::memcpy(p, &v, n * sizeof(T));
  }
}

// the sum of a vector's lanes, pairwise (halves added until one lane is left): a few vector adds, where a
// lane-by-lane sum is a chain of scalar adds; called per plane for each entry of d rel_pos and d window_mask
template <typename V>
inline auto hsum(const V& v) {
  using T = std::remove_cv_t<std::remove_reference_t<decltype(v[0])>>;
  if constexpr (sizeof(V) == sizeof(T)) {
    return v[0];
  } else {
    typedef T H __attribute__((vector_size(sizeof(V) / 2)));
    H lo, hi;
    std::memcpy(&lo, &v, sizeof(H));
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(H), sizeof(H));
    return hsum(lo + hi);
  }
}

// exp of a float vector, where AVX-512 (with DQ) has it: 2^y = 2^floor(y) 2^f for y = x log2 e, f = y - floor(y)
// in [0, 1) from one vreduceps; 2^f from a degree-6 polynomial (relative error 2e-9 before rounding), 2^floor(y)
// applied by scalef (which also gives 0 for exp(-inf), clamped to exp(-120), and inf on overflow). y is rounded
// once, which costs e^x a relative error of about 6e-8 |y|; for the x <= 0 the softmax takes, that is at most
// 8e-8 absolute over [-100, 0] (measured, against 6e-8 for a two-part reduction, which takes two more operations:
// fwd+bwd 0.98-0.99x with this one).
#define NA_EXP_AVX512(W, VT)                                                                           \
  do {                                                                                                 \
    const VT x = _mm##W##_max_ps(reinterpret_cast<const VT&>(v), _mm##W##_set1_ps(-120.0f));           \
    const VT y = _mm##W##_mul_ps(x, _mm##W##_set1_ps(1.44269504088896341f));                           \
    const VT f = _mm##W##_reduce_ps(y, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);                     \
    VT p = _mm##W##_set1_ps(2.1612919226754457e-04f);                                                  \
    p = _mm##W##_fmadd_ps(p, f, _mm##W##_set1_ps(1.2467845808714628e-03f));                            \
    p = _mm##W##_fmadd_ps(p, f, _mm##W##_set1_ps(9.675451554358006e-03f));                             \
    p = _mm##W##_fmadd_ps(p, f, _mm##W##_set1_ps(5.5485282093286514e-02f));                            \
    p = _mm##W##_fmadd_ps(p, f, _mm##W##_set1_ps(2.402293086051941e-01f));                             \
    p = _mm##W##_fmadd_ps(p, f, _mm##W##_set1_ps(6.931470632553101e-01f));                             \
    p = _mm##W##_fmadd_ps(p, f, _mm##W##_set1_ps(1.0f));                                               \
    const VT e = _mm##W##_scalef_ps(p, y);                                                             \
    return reinterpret_cast<const V&>(e);                                                              \
  } while (0)

// exp of a vector: the above where it applies; otherwise for floats the Cephes expf polynomial (about 1 ulp,
// exactly 0 below -87.3 so that exp(-inf) = 0); for doubles (tests and fp64 users) libm's exp per lane, as
// exactness matters there, not speed.
template <typename V>
inline V vexp(V v) {
  using T = std::remove_cv_t<std::remove_reference_t<decltype(v[0])>>;
  if constexpr (std::is_same_v<T, double>) {
    for (size_t i = 0; i < sizeof(V) / sizeof(double); ++i) v[i] = std::exp(v[i]);
    return v;
  } else {
#if defined(__AVX512F__) && defined(__AVX512DQ__)
    if constexpr (sizeof(V) == 64) NA_EXP_AVX512(512, __m512);
#endif
#if defined(__AVX512F__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
    if constexpr (sizeof(V) == 32) NA_EXP_AVX512(256, __m256);
#endif
    typedef int32_t I __attribute__((vector_size(sizeof(V))));
    V x = v;
    const auto under = x < -87.33654f;
    x = x > 88.0f ? V{} + 88.0f : x;
    x = under ? V{} - 87.0f : x;
    V fx = x * 1.44269504088896341f + 0.5f;
    I n = __builtin_convertvector(fx, I);  // truncates; make it floor
    V fn = __builtin_convertvector(n, V);
    n = fn > fx ? n - 1 : n;
    fn = __builtin_convertvector(n, V);
    x = x - fn * 0.693359375f;
    x = x - fn * -2.12194440e-4f;
    V y = V{} + 1.9875691500e-4f;
    y = y * x + 1.3981999507e-3f;
    y = y * x + 8.3334519073e-3f;
    y = y * x + 4.1665795894e-2f;
    y = y * x + 1.6666665459e-1f;
    y = y * x + 5.0000001201e-1f;
    y = y * (x * x) + x + 1.0f;
    const I bits = (n + 127) << 23;
    y = y * __builtin_bit_cast(V, bits);
    return under ? V{} : y;
  }
}
#undef NA_EXP_AVX512

// Row length of the saved softmax statistics: whole vectors of any width (so that the shape does not depend on
// the vector width, and a fake tensor can be made without knowing it).
constexpr int64_t STATS_ALIGN = 16;
inline int64_t stats_width(int64_t w) { return (w + STATS_ALIGN - 1) / STATS_ALIGN * STATS_ALIGN; }

// The geometry of one call. Padded planes are (C, hk, wk) with the image at rows [r, r + h), columns
// [r, r + w); hk = h + 2r, wk = wq + 2r. A row is `blocks` vectors of `lanes` pixels, then, where the last few
// pixels fit in half a vector (and the CPU has vectors half as wide), one of those (`half`): a row of 56
// pixels is three vectors of 16 and one of 8, not four of 16 with 8 lanes of padding. wq: the pixels they cover.
struct Geo {
  int64_t batch, heads, bh, d, dv, h, w, k, r, kk, lanes, blocks, wq, hk, wk, plane, ws;
  bool half, border_mask;

  Geo(int64_t batch_, int64_t heads_, int64_t d_, int64_t dv_, int64_t h_, int64_t w_, int64_t k_, int64_t lanes_,
      bool half_vectors, bool border_mask_)
      : batch(batch_), heads(heads_), bh(batch_ * heads_), d(d_), dv(dv_), h(h_), w(w_), k(k_), r(k_ / 2),
        kk(k_ * k_), lanes(lanes_), border_mask(border_mask_) {
    const int64_t rest = w % lanes;
    half = half_vectors && rest > 0 && 2 * rest <= lanes;
    blocks = half ? w / lanes : (w + lanes - 1) / lanes;
    wq = blocks * lanes + (half ? lanes / 2 : 0);
    ws = stats_width(w);
    hk = h + 2 * r;
    wk = wq + 2 * r;
    plane = hk * wk;
  }
};

// For each head and window row dy, the columns [lo, hi) whose window_mask is non-zero (every column without a
// mask, or when every offset is needed for the mask's gradient).
struct Ranges {
  std::vector<int64_t> lo, hi;
  template <typename T>
  Ranges(const Geo& g, const T* mask, bool all) : lo(g.heads * g.k, 0), hi(g.heads * g.k, g.k) {
    if (mask == nullptr || all) return;
    for (int64_t head = 0; head < g.heads; ++head) {
      for (int64_t dy = 0; dy < g.k; ++dy) {
        int64_t a = g.k, b = 0;
        for (int64_t dx = 0; dx < g.k; ++dx) {
          if (mask[head * g.kk + dy * g.k + dx] != T(0)) {
            a = std::min(a, dx);
            b = dx + 1;
          }
        }
        lo[head * g.k + dy] = a < b ? a : 0;
        hi[head * g.k + dy] = a < b ? b : 0;
      }
    }
  }
  bool whole(const Geo& g) const {  // every column of every window row
    for (size_t i = 0; i < lo.size(); ++i)
      if (lo[i] != 0 || hi[i] != g.k) return false;
    return true;
  }
};

// The window entries of one query row: runs of at most MAX_RUN consecutive offsets of one window row, or of
// the same short columns of up to 3 consecutive rows (so that a run's keys and embeddings sit at constant
// distances from one pointer, and a run has enough independent accumulators), and the entries one by one.
constexpr int MAX_RUN = 8, MAX_RUN_AREA = 9;
// The most query rows computed at once (see rows_dots), each key and value vector read serving all of them: three
// with AVX-512's 32 vector registers (four would need more accumulators than that), two with the 16 of AVX2 or
// SSE, where three rows' accumulators spill (in an AVX2 build on this CPU, two rows took 0.93-0.99x the time of
// three).
constexpr int ROWS = NA_VBYTES >= 64 ? 3 : 2;

struct Window {
  struct Run {
    int64_t off, o, n, rows;  // first key's position relative to the block's padded corner; first offset;
  };                          // columns; rows
  std::vector<Run> runs;
  std::vector<int64_t> off, o, dx;  // per entry
  int64_t n = 0;

  explicit Window(int64_t kk) : off(kk), o(kk), dx(kk) { runs.reserve(kk); }

  // rows [dy0, dy1), columns ranges[head] of each row; key (y + dy - r, x + dx - r) sits at padded
  // (y + dy, x + dx), so off = dy * wk + dx from the block's padded position (y, xb).
  void build(const Geo& g, const Ranges& ranges, int64_t head, int64_t dy0, int64_t dy1) {
    runs.clear();
    n = 0;
    for (int64_t dy = dy0; dy < dy1; ++dy) {
      const int64_t lo = ranges.lo[head * g.k + dy], hi = ranges.hi[head * g.k + dy];
      const int64_t len = hi - lo, pieces = (len + MAX_RUN - 1) / MAX_RUN;
      for (int64_t piece = 0, dx = lo; piece < pieces; ++piece) {
        const int64_t size = (len - (dx - lo) + (pieces - piece) - 1) / (pieces - piece);  // near-equal pieces
        Run* last = runs.empty() ? nullptr : &runs.back();
        if (pieces == 1 && last != nullptr && last->n == size && last->o + last->rows * g.k == dy * g.k + dx &&
            (last->rows + 1) * size <= MAX_RUN_AREA && last->rows < 3) {
          ++last->rows;  // the same columns one row down: one run of more rows
        } else {
          runs.push_back({dy * g.wk + dx, dy * g.k + dx, size, 1});
        }
        dx += size;
      }
      for (int64_t x = lo; x < hi; ++x) {
        off[n] = dy * g.wk + x;
        o[n] = dy * g.k + x;
        dx[n] = x;
        ++n;
      }
    }
  }
};

// rows dy of the window of query row y that lie in the image (border="mask"), or all of them ("zeros")
inline void window_rows(const Geo& g, int64_t y, int64_t& dy0, int64_t& dy1) {
  if (g.border_mask) {
    dy0 = std::max<int64_t>(0, g.r - y);
    dy1 = std::min<int64_t>(g.k, g.h + g.r - y);
  } else {
    dy0 = 0;
    dy1 = g.k;
  }
}

// the key rows y + t, t in [t0, t1), that the windows of `rows` query rows from y take: those in the image for
// border="mask" (the others are the planes' zero padding, outside every window), all of them for "zeros"
inline void key_rows(const Geo& g, int64_t y, int64_t rows, int64_t& t0, int64_t& t1) {
  t0 = 0;
  t1 = g.k + rows - 1;
  if (g.border_mask) {
    t0 = std::max<int64_t>(t0, g.r - y);
    t1 = std::min<int64_t>(t1, g.h + g.r - y);
  }
}

// Worker threads of our own, which wait on a condition variable between tasks (never spin): with OpenMP's
// default wait policy, on a machine whose cores are busy with other processes, threads that spin at barriers
// and after every region make an op slower by a factor (the tiled backend, all ATen ops, about 4x), which
// this kernel must not be. The thread count is torch's (at::get_num_threads(), read at every call).
class Pool {
 public:
  static Pool& get() {
    static Pool* pool = [] {
      auto* p = new Pool();  // never destroyed: detached workers may outlive static destructors
      pthread_atfork(nullptr, nullptr, [] { new (&Pool::get()) Pool(); });  // the child has no workers
      return p;
    }();
    return *pool;
  }

  // task(t) for t in [0, threads), t = 0 on the calling thread; returns when all are done
  void run(int64_t threads, const std::function<void(int64_t)>& task) {
    std::lock_guard<std::mutex> one_at_a_time(run_mu_);
    std::exception_ptr error;
    {
      std::lock_guard<std::mutex> lock(mu_);
      while (started_ < threads - 1) {
        try {
          std::thread([this, index = started_ + 1, seen = generation_] { work(index, seen); }).detach();
        } catch (const std::system_error&) {  // out of threads: go on with those there are
          threads = started_ + 1;
          break;
        }
        ++started_;
      }
      task_ = &task;
      wanted_ = threads;
      pending_ = threads - 1;
      error_ = nullptr;
      ++generation_;
    }
    wake_.notify_all();
    try {
      task(0);
    } catch (...) {
      error = std::current_exception();
    }
    std::unique_lock<std::mutex> lock(mu_);
    done_.wait(lock, [this] { return pending_ == 0; });
    task_ = nullptr;
    if (!error) error = error_;
    lock.unlock();
    if (error) std::rethrow_exception(error);
  }

 private:
  void work(int64_t index, int64_t seen) {  // seen: the last generation before this worker existed
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      wake_.wait(lock, [&] { return generation_ != seen; });
      seen = generation_;
      if (index >= wanted_) continue;
      const auto* task = task_;
      lock.unlock();
      std::exception_ptr error;
      try {
        (*task)(index);
      } catch (...) {
        error = std::current_exception();
      }
      lock.lock();
      if (error && !error_) error_ = error;
      if (--pending_ == 0) done_.notify_one();
    }
  }

  std::mutex run_mu_, mu_;
  std::condition_variable wake_, done_;
  const std::function<void(int64_t)>* task_ = nullptr;
  std::exception_ptr error_;
  int64_t started_ = 0, wanted_ = 0, pending_ = 0, generation_ = 0;
};

// Runs item(state, i) for every i in [0, n) on torch's number of threads, each thread taking the next item
// from a shared counter when it is free and keeping one `State` for all its items, so a thread that the OS
// deschedules under load holds up only the item it is on. Which thread computes an item never changes the
// item's result. Inside an (OpenMP) parallel region, or with one thread, it runs on the calling thread.
template <typename State, typename Item>
void parallel_items(int64_t n, const std::function<State()>& make_state, const Item& item) {
  std::atomic<int64_t> next{0};
  auto task = [&](int64_t) {
    State state = make_state();
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) item(state, i);
  };
  const int64_t threads = at::in_parallel_region() ? 1 : std::min<int64_t>(at::get_num_threads(), n);
  if (threads <= 1) {
    task(0);
  } else {
    Pool::get().run(threads, task);
  }
}

// Output rows are requested for writing a few query rows before the stores that fill them. An output line is
// rarely in the cache when its row is stored (a step's outputs and inputs outgrow it), and a store that misses
// holds up the stores behind it: asked for early, the lines arrive while the rows before them compute (fwd+bwd
// 0.94-0.99x on 32x32 maps, 0.91-0.95x at k=3). Rows shorter than a cache line are left to the hardware, as
// neighbouring rows share lines.
constexpr int64_t WRITE_AHEAD = 2;

// f(row) for the output rows to request at query row y of the rows [first, end) an item computes: at its first
// row, that row and the WRITE_AHEAD after it; at each later row, the one WRITE_AHEAD rows on.
template <typename F>
inline void rows_ahead(int64_t y, int64_t first, int64_t end, const F& f) {
  for (int64_t ya = y == first ? y : y + WRITE_AHEAD; ya <= y + WRITE_AHEAD && ya < end; ++ya) f(ya);
}

template <typename T>
inline void prefetch_for_write(T* row, int64_t channels, int64_t channel_stride, int64_t w) {
  const int64_t bytes = w * static_cast<int64_t>(sizeof(T));
  if (bytes < 64) return;
  for (int64_t c = 0; c < channels; ++c) {
    const char* line = reinterpret_cast<const char*>(row + c * channel_stride);
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(line + b, 1, 3);
    __builtin_prefetch(line + bytes - 1, 1, 3);
  }
}

// A (B, heads, H, W, C) input, any strides and floating dtype; read plane by plane into padded buffers.
struct Source {
  const void* data = nullptr;
  at::ScalarType dtype = at::kFloat;
  int64_t heads = 1, c = 0, sb = 0, sh = 0, sy = 0, sx = 0, sc = 0;
  Source() = default;
  explicit Source(const at::Tensor& t)
      : data(t.const_data_ptr()), dtype(t.scalar_type()), heads(t.size(1)), c(t.size(4)), sb(t.stride(0)),
        sh(t.stride(1)), sy(t.stride(2)), sx(t.stride(3)), sc(t.stride(4)) {}
  bool defined() const { return data != nullptr; }
};

template <typename T, typename S>
void pack_rows_as(const S* src, const Source& s, const Geo& g, int64_t p, int64_t row0, int64_t row1, T* dst) {
  using V = typename Simd<T, NA_VBYTES>::V;
  constexpr int64_t L = sizeof(V) / sizeof(T);
  const S* base = src + (p / s.heads) * s.sb + (p % s.heads) * s.sh;
  const int64_t y0 = std::max<int64_t>(row0 - g.r, 0), y1 = std::min<int64_t>(row1 - g.r, g.h);
  const auto prefetch = [&](int64_t c) {  // the channel's source rows: copying is bound by memory latency
    if (c >= s.c) return;
    const char* sp = reinterpret_cast<const char*>(base + c * s.sc);
    for (int64_t y = y0; y < y1; ++y) {
      const char* row = sp + y * s.sy * static_cast<int64_t>(sizeof(S));
      const int64_t bytes = ((g.w - 1) * s.sx + 1) * static_cast<int64_t>(sizeof(S));
      for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(row + b);
      __builtin_prefetch(row + bytes - 1);
    }
  };
  prefetch(0);
  for (int64_t c = 0; c < s.c; ++c) {
    prefetch(c + 1);
    const S* sp = base + c * s.sc;
    T* dp = dst + c * g.plane;
    for (int64_t y = y0; y < y1; ++y) {
      const S* in = sp + y * s.sy;
      T* to = dp + (y + g.r) * g.wk + g.r;
      int64_t x;
      if constexpr (std::is_same_v<S, T>) {
        if (s.sx == 1) {
          for (x = 0; x + L <= g.w; x += L) storeu(to + x, loadu<V>(in + x));
          if (x < g.w) copy_short<V>(in + x, to + x, g.w - x);
          continue;
        }
      }
      for (x = 0; x < g.w; ++x) to[x] = static_cast<T>(in[x * s.sx]);
    }
  }
}

// the image rows among padded rows [row0, row1) (row = image row + r) of every channel of plane p of s, into the
// (C, hk, wk) plane buffer dst. Only the image is written: the padding around it is zero from dst's allocation
// (one per call and thread) and nothing writes it, so a plane of a few pixels does not pay for zeroing its halo.
template <typename T>
void pack_rows(const Source& s, const Geo& g, int64_t p, int64_t row0, int64_t row1, T* dst) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.dtype, "neighborhood_cpu_pack", [&] {
    pack_rows_as(static_cast<const scalar_t*>(s.data), s, g, p, std::max<int64_t>(row0, 0),
                 std::min<int64_t>(row1, g.hk), dst);
  });
}

// The arguments of the two passes (both vector widths of a call share them).
template <typename T>
struct FwdArgs {
  Source q, k, v;
  const T *rel, *relt, *mask;
  bool rel_per_head;
  T *out, *weights, *stats;  // stats: (2, bh, h, ws): the softmax's max and 1 / sum(e m) per query
};

template <typename T>
struct BwdArgs {
  Source q, k, v, gout;
  const T *gw, *stats, *rel, *relt, *mask;
  bool rel_per_head;
  T *dq, *dk, *dv;  // (bh, C, h, w) or null
  T *drel, *dmask;  // per plane: (bh, kk, d), (bh, kk), or null
};

// The queries that see a key row, as positions relative to a key block: in the P and dS ring (w) and in the
// padded q and grad_out planes (s).
struct KeyEntries {
  std::vector<int64_t> w, s;
  int64_t n = 0;
  explicit KeyEntries(int64_t capacity) : w(capacity), s(capacity) {}
  void add(int64_t ring_pos, int64_t plane_pos) {
    w[n] = ring_pos;
    s[n] = plane_pos;
    ++n;
  }
};

// A thread's padded input planes (zeroed here; pack_rows copies the image in), the window of the current query
// row and, for the backward pass, P and dS of the last 2r + 1 + ROWS query rows: a ring of (kk, wk) rows each
// (query x at column x + r, zero in the r columns either side). The key rows of the gather pass (two at a time)
// read nothing older while the query pass runs up to ROWS rows ahead, nor does d rel, summed from the dS ring
// each time it has filled. Last, the entries of those key rows: the query rows that see both, the first only,
// the second only.
template <typename T>
struct Planes {
  Window win;
  std::vector<Window> rows;  // the windows of the rows computed together (build_rows)
  int64_t slots, slot_size;
  std::vector<T> pring, dsring;
  KeyEntries both, first, second;
  std::unique_ptr<T[]> qbuf, kbuf, vbuf, gbuf;
  const T *qp, *kp, *vp, *gp;
  Planes(const Geo& g, bool backward, bool has_gout)
      : win(g.kk), rows(ROWS, Window(g.kk)), slots(backward ? 2 * g.r + 1 + ROWS : 0), slot_size(g.kk * g.wk),
        pring(slots * slot_size, T(0)), dsring(slots * slot_size, T(0)), both(backward ? g.kk : 0),
        first(backward ? g.kk : 0), second(backward ? g.kk : 0), qbuf(new T[g.d * g.plane]()),
        kbuf(new T[g.d * g.plane]()), vbuf(new T[g.dv * g.plane]()),
        gbuf(has_gout ? new T[g.dv * g.plane]() : nullptr), qp(qbuf.get()), kp(kbuf.get()), vp(vbuf.get()),
        gp(gbuf.get()) {}
  void build_rows(const Geo& g, const Ranges& ranges, int64_t head, int64_t y, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
      int64_t dy0, dy1;
      window_rows(g, y + i, dy0, dy1);
      rows[i].build(g, ranges, head, dy0, dy1);
    }
  }
};

// A thread's vectors of one width: logits, weights and dP of up to two blocks, the border bias, and for the
// backward pass the current plane's d window_mask (kk) and d rel (kk x d) accumulators; empty where the call's
// rows have no vector of this width.
template <typename V>
struct Lanes {
  std::vector<V> s, pw, dp, bias, dm, drel;
  Lanes(const Geo& g, bool used, bool backward)
      : s(used ? ROWS * g.kk : 0), pw(used && backward ? ROWS * g.kk : 0), dp(used && backward ? ROWS * g.kk : 0),
        bias(used ? g.k : 0), dm(used && backward ? g.kk : 0), drel(used && backward ? g.kk * g.d : 0) {}
  void clear_sums() {
    std::fill(dm.begin(), dm.end(), V{});
    std::fill(drel.begin(), drel.end(), V{});
  }
};

template <typename T, int VB>
struct Kernel {
  using V = typename Simd<T, VB>::V;
  static constexpr int64_t L = sizeof(V) / sizeof(T);
  static constexpr int CGROUP = 8;  // channels whose accumulators stay in registers together
  // the kernel of half the vector width, which computes the last few pixels of a row (see Geo)
  static constexpr bool HAS_HALF = VB >= 32;
  using Half = Kernel<T, HAS_HALF ? VB / 2 : VB>;
  using Fwd = FwdArgs<T>;
  using Bwd = BwdArgs<T>;

  template <int XB>
  using Blocks = std::integral_constant<int, XB>;

  // f(kernel, Blocks<XB>{}, xb) for the vectors of a row, left to right: pairs, a last single one, the half-
  // width one; kernel is Kernel or Half, whose static members compute the block(s) at column xb.
  template <typename F>
  static void for_row_blocks(const Geo& g, const F& f) {
    int64_t xi = 0;
    for (; xi + 2 <= g.blocks; xi += 2) f(Kernel{}, Blocks<2>{}, xi * L);
    if (xi < g.blocks) f(Kernel{}, Blocks<1>{}, xi * L);
    if constexpr (HAS_HALF) {
      if (g.half) f(Half{}, Blocks<1>{}, g.blocks * L);
    }
  }

  // f(kernel, xb) for each vector of a row, left to right (the half-width one last)
  template <typename F>
  static void for_row_vectors(const Geo& g, const F& f) {
    for (int64_t xi = 0; xi < g.blocks; ++xi) f(Kernel{}, xi * L);
    if constexpr (HAS_HALF) {
      if (g.half) f(Half{}, g.blocks * L);
    }
  }

  // f(std::integral_constant<int, n>{}) for a run length n in [1, MAX_RUN]
  template <typename F>
  static void with_length(int64_t n, const F& f) {
    switch (n) {
      case 1: f(std::integral_constant<int, 1>{}); break;
      case 2: f(std::integral_constant<int, 2>{}); break;
      case 3: f(std::integral_constant<int, 3>{}); break;
      case 4: f(std::integral_constant<int, 4>{}); break;
      case 5: f(std::integral_constant<int, 5>{}); break;
      case 6: f(std::integral_constant<int, 6>{}); break;
      case 7: f(std::integral_constant<int, 7>{}); break;
      case 8: f(std::integral_constant<int, 8>{}); break;
      default: break;
    }
  }

  // A thread's scratch: its planes, and vectors of both widths.
  struct Scratch {
    Planes<T> planes;
    Lanes<V> wide;
    Lanes<typename Half::V> narrow;
    Scratch(const Geo& g, bool backward, bool has_gout)
        : planes(g, backward, has_gout), wide(g, g.blocks > 0, backward), narrow(g, g.half, backward) {}
    template <typename K>
    auto& lanes() {
      if constexpr (std::is_same_v<typename K::V, V>) {
        return wide;
      } else {
        return narrow;
      }
    }
  };

  // ------------------------------------------------------------------------------------------------------
  // building blocks; XB = 1 or 2 neighbouring vectors of query pixels (blocks) at once; per-entry values of
  // block x live at [x * stride + j] of the arrays they are read from or written to.

  // out[x][i * N + j] = sum_c a[c][x] * (b[c][x + i * row + j] + relt[c][i * k + j]) for the R x N entries of
  // one run; a and b are padded planes `plane` elements apart, relt points at (channel 0, the run's first
  // offset) of the transposed (d, kk) embedding.
  template <int N, int R, int XB, bool REL>
  static inline void run_dots(const T* a, const T* b, int64_t plane, int64_t row, int64_t channels, const T* relt,
                              int64_t kk, int64_t k, V* out, int64_t out_stride) {
    V acc[XB][R * N];
    for (int x = 0; x < XB; ++x)
      for (int j = 0; j < R * N; ++j) acc[x][j] = V{};
    for (int64_t c = 0; c < channels; ++c) {
      V av[XB];
      for (int x = 0; x < XB; ++x) av[x] = loadu<V>(a + c * plane + x * L);
      for (int i = 0; i < R; ++i) {
        const T* bc = b + c * plane + i * row;
        const T* rc = REL ? relt + c * kk + i * k : nullptr;
        for (int j = 0; j < N; ++j) {
          const T rv = REL ? rc[j] : T(0);
          for (int x = 0; x < XB; ++x) {
            if (REL) {
              acc[x][i * N + j] = madd(acc[x][i * N + j], av[x], loadu<V>(bc + x * L + j) + rv);
            } else {
              acc[x][i * N + j] = madd(acc[x][i * N + j], av[x], loadu<V>(bc + x * L + j));
            }
          }
        }
      }
    }
    for (int x = 0; x < XB; ++x)
      for (int j = 0; j < R * N; ++j) out[x * out_stride + j] = acc[x][j];
  }

  // the logits (or dP) of every entry of the window: s[x * kk + j]
  template <int XB>
  static void window_dots(const Geo& g, const Window& win, const T* a, const T* b, int64_t channels,
                          const T* relt, V* s) {
    int64_t j = 0;
    for (const auto& run : win.runs) {
      const T* bb = b + run.off;
      const T* rr = relt == nullptr ? nullptr : relt + run.o;
      V* out = s + j;
      switch ((run.n + 8 * (run.rows - 1)) * 2 + (relt != nullptr)) {
#define NA_CASE(N, R)                                                                        \
  case (N + 8 * (R - 1)) * 2:                                                                \
    run_dots<N, R, XB, false>(a, bb, g.plane, g.wk, channels, rr, g.kk, g.k, out, g.kk);     \
    break;                                                                                   \
  case (N + 8 * (R - 1)) * 2 + 1:                                                            \
    run_dots<N, R, XB, true>(a, bb, g.plane, g.wk, channels, rr, g.kk, g.k, out, g.kk);      \
    break;
        NA_CASE(1, 1) NA_CASE(2, 1) NA_CASE(3, 1) NA_CASE(4, 1) NA_CASE(5, 1) NA_CASE(6, 1) NA_CASE(7, 1)
        NA_CASE(8, 1) NA_CASE(1, 2) NA_CASE(2, 2) NA_CASE(3, 2) NA_CASE(4, 2) NA_CASE(1, 3) NA_CASE(2, 3)
        NA_CASE(3, 3)
#undef NA_CASE
        default:
          break;
      }
      j += run.n * run.rows;
    }
  }

  // dst[c][x] = scale[x] sum_j w[x][j] * (b[c][off_j + x] + rel[o_j][c]) for N channels (rel: (kk, d) layout, at
  // channel c0; scale: none if null), stored (first `valid[x]` lanes) at dst + c * dst_plane + x * L
  template <int N, int XB, bool REL>
  static inline void weighted_group(const Window& win, const V* w, const T* b, int64_t plane, const T* rel,
                                    int64_t d, int64_t kk, T* dst, int64_t dst_plane, const int64_t* valid,
                                    const V* scale) {
    V acc[XB][N];
    for (int x = 0; x < XB; ++x)
      for (int c = 0; c < N; ++c) acc[x][c] = V{};
    for (int64_t j = 0; j < win.n; ++j) {
      V wj[XB];
      for (int x = 0; x < XB; ++x) wj[x] = w[x * kk + j];
      const T* bj = b + win.off[j];
      const T* rj = REL ? rel + win.o[j] * d : nullptr;
      for (int c = 0; c < N; ++c) {
        for (int x = 0; x < XB; ++x) {
          if (REL) {
            acc[x][c] = madd(acc[x][c], wj[x], loadu<V>(bj + c * plane + x * L) + rj[c]);
          } else {
            acc[x][c] = madd(acc[x][c], wj[x], loadu<V>(bj + c * plane + x * L));
          }
        }
      }
    }
    for (int x = 0; x < XB; ++x)
      for (int c = 0; c < N; ++c)
        store_n(dst + c * dst_plane + x * L, scale == nullptr ? acc[x][c] : acc[x][c] * scale[x], valid[x]);
  }

  template <int XB>
  static void weighted(const Window& win, const V* w, const T* b, int64_t plane, int64_t channels, const T* rel,
                       int64_t d, int64_t kk, T* dst, int64_t dst_plane, const int64_t* valid,
                       const V* scale = nullptr) {
    for (int64_t c = 0; c < channels; c += CGROUP) {
      const T* bc = b + c * plane;
      T* dc = dst + c * dst_plane;
      const T* rc = rel == nullptr ? nullptr : rel + c;
      switch (std::min<int64_t>(CGROUP, channels - c) * 2 + (rel != nullptr)) {
#define NA_CASE(N)                                                                            \
  case 2 * N:                                                                                 \
    weighted_group<N, XB, false>(win, w, bc, plane, rc, d, kk, dc, dst_plane, valid, scale);  \
    break;                                                                                    \
  case 2 * N + 1:                                                                             \
    weighted_group<N, XB, true>(win, w, bc, plane, rc, d, kk, dc, dst_plane, valid, scale);   \
    break;
        NA_CASE(1) NA_CASE(2) NA_CASE(3) NA_CASE(4) NA_CASE(5) NA_CASE(6) NA_CASE(7) NA_CASE(8)
#undef NA_CASE
        default:
          break;
      }
    }
  }

  // border="mask" at the left and right edges: per window column dx, 0 for lanes whose key column is inside
  // the image, -inf for those outside. Lanes past the image's right edge (padding queries, discarded) are
  // never masked, so their softmax stays finite. Returns false when no lane of the block needs it.
  static bool column_bias(const Geo& g, int64_t xb, V* bias) {
    if (!g.border_mask || (xb >= g.r && xb + L - 1 + g.r < g.w)) return false;
    const T inf = std::numeric_limits<T>::infinity();
    for (int64_t dx = 0; dx < g.k; ++dx) {
      for (int64_t lane = 0; lane < L; ++lane) {
        const int64_t x = xb + lane, col = x + dx - g.r;
        bias[dx][lane] = (x < g.w && (col < 0 || col >= g.w)) ? -inf : T(0);
      }
    }
    return true;
  }

  // the logits of XB blocks starting at column xb of query row y: s[x * kk + j], -inf where masked
  template <int XB>
  static void logits(const Geo& g, const Window& win, const T* qp, const T* kp, const T* relt, int64_t y,
                     int64_t xb, V* s, V* bias) {
    window_dots<XB>(g, win, qp + (y + g.r) * g.wk + xb + g.r, kp + y * g.wk + xb, g.d, relt, s);
    for (int x = 0; x < XB; ++x) {
      if (column_bias(g, xb + x * L, bias)) {
        for (int64_t j = 0; j < win.n; ++j) s[x * g.kk + j] += bias[win.dx[j]];
      }
    }
  }

  // G query rows at once (y .. y + G - 1), where every window row takes all its columns (no window_mask column is
  // skipped). Key row y + t is window row t - i of query row y + i, so one key vector serves every row that sees
  // its key row: a load per G multiply-adds where one row alone needs one per multiply-add. The loads, not the
  // arithmetic, bound these loops on Zen 4: with a key load (unaligned, most straddle two cache lines) and the
  // embedding's add per multiply-add, one row takes 2.2 times the multiply-adds' own time, three rows sharing
  // each load 1.2 times (bench/window_loads.cpp). Key rows outside the image (border="mask") are skipped. The
  // per-row arrays (logits, weights, dP) of the G rows are kk vectors apart, each indexed by window offset.

  // NG rows from row i0 of the group and one window row of key row t (b: its first column): out[i][j] for query
  // row i0 + i, whose window row is t - i0 - i; a: row i0's query vector; rel: channel 0 of window row t - i0,
  // column j0 of the transposed (d, kk) embedding
  template <int N, int NG, bool REL>
  static inline void rows_dots(const T* a, int64_t row, const T* b, int64_t plane, int64_t channels, const T* rel,
                               int64_t k, int64_t kk, V* out) {
    V acc[NG][N];
    for (int i = 0; i < NG; ++i)
      for (int j = 0; j < N; ++j) acc[i][j] = V{};
    for (int64_t c = 0; c < channels; ++c) {
      V av[NG];
      for (int i = 0; i < NG; ++i) av[i] = loadu<V>(a + i * row + c * plane);
      const T* bc = b + c * plane;
      for (int j = 0; j < N; ++j) {
        V kv = loadu<V>(bc + j);
        if constexpr (NG > 1) in_register(kv);
        for (int i = 0; i < NG; ++i) {
          if constexpr (REL) {
            acc[i][j] = madd(acc[i][j], av[i], kv + rel[c * kk + j - i * k]);
          } else {
            acc[i][j] = madd(acc[i][j], av[i], kv);
          }
        }
      }
    }
    for (int i = 0; i < NG; ++i)
      for (int j = 0; j < N; ++j) out[i * (kk - k) + j] = acc[i][j];
  }

  // the logits (or dP, without relt) of one vector of G query rows over key rows y + t, t in [t0, t1):
  // s[i * kk + o]; a: the first row's query vector, b: the first row's window corner
  template <int G>
  static void rows_window_dots(const Geo& g, const T* a, const T* b, int64_t channels, const T* relt, int64_t t0,
                               int64_t t1, V* s) {
    const int64_t pieces = (g.k + MAX_RUN - 1) / MAX_RUN;
    for (int64_t piece = 0, j0 = 0; piece < pieces; ++piece) {
      const int64_t n = (g.k - j0 + (pieces - piece) - 1) / (pieces - piece);
      with_length(n, [&](auto len) {
        constexpr int N = decltype(len)::value;
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t i0 = std::max<int64_t>(0, t - g.k + 1), rows = std::min<int64_t>(G - 1, t) - i0 + 1;
          const T* at = a + i0 * g.wk;
          const T* bt = b + t * g.wk + j0;
          const T* rel = relt == nullptr ? nullptr : relt + (t - i0) * g.k + j0;
          V* out = s + i0 * g.kk + (t - i0) * g.k + j0;
          switch (rows * 2 + (relt != nullptr)) {
#define NA_CASE(NG)                                                                                       \
  case NG * 2:                                                                                            \
    if constexpr (NG <= G) rows_dots<N, NG, false>(at, g.wk, bt, g.plane, channels, rel, g.k, g.kk, out); \
    break;                                                                                                \
  case NG * 2 + 1:                                                                                        \
    if constexpr (NG <= G) rows_dots<N, NG, true>(at, g.wk, bt, g.plane, channels, rel, g.k, g.kk, out);  \
    break;
            NA_CASE(1) NA_CASE(2) NA_CASE(3)
#undef NA_CASE
            default:
              break;
          }
        }
      });
      j0 += n;
    }
  }

  // acc[i][c] += w[i][o] (b[c] + rel[o][c]) over the columns of key row t for the NG rows from I0 of the group that
  // see it (window row o / k = t - i); b: key row t's first column
  template <int N, int G, int I0, int NG, bool REL>
  __attribute__((always_inline)) static inline void rows_weighted_row(const Geo& g, const V* w, const T* b,
                                                                      const T* rel, int64_t t, V (&acc)[G][N]) {
    for (int64_t dx = 0; dx < g.k; ++dx) {
      const T* bj = b + dx;
      V wi[NG];
      const T* ri[NG];
      for (int i = 0; i < NG; ++i) {
        const int64_t o = (t - I0 - i) * g.k + dx;
        wi[i] = w[(I0 + i) * g.kk + o];
        ri[i] = REL ? rel + o * g.d : nullptr;
      }
      for (int c = 0; c < N; ++c) {
        V vv = loadu<V>(bj + c * g.plane);
        if constexpr (NG > 1) in_register(vv);
        for (int i = 0; i < NG; ++i) {
          if constexpr (REL) {
            acc[I0 + i][c] = madd(acc[I0 + i][c], wi[i], vv + ri[i][c]);
          } else {
            acc[I0 + i][c] = madd(acc[I0 + i][c], wi[i], vv);
          }
        }
      }
    }
  }

  // dst[i][c] = scale[i] sum_o w[i][o] (b[c][o] + rel[o][c]) for G rows over key rows y + t, t in [t0, t1) (N
  // channels; rel: (kk, d) layout at the group's first channel, or none; scale: none if null); row i's output is
  // dst + i * dst_row
  template <int N, int G, bool REL>
  static void rows_weighted_group(const Geo& g, const V* w, const T* b, const T* rel, int64_t t0, int64_t t1, T* dst,
                                  int64_t dst_row, int64_t dst_plane, int64_t valid, const V* scale) {
    V acc[G][N];
    for (int i = 0; i < G; ++i)
      for (int c = 0; c < N; ++c) acc[i][c] = V{};
    for (int64_t t = t0; t < t1; ++t) {
      const T* bt = b + t * g.wk;
      const int64_t i0 = std::max<int64_t>(0, t - g.k + 1), i1 = std::min<int64_t>(G - 1, t);
      switch (i0 * 4 + i1) {  // the rows that see key row t: [i0, i1]
#define NA_CASE(A, B)                                                                        \
  case A * 4 + B:                                                                            \
    if constexpr (B < G) rows_weighted_row<N, G, A, B - A + 1, REL>(g, w, bt, rel, t, acc);  \
    break;
        NA_CASE(0, 0) NA_CASE(0, 1) NA_CASE(0, 2) NA_CASE(1, 1) NA_CASE(1, 2) NA_CASE(2, 2)
#undef NA_CASE
        default:
          break;
      }
    }
    for (int i = 0; i < G; ++i)
      for (int c = 0; c < N; ++c)
        store_n(dst + i * dst_row + c * dst_plane, scale == nullptr ? acc[i][c] : acc[i][c] * scale[i], valid);
  }

  template <int G>
  static void rows_weighted(const Geo& g, const V* w, const T* b, int64_t channels, const T* rel, int64_t t0,
                            int64_t t1, T* dst, int64_t dst_row, int64_t dst_plane, int64_t valid,
                            const V* scale = nullptr) {
    for (int64_t c = 0; c < channels; c += CGROUP) {
      with_length(std::min<int64_t>(CGROUP, channels - c), [&](auto len) {
        constexpr int N = decltype(len)::value;
        if (rel != nullptr) {
          rows_weighted_group<N, G, true>(g, w, b + c * g.plane, rel + c, t0, t1, dst + c * dst_plane, dst_row,
                                          dst_plane, valid, scale);
        } else {
          rows_weighted_group<N, G, false>(g, w, b + c * g.plane, nullptr, t0, t1, dst + c * dst_plane, dst_row,
                                           dst_plane, valid, scale);
        }
      });
    }
  }

  // -------------------------------------------------------------------------------------------------------
  // forward

  // the softmax of one vector of row y at column xb (logits in sx[j], replaced by e m), its statistics and the
  // returned weights; returns 1 / sum(e m)
  __attribute__((always_inline)) static inline V softmax_row(const Geo& g, const Fwd& f, const Window& win,
                                                              const T* maskh, V* sx, int64_t p, int64_t y, int64_t xb,
                                                              int64_t valid) {
    // softmax over the window, times the mask, renormalised: P_j = e_j m_j / sum e m
    V mx = V{} - std::numeric_limits<T>::infinity();
    for (int64_t j = 0; j < win.n; ++j) mx = sx[j] > mx ? sx[j] : mx;
    mx = mx == -std::numeric_limits<T>::infinity() ? V{} : mx;  // nothing left: all weights 0
    V total = V{};
    for (int64_t j = 0; j < win.n; ++j) {
      V e = vexp(sx[j] - mx);
      if (maskh != nullptr) e *= maskh[win.o[j]];
      sx[j] = e;
      total += e;
    }
    const V inv = total > 0 ? T(1) / total : V{};
    T* st = f.stats + (p * g.h + y) * g.ws + xb;
    storeu(st, mx);
    storeu(st + g.bh * g.h * g.ws, inv);
    if (f.weights != nullptr) {
      T* wrow = f.weights + (p * g.kk * g.h + y) * g.w + xb;
      if (win.n < g.kk) {
        for (int64_t o = 0; o < g.kk; ++o) store_n(wrow + o * g.h * g.w, V{}, valid);
      }
      for (int64_t j = 0; j < win.n; ++j) store_n(wrow + win.o[j] * g.h * g.w, sx[j] * inv, valid);
    }
    return inv;
  }

  template <int XB>
  static void forward_blocks(const Geo& g, const Fwd& f, const Planes<T>& pl, Lanes<V>& ln, int64_t p, int64_t y,
                             int64_t xb) {
    const Window& win = pl.win;
    V* s = ln.s.data();
    const int64_t head = p % g.heads;
    const T* relt = f.relt == nullptr ? nullptr : f.relt + (f.rel_per_head ? head : 0) * g.kk * g.d;
    const T* maskh = f.mask == nullptr ? nullptr : f.mask + head * g.kk;
    logits<XB>(g, win, pl.qp, pl.kp, relt, y, xb, s, ln.bias.data());
    int64_t valid[XB];
    V invs[XB];  // the normalisation is applied to the weighted sum (and to the weights only when returned)
    for (int x = 0; x < XB; ++x) {
      valid[x] = std::min<int64_t>(L, g.w - xb - x * L);
      invs[x] = softmax_row(g, f, win, maskh, s + x * g.kk, p, y, xb + x * L, valid[x]);
    }
    weighted<XB>(win, s, pl.vp + y * g.wk + xb, g.plane, g.dv, nullptr, g.d, g.kk,
                 f.out + (p * g.dv * g.h + y) * g.w + xb, g.h * g.w, valid, invs);
  }

  // the logits of one vector of G query rows from y, at s[i * kk + o], -inf where masked; windows: the rows'
  template <int G>
  static void rows_logits(const Geo& g, const Window* windows, const T* qp, const T* kp, const T* relt, int64_t y,
                          int64_t xb, int64_t t0, int64_t t1, V* s, V* bias) {
    rows_window_dots<G>(g, qp + (y + g.r) * g.wk + xb + g.r, kp + y * g.wk + xb, g.d, relt, t0, t1, s);
    if (column_bias(g, xb, bias)) {
      for (int i = 0; i < G; ++i) {
        V* si = s + i * g.kk + windows[i].o[0];
        for (int64_t j = 0; j < windows[i].n; ++j) si[j] += bias[windows[i].dx[j]];
      }
    }
  }

  // one vector of G query rows from y (pl.rows: their windows, every column of each window row)
  template <int G>
  static void forward_rows(const Geo& g, const Fwd& f, const Planes<T>& pl, Lanes<V>& ln, int64_t p, int64_t y,
                           int64_t xb) {
    V* s = ln.s.data();
    const int64_t head = p % g.heads;
    const T* relt = f.relt == nullptr ? nullptr : f.relt + (f.rel_per_head ? head : 0) * g.kk * g.d;
    const T* maskh = f.mask == nullptr ? nullptr : f.mask + head * g.kk;
    int64_t t0, t1;
    key_rows(g, y, G, t0, t1);
    rows_logits<G>(g, pl.rows.data(), pl.qp, pl.kp, relt, y, xb, t0, t1, s, ln.bias.data());
    const int64_t valid = std::min<int64_t>(L, g.w - xb);
    V invs[G];
    for (int i = 0; i < G; ++i) {
      const Window& win = pl.rows[i];  // whole window rows: its entries are the offsets from its first on
      invs[i] = softmax_row(g, f, win, maskh, s + i * g.kk + win.o[0], p, y + i, xb, valid);
    }
    rows_weighted<G>(g, s, pl.vp + y * g.wk + xb, g.dv, nullptr, t0, t1, f.out + (p * g.dv * g.h + y) * g.w + xb,
                     g.w, g.h * g.w, valid, invs);
  }

  // Items are whole planes, or bands of rows of one plane when there are too few planes to keep every thread
  // busy to the end; each copies the rows it reads into its thread's padded planes, which stay in cache while
  // it computes.
  static void forward(const Geo& g, const Fwd& f) {
    const Ranges ranges(g, f.mask, false);
    const bool grouped = ranges.whole(g);
    const int64_t want = 8 * at::get_num_threads();
    const int64_t bands = std::min<int64_t>(g.h, std::max<int64_t>(1, (want + g.bh - 1) / g.bh));
    const int64_t band = (g.h + bands - 1) / bands;
    parallel_items<Scratch>(g.bh * bands, [&] { return Scratch(g, false, false); }, [&](Scratch& sc, int64_t item) {
      const int64_t p = item / bands, y0 = (item % bands) * band, y1 = std::min(g.h, y0 + band);
      if (y0 >= y1) return;
      Planes<T>& pl = sc.planes;
      pack_rows(f.q, g, p, y0 + g.r, y1 + g.r, pl.qbuf.get());
      pack_rows(f.k, g, p, y0, y1 + 2 * g.r, pl.kbuf.get());
      pack_rows(f.v, g, p, y0, y1 + 2 * g.r, pl.vbuf.get());
      T* out = f.out + p * g.dv * g.h * g.w;
      for (int64_t y = y0; y < y1;) {
        if (const int64_t rows = grouped ? std::min<int64_t>(ROWS, y1 - y) : 0; rows >= 2) {
          for (int64_t i = 0; i < rows; ++i) {
            rows_ahead(y + i, y0, y1, [&](int64_t ya) { prefetch_for_write(out + ya * g.w, g.dv, g.h * g.w, g.w); });
          }
          pl.build_rows(g, ranges, p % g.heads, y, rows);
          for_row_vectors(g, [&](auto kernel, int64_t xb) {
            using K = decltype(kernel);
            if (rows == 3) {
              K::template forward_rows<3>(g, f, pl, sc.template lanes<K>(), p, y, xb);
            } else {
              K::template forward_rows<2>(g, f, pl, sc.template lanes<K>(), p, y, xb);
            }
          });
          y += rows;
          continue;
        }
        rows_ahead(y, y0, y1, [&](int64_t ya) { prefetch_for_write(out + ya * g.w, g.dv, g.h * g.w, g.w); });
        int64_t dy0, dy1;
        window_rows(g, y, dy0, dy1);
        pl.win.build(g, ranges, p % g.heads, dy0, dy1);
        for_row_blocks(g, [&](auto kernel, auto blocks, int64_t xb) {
          using K = decltype(kernel);
          K::template forward_blocks<decltype(blocks)::value>(g, f, pl, sc.template lanes<K>(), p, y, xb);
        });
        ++y;
      }
    });
  }

  // -------------------------------------------------------------------------------------------------------
  // backward

  // d rel[o][c] += sum of dS_o * q_c over query rows [y0, y1), read back from the dS ring (which holds every
  // offset of those rows, 0 outside their windows) for the row vectors of this width: nvec vectors from column
  // x0. A tile of NO offsets x NC channels keeps its sums in registers over all of them and adds them to the
  // plane's accumulators (acc, kk x d) once: per batch of rows, where adding per block moved the whole
  // accumulator table (kk x d vectors) through the cache for every block.
  template <int NO, int NC>
  static inline void drel_tile(const Geo& g, const Planes<T>& sc, int64_t y0, int64_t y1, int64_t x0, int64_t nvec,
                               int64_t o0, int64_t c0, V* acc) {
    V sum[NO][NC];
    for (int i = 0; i < NO; ++i)
      for (int c = 0; c < NC; ++c) sum[i][c] = V{};
    for (int64_t y = y0; y < y1; ++y) {
      const T* ds = sc.dsring.data() + (y % sc.slots) * sc.slot_size + o0 * g.wk + g.r + x0;
      const T* q = sc.qp + (y + g.r) * g.wk + g.r + x0 + c0 * g.plane;
      for (int64_t v = 0; v < nvec; ++v) {
        V dsv[NO];
        for (int i = 0; i < NO; ++i) dsv[i] = loadu<V>(ds + i * g.wk + v * L);
        for (int c = 0; c < NC; ++c) {
          V qv = loadu<V>(q + c * g.plane + v * L);
          if constexpr (NO > 1) in_register(qv);
          for (int i = 0; i < NO; ++i) sum[i][c] = madd(sum[i][c], dsv[i], qv);
        }
      }
    }
    for (int i = 0; i < NO; ++i)
      for (int c = 0; c < NC; ++c) acc[(o0 + i) * g.d + c0 + c] += sum[i][c];
  }

  static void drel_rows(const Geo& g, const Planes<T>& sc, int64_t y0, int64_t y1, int64_t x0, int64_t nvec,
                        V* acc) {
    constexpr int64_t OFFSETS = 3;  // 3 offsets x 8 channels: 24 sums, 3 dS vectors and a q vector in registers
    for (int64_t o = 0; o < g.kk; o += OFFSETS) {
      for (int64_t c = 0; c < g.d; c += CGROUP) {
        switch (std::min<int64_t>(OFFSETS, g.kk - o) * 16 + std::min<int64_t>(CGROUP, g.d - c)) {
#define NA_CASE(NO, NC)                                           \
  case NO * 16 + NC:                                              \
    drel_tile<NO, NC>(g, sc, y0, y1, x0, nvec, o, c, acc);        \
    break;
#define NA_CASES(NO) \
  NA_CASE(NO, 1) NA_CASE(NO, 2) NA_CASE(NO, 3) NA_CASE(NO, 4) NA_CASE(NO, 5) NA_CASE(NO, 6) NA_CASE(NO, 7) NA_CASE(NO, 8)
          NA_CASES(1) NA_CASES(2) NA_CASES(3)
#undef NA_CASES
#undef NA_CASE
          default:
            break;
        }
      }
    }
  }

  // (1) one or two query blocks of row y: logits again, E = exp(S - max) / sum(e m), P = E m,
  // dP = grad_out . v (+ the weights' own gradient), dS = P (dP - sum P dP), d mask += E (dP - sum P dP),
  // dq = sum dS (k + rel); P and dS go to the ring (d rel is summed from there, drel_rows).

  // the softmax's gradient for one vector of row y at column xb: E and dP of each entry are in sx and dpx on entry,
  // dS in dpx on return; P (= E m, E itself without a mask: px = sx) and dS go to row y's ring slot.
  __attribute__((always_inline)) static inline void softmax_grad(const Geo& g, const Bwd& f, Planes<T>& sc,
                                                                 const Window& win, Lanes<V>& ln, bool need_mask,
                                                                 const T* maskh, int64_t p, int64_t y, int64_t xb,
                                                                 V* sx, V* dpx, V* pwx) {
    // Values are kept in locals between the stores: a store to the ring may alias these arrays for the compiler,
    // which would reload.
    V* px = maskh == nullptr ? sx : pwx;
    const T* st = f.stats + (p * g.h + y) * g.ws + xb;
    const V mx = loadu<V>(st), inv = loadu<V>(st + g.bh * g.h * g.ws);
    if (sc.gp == nullptr) {
      for (int64_t j = 0; j < win.n; ++j) dpx[j] = V{};
    }
    if (f.gw != nullptr) {
      const T* gwrow = f.gw + (p * g.kk * g.h + y) * g.wq + xb;
      for (int64_t j = 0; j < win.n; ++j) dpx[j] += loadu<V>(gwrow + win.o[j] * g.h * g.wq);
    }
    V dsum = V{};  // sum P dP
    for (int64_t j = 0; j < win.n; ++j) {
      const V e = vexp(sx[j] - mx) * inv;  // E = e / sum(e m)
      sx[j] = e;
      const V pj = maskh == nullptr ? e : e * maskh[win.o[j]];
      if (maskh != nullptr) px[j] = pj;
      dsum += pj * dpx[j];
    }
    T* pcol = sc.pring.data() + (y % sc.slots) * sc.slot_size + xb + g.r;
    T* dscol = sc.dsring.data() + (y % sc.slots) * sc.slot_size + xb + g.r;
    if (win.n < g.kk) {
      for (int64_t o = 0; o < g.kk; ++o) {
        storeu(pcol + o * g.wk, V{});
        storeu(dscol + o * g.wk, V{});
      }
    }
    for (int64_t j = 0; j < win.n; ++j) {
      const V pj = px[j], centred = dpx[j] - dsum, ds = pj * centred;
      if (need_mask) ln.dm[win.o[j]] += sx[j] * centred;
      dpx[j] = ds;
      storeu(pcol + win.o[j] * g.wk, pj);
      storeu(dscol + win.o[j] * g.wk, ds);
    }
  }

  // (out of line, as is backward_rows: inlined into the plane's loop, they made the compiler's code for the loop
  // slower, the backward 4-8% on 4x4 to 8x8 maps)
  template <int XB>
  __attribute__((noinline)) static void backward_queries(const Geo& g, const Bwd& f, Planes<T>& sc, Lanes<V>& ln,
                                                         bool need_mask, int64_t p, int64_t y, int64_t xb) {
    const Window& win = sc.win;
    const int64_t head = p % g.heads;
    const T* relt = f.relt == nullptr ? nullptr : f.relt + (f.rel_per_head ? head : 0) * g.kk * g.d;
    const T* rel = f.rel == nullptr ? nullptr : f.rel + (f.rel_per_head ? head : 0) * g.kk * g.d;
    const T* maskh = f.mask == nullptr ? nullptr : f.mask + head * g.kk;
    const T *qp = sc.qp, *kp = sc.kp;
    const int64_t qoff = (y + g.r) * g.wk + xb + g.r, koff = y * g.wk + xb;
    V *s = ln.s.data(), *pw = ln.pw.data(), *dp = ln.dp.data();
    logits<XB>(g, win, qp, kp, relt, y, xb, s, ln.bias.data());
    if (sc.gp != nullptr) window_dots<XB>(g, win, sc.gp + qoff, sc.vp + koff, g.dv, nullptr, dp);
    int64_t valid[XB];
    for (int x = 0; x < XB; ++x) {
      valid[x] = std::min<int64_t>(L, g.w - xb - x * L);
      softmax_grad(g, f, sc, win, ln, need_mask, maskh, p, y, xb + x * L, s + x * g.kk, dp + x * g.kk, pw + x * g.kk);
    }
    if (f.dq != nullptr) {
      weighted<XB>(win, dp, kp + koff, g.plane, g.d, rel, g.d, g.kk, f.dq + (p * g.d * g.h + y) * g.w + xb,
                   g.h * g.w, valid);
    }
  }

  // one vector of G query rows from y (sc.rows: their windows, every column of each window row)
  template <int G>
  __attribute__((noinline)) static void backward_rows(const Geo& g, const Bwd& f, Planes<T>& sc, Lanes<V>& ln,
                                                      bool need_mask, int64_t p, int64_t y, int64_t xb) {
    const int64_t head = p % g.heads;
    const T* relt = f.relt == nullptr ? nullptr : f.relt + (f.rel_per_head ? head : 0) * g.kk * g.d;
    const T* rel = f.rel == nullptr ? nullptr : f.rel + (f.rel_per_head ? head : 0) * g.kk * g.d;
    const T* maskh = f.mask == nullptr ? nullptr : f.mask + head * g.kk;
    const int64_t qoff = (y + g.r) * g.wk + xb + g.r, koff = y * g.wk + xb;
    V *s = ln.s.data(), *dp = ln.dp.data(), *pw = ln.pw.data();
    int64_t t0, t1;
    key_rows(g, y, G, t0, t1);
    rows_logits<G>(g, sc.rows.data(), sc.qp, sc.kp, relt, y, xb, t0, t1, s, ln.bias.data());
    if (sc.gp != nullptr) rows_window_dots<G>(g, sc.gp + qoff, sc.vp + koff, g.dv, nullptr, t0, t1, dp);
    for (int i = 0; i < G; ++i) {
      const Window& win = sc.rows[i];
      const int64_t first = i * g.kk + win.o[0];  // whole window rows: its entries are the offsets from its first on
      softmax_grad(g, f, sc, win, ln, need_mask, maskh, p, y + i, xb, s + first, dp + first, pw + first);
    }
    if (f.dq != nullptr) {
      rows_weighted<G>(g, dp, sc.kp + koff, g.d, rel, t0, t1, f.dq + (p * g.d * g.h + y) * g.w + xb, g.w,
                       g.h * g.w, std::min<int64_t>(L, g.w - xb));
    }
  }

  // The gradient of one block of key rows A and A + 1 for N channels, gathered from the queries that see them:
  // dst[c][x] (row A) = sum_j w[a_j + x] * src[c][s_j + x] over the entries of both rows and of the first only,
  // row A + 1 likewise with w[a_j + step + x] (the same query row, one window row further down) over both and
  // the second only. Each src vector read for an entry of both serves both rows. (w: the P or dS ring, src:
  // the grad_out or q plane.)
  template <int N>
  static inline void gather_group(const T* w, const T* src, int64_t plane, const KeyEntries& both,
                                  const KeyEntries& first, const KeyEntries& second, int64_t step, T* dst,
                                  int64_t next_row, int64_t dst_plane, int64_t valid) {
    V a[N], b[N];
    for (int c = 0; c < N; ++c) a[c] = b[c] = V{};
    for (int64_t j = 0; j < both.n; ++j) {
      const V wa = loadu<V>(w + both.w[j]), wb = loadu<V>(w + both.w[j] + step);
      const T* sj = src + both.s[j];
      for (int c = 0; c < N; ++c) {
        V sv = loadu<V>(sj + c * plane);
        in_register(sv);
        a[c] = madd(a[c], wa, sv);
        b[c] = madd(b[c], wb, sv);
      }
    }
    const auto one_row = [&](const KeyEntries& e, V* acc) {
      for (int64_t j = 0; j < e.n; ++j) {
        const V wj = loadu<V>(w + e.w[j]);
        const T* sj = src + e.s[j];
        for (int c = 0; c < N; ++c) acc[c] = madd(acc[c], wj, loadu<V>(sj + c * plane));
      }
    };
    one_row(first, a);
    one_row(second, b);
    for (int c = 0; c < N; ++c) {
      store_n(dst + c * dst_plane, a[c], valid);
      if (next_row != 0) store_n(dst + c * dst_plane + next_row, b[c], valid);
    }
  }

  static void gather(const T* w, const T* src, int64_t plane, int64_t channels, const Planes<T>& sc, int64_t step,
                     T* dst, int64_t next_row, int64_t dst_plane, int64_t valid) {
    for (int64_t c = 0; c < channels; c += CGROUP) {
      const T* src_c = src + c * plane;
      T* dst_c = dst + c * dst_plane;
      switch (std::min<int64_t>(CGROUP, channels - c)) {
#define NA_CASE(N)                                                                                              \
  case N:                                                                                                       \
    gather_group<N>(w, src_c, plane, sc.both, sc.first, sc.second, step, dst_c, next_row, dst_plane, valid);    \
    break;
        NA_CASE(1) NA_CASE(2) NA_CASE(3) NA_CASE(4) NA_CASE(5) NA_CASE(6) NA_CASE(7) NA_CASE(8)
#undef NA_CASE
        default:
          break;
      }
    }
  }

  // (2) key rows yk and yk + 1 (or yk alone, the last row of an odd count), whose queries' rows are all in the
  // ring: dk = sum_o dS_o q and dv = sum_o P_o grad_out. Query row yq sees key row yk through window row
  // dy = yk + r - yq and key row yk + 1 through dy + 1; the rows that see both are read once for both.
  static void backward_keys(const Geo& g, const Bwd& f, Planes<T>& sc, const Ranges& active, int64_t p, int64_t yk,
                            bool pair) {
    const int64_t head = p % g.heads;
    sc.both.n = sc.first.n = sc.second.n = 0;
    // only the queries in the image have dS, P != 0; in the ring, offsets outside a query's window or with a
    // zero window_mask are 0, so the dx of both rows can be the union of the two rows' ranges
    const int64_t last = pair ? yk + 1 : yk;
    for (int64_t yq = std::max<int64_t>(0, yk - g.r); yq <= std::min<int64_t>(g.h - 1, last + g.r); ++yq) {
      const int64_t dy = yk + g.r - yq;
      const bool sees_first = dy >= 0, sees_second = pair && dy + 1 < g.k;
      int64_t lo = g.k, hi = 0;  // the window columns through which it sees either row
      const auto widen = [&](int64_t wy) {
        const int64_t a = active.lo[head * g.k + wy], b = active.hi[head * g.k + wy];
        if (a < b) {
          lo = std::min(lo, a);
          hi = std::max(hi, b);
        }
      };
      if (sees_first) widen(dy);
      if (sees_second) widen(dy + 1);
      KeyEntries& to = sees_first && sees_second ? sc.both : sees_first ? sc.first : sc.second;
      // ring position: the query row's slot, the window row through which it sees the first row it sees
      const int64_t ring = (yq % sc.slots) * sc.slot_size + (sees_first ? dy : dy + 1) * g.k * g.wk;
      for (int64_t dx = lo; dx < hi; ++dx) to.add(ring + dx * g.wk + 2 * g.r - dx, (yq + g.r) * g.wk + 2 * g.r - dx);
    }
    const int64_t step = g.k * g.wk, next_row = pair ? g.w : 0;
    for_row_blocks(g, [&](auto kernel, auto blocks, int64_t xb) {
      using K = decltype(kernel);
      for (int x = 0; x < decltype(blocks)::value; ++x) {
        const int64_t xv = xb + x * K::L, valid = std::min<int64_t>(K::L, g.w - xv);
        if (f.dk != nullptr) {
          K::gather(sc.dsring.data() + xv, sc.qp + xv, g.plane, g.d, sc, step,
                    f.dk + (p * g.d * g.h + yk) * g.w + xv, next_row, g.h * g.w, valid);
        }
        if (f.dv != nullptr) {
          K::gather(sc.pring.data() + xv, sc.gp + xv, g.plane, g.dv, sc, step,
                    f.dv + (p * g.dv * g.h + yk) * g.w + xv, next_row, g.h * g.w, valid);
        }
      }
    });
  }

  // Per plane, rows in order: the query pass of row y (or of up to ROWS rows from y), then the key pass of rows
  // A and A + 1 once both rows' queries are done (query row A + 1 + r); the last key rows after the last query row.
  static void backward(const Geo& g, const Bwd& f) {
    const bool need_mask = f.dmask != nullptr && f.mask != nullptr;
    const bool keys = f.dk != nullptr || f.dv != nullptr;
    const Ranges live(g, f.mask, need_mask), active(g, f.mask, false);
    const bool grouped = live.whole(g);
    parallel_items<Scratch>(g.bh, [&] { return Scratch(g, true, f.gout.defined()); }, [&](Scratch& sc, int64_t p) {
      const int64_t head = p % g.heads;
      Planes<T>& pl = sc.planes;
      pack_rows(f.q, g, p, 0, g.hk, pl.qbuf.get());
      pack_rows(f.k, g, p, 0, g.hk, pl.kbuf.get());
      pack_rows(f.v, g, p, 0, g.hk, pl.vbuf.get());
      if (f.gout.defined()) pack_rows(f.gout, g, p, 0, g.hk, pl.gbuf.get());
      sc.wide.clear_sums();
      sc.narrow.clear_sums();
      int64_t next_key = 0;  // the first key row not yet computed (two at a time, once their queries are done)
      int64_t drel_from = 0;  // the first query row whose dS is not yet in d rel
      for (int64_t y = 0; y < g.h;) {
        // up to ROWS rows at once where no window_mask column is skipped (see rows_dots)
        const int64_t rows = grouped ? std::min<int64_t>(ROWS, g.h - y) : 1;
        for (int64_t yy = y; yy < y + rows; ++yy) {
          // dq row yy is written by its query pass, dk and dv rows about one per query row, r rows behind
          if (f.dq != nullptr) {
            rows_ahead(yy, 0, g.h, [&](int64_t ya) {
              prefetch_for_write(f.dq + (p * g.d * g.h + ya) * g.w, g.d, g.h * g.w, g.w);
            });
          }
          if (const int64_t yk = yy - g.r + WRITE_AHEAD; keys && yk >= 0 && yk < g.h) {
            if (f.dk != nullptr) prefetch_for_write(f.dk + (p * g.d * g.h + yk) * g.w, g.d, g.h * g.w, g.w);
            if (f.dv != nullptr) prefetch_for_write(f.dv + (p * g.dv * g.h + yk) * g.w, g.dv, g.h * g.w, g.w);
          }
        }
        if (rows >= 2) {
          pl.build_rows(g, live, head, y, rows);
          for_row_vectors(g, [&](auto kernel, int64_t xb) {
            using K = decltype(kernel);
            if (rows == 3) {
              K::template backward_rows<3>(g, f, pl, sc.template lanes<K>(), need_mask, p, y, xb);
            } else {
              K::template backward_rows<2>(g, f, pl, sc.template lanes<K>(), need_mask, p, y, xb);
            }
          });
        } else {
          int64_t dy0, dy1;
          window_rows(g, y, dy0, dy1);
          pl.win.build(g, live, head, dy0, dy1);
          for_row_blocks(g, [&](auto kernel, auto blocks, int64_t xb) {
            using K = decltype(kernel);
            K::template backward_queries<decltype(blocks)::value>(g, f, pl, sc.template lanes<K>(), need_mask, p,
                                                                  y, xb);
          });
        }
        y += rows;
        // d rel of the rows the ring holds, before the next step (up to ROWS rows) overwrites the oldest
        if (f.drel != nullptr && (y + ROWS - drel_from > pl.slots || y == g.h)) {
          if (g.blocks > 0) drel_rows(g, pl, drel_from, y, 0, g.blocks, sc.wide.drel.data());
          if constexpr (HAS_HALF) {
            if (g.half) Half::drel_rows(g, pl, drel_from, y, g.blocks * L, 1, sc.narrow.drel.data());
          }
          drel_from = y;
        }
        for (; keys && next_key + 1 <= y - 1 - g.r; next_key += 2) backward_keys(g, f, pl, active, p, next_key, true);
      }
      for (; keys && next_key < g.h; next_key += 2) backward_keys(g, f, pl, active, p, next_key, next_key + 1 < g.h);
      // the sums of the widths this plane's rows use
      const auto plane_sum = [&](const auto& wide, const auto& narrow, int64_t i) {
        if (!g.half) return hsum(wide[i]);
        return g.blocks > 0 ? hsum(wide[i]) + hsum(narrow[i]) : hsum(narrow[i]);
      };
      if (f.drel != nullptr) {
        T* drel = f.drel + p * g.kk * g.d;
        for (int64_t i = 0; i < g.kk * g.d; ++i) drel[i] = plane_sum(sc.wide.drel, sc.narrow.drel, i);
      }
      if (f.dmask != nullptr) {
        T* dmask = f.dmask + p * g.kk;
        for (int64_t o = 0; o < g.kk; ++o) dmask[o] = need_mask ? plane_sum(sc.wide.dm, sc.narrow.dm, o) : T(0);
      }
    });
  }
};

// ----------------------------------------------------------------------------------------------------------
// ATen glue

at::ScalarType compute_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

Geo geometry(const at::Tensor& q, const at::Tensor& v, at::ScalarType ct, int64_t kernel_size, bool border_mask) {
  const int64_t lanes = NA_VBYTES / (ct == at::kDouble ? 8 : 4);
  return Geo(q.size(0), q.size(1), q.size(4), v.size(4), q.size(2), q.size(3), kernel_size, lanes,
             Kernel<float, NA_VBYTES>::HAS_HALF, border_mask);
}

void read_options(const c10::optional<at::Tensor>& rel_pos, const c10::optional<at::Tensor>& window_mask,
                  const Geo& g, at::ScalarType ct, at::Tensor& rel, at::Tensor& relt, at::Tensor& mask) {
  if (rel_pos.has_value() && rel_pos->defined()) {
    rel = rel_pos->to(ct).reshape({-1, g.kk, g.d}).contiguous();  // (1 or heads, kk, d)
    relt = rel.transpose(1, 2).contiguous();                       // (1 or heads, d, kk)
  }
  if (window_mask.has_value() && window_mask->defined()) mask = window_mask->to(ct).contiguous();
}

std::vector<at::Tensor> na_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const c10::optional<at::Tensor>& rel_pos,
                                   const c10::optional<at::Tensor>& window_mask, int64_t kernel_size,
                                   bool border_mask, bool return_weights) {
  TORCH_CHECK(q.dim() == 5 && k.sizes() == q.sizes() && v.dim() == 5, "q, k, v must be (B, heads, H, W, d)");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "the fused CPU kernel takes CPU tensors");
  TORCH_CHECK(at::isFloatingType(q.scalar_type()) && at::isFloatingType(k.scalar_type()) &&
              at::isFloatingType(v.scalar_type()), "q, k, v must be floating point");
  const auto ct = compute_type(q.scalar_type());
  const Geo g = geometry(q, v, ct, kernel_size, border_mask);
  at::Tensor rel, relt, mask;
  read_options(rel_pos, window_mask, g, ct, rel, relt, mask);
  auto opts = q.options().dtype(ct);
  auto out = at::empty({g.batch, g.heads, g.dv, g.h, g.w}, opts);
  auto stats = at::empty({2, g.batch, g.heads, g.h, g.ws}, opts);
  auto weights = return_weights ? at::empty({g.batch, g.heads, g.kk, g.h, g.w}, opts) : at::empty({0}, opts);
  AT_DISPATCH_FLOATING_TYPES(ct, "neighborhood_cpu_forward", [&] {
    auto ptr = [](const at::Tensor& t) { return t.defined() && t.numel() ? t.data_ptr<scalar_t>() : nullptr; };
    using K = Kernel<scalar_t, NA_VBYTES>;  // the CPU's widest vectors (its Half computes the ends of rows)
    typename K::Fwd f{Source(q), Source(k), Source(v), ptr(rel), ptr(relt), ptr(mask),
                      rel.defined() && rel.size(0) > 1, ptr(out), ptr(weights), ptr(stats)};
    K::forward(g, f);
  });
  return {out, weights, stats};
}

std::vector<at::Tensor> na_backward(const c10::optional<at::Tensor>& grad_out,
                                    const c10::optional<at::Tensor>& grad_weights, const at::Tensor& q,
                                    const at::Tensor& k, const at::Tensor& v, const at::Tensor& stats,
                                    const c10::optional<at::Tensor>& rel_pos,
                                    const c10::optional<at::Tensor>& window_mask, int64_t kernel_size,
                                    bool border_mask, int64_t need_bits) {
  // which gradients are wanted, one bit each: q, k, v, rel_pos, window_mask
  const bool needs[5] = {bool(need_bits & 1), bool(need_bits & 2), bool(need_bits & 4), bool(need_bits & 8),
                         bool(need_bits & 16)};
  const auto ct = stats.scalar_type();
  const Geo g = geometry(q, v, ct, kernel_size, border_mask);
  TORCH_CHECK(stats.dim() == 5 && stats.size(4) == g.ws, "inconsistent saved statistics");
  const bool has_out = grad_out.has_value() && grad_out->defined();
  const bool has_w = grad_weights.has_value() && grad_weights->defined();
  at::Tensor gw, rel, relt, mask;
  if (has_w) {  // (B, heads, H, W, kk) -> (B*heads, kk, H, wq), zero in the padding lanes
    gw = at::zeros({g.batch, g.heads, g.kk, g.h, g.wq}, stats.options());
    gw.narrow(4, 0, g.w).copy_(grad_weights->permute({0, 1, 4, 2, 3}));
  }
  read_options(rel_pos, window_mask, g, ct, rel, relt, mask);
  auto opts = stats.options();
  auto none = at::empty({0}, opts);
  auto dq = needs[0] ? at::empty({g.batch, g.heads, g.d, g.h, g.w}, opts) : none;
  auto dk = needs[1] ? at::empty({g.batch, g.heads, g.d, g.h, g.w}, opts) : none;
  auto dv = needs[2] && has_out ? at::empty({g.batch, g.heads, g.dv, g.h, g.w}, opts) : none;
  const bool need_rel = rel.defined() && needs[3], need_mask = mask.defined() && needs[4];
  auto drel_part = need_rel ? at::empty({g.bh, g.kk, g.d}, opts) : none;
  auto dmask_part = need_mask ? at::empty({g.bh, g.kk}, opts) : none;
  AT_DISPATCH_FLOATING_TYPES(ct, "neighborhood_cpu_backward", [&] {
    auto ptr = [](const at::Tensor& t) { return t.defined() && t.numel() ? t.data_ptr<scalar_t>() : nullptr; };
    using K = Kernel<scalar_t, NA_VBYTES>;
    typename K::Bwd f{Source(q), Source(k), Source(v), has_out ? Source(*grad_out) : Source(), ptr(gw),
                      ptr(stats), ptr(rel), ptr(relt), ptr(mask), rel.defined() && rel.size(0) > 1, ptr(dq),
                      ptr(dk), ptr(dv), ptr(drel_part), ptr(dmask_part)};
    K::backward(g, f);
  });
  // per-plane partial sums -> per head (or shared), added in plane order: deterministic
  at::Tensor drel = none, dmask = none;
  if (need_rel) {
    const int64_t groups = rel.size(0);
    drel = at::zeros({groups, g.kk, g.d}, opts);
    AT_DISPATCH_FLOATING_TYPES(ct, "neighborhood_cpu_drel", [&] {
      const scalar_t* src = drel_part.data_ptr<scalar_t>();
      scalar_t* dst = drel.data_ptr<scalar_t>();
      for (int64_t p = 0; p < g.bh; ++p) {
        scalar_t* to = dst + (groups == 1 ? 0 : p % g.heads) * g.kk * g.d;
        for (int64_t i = 0; i < g.kk * g.d; ++i) to[i] += src[p * g.kk * g.d + i];
      }
    });
  }
  if (need_mask) {
    dmask = at::zeros({g.heads, g.kk}, opts);
    if (g.kk > 1) {  // with one offset the renormalised weight is 1 whatever the mask: the gradient is 0
      AT_DISPATCH_FLOATING_TYPES(ct, "neighborhood_cpu_dmask", [&] {
        const scalar_t* src = dmask_part.data_ptr<scalar_t>();
        scalar_t* dst = dmask.data_ptr<scalar_t>();
        for (int64_t p = 0; p < g.bh; ++p)
          for (int64_t i = 0; i < g.kk; ++i) dst[(p % g.heads) * g.kk + i] += src[p * g.kk + i];
      });
    }
  }
  return {dq, dk, dv, drel, dmask};
}

// ----------------------------------------------------------------------------------------------------------
// autograd, in C++: the op as layers call it. A Python autograd.Function around the two ops above cost 0.1-0.2 ms
// more per forward+backward (interpreter and dispatch code run with caches the kernel has just filled): 1-6% of
// the bench's steps, 7-9% on 4x4 and 8x8 maps.

// (B, heads, C, H, W) planes -> a (B, heads, H, W, C) view in `dtype` (a copy only where dtype differs)
at::Tensor from_planes(const at::Tensor& t, at::ScalarType dtype) { return t.permute({0, 1, 3, 4, 2}).to(dtype); }

// The two ops through the dispatcher (not the functions above), so that tracing with fake tensors
// (torch.compile) reaches their fake kernels.
template <typename Fn>
c10::TypedOperatorHandle<Fn> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct Attention : public torch::autograd::Function<Attention> {
  // returns {out} or {out, weights}, in q's dtype, as (B, heads, H, W, C) views of channel-major planes
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const c10::optional<at::Tensor>& rel_pos, const c10::optional<at::Tensor>& window_mask,
                               int64_t kernel_size, bool border_mask, bool return_weights) {
    static const auto forward_op = op_handle<decltype(na_forward)>("neighborhood_cpu::forward");
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // the ops have no autograd: this Function is theirs
    auto results = forward_op.call(q, k, v, rel_pos, window_mask, kernel_size, border_mask, return_weights);
    const at::Tensor none;
    ctx->save_for_backward({q, k, v, results[2], rel_pos.value_or(none), window_mask.value_or(none)});
    ctx->saved_data["kernel_size"] = kernel_size;
    ctx->saved_data["border_mask"] = border_mask;
    ctx->set_materialize_grads(false);
    variable_list outputs{from_planes(results[0], q.scalar_type())};
    if (return_weights) outputs.push_back(from_planes(results[1], q.scalar_type()));
    return outputs;
  }

  // Differentiable once: computed without a graph; asked for one (create_graph), the gradients carry a node that
  // raises if anything differentiates through them (as Python's once_differentiable, which looks at the incoming
  // gradients only, so that a second derivative through q, k or v came back without those terms).
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &q = saved[0], &k = saved[1], &v = saved[2], &stats = saved[3], &rel = saved[4],
                     &mask = saved[5];
    // edges exist for the tensors given: q, k, v, then rel_pos and window_mask where defined
    bool needs[5] = {ctx->needs_input_grad(0), ctx->needs_input_grad(1), ctx->needs_input_grad(2), false, false};
    size_t edge = 3;
    if (rel.defined()) needs[3] = ctx->needs_input_grad(edge++);
    if (mask.defined()) needs[4] = ctx->needs_input_grad(edge++);
    int64_t bits = 0;
    for (int i = 0; i < 5; ++i) bits |= int64_t(needs[i]) << i;
    const at::Tensor& grad_out = grads[0];
    const at::Tensor grad_weights = grads.size() > 1 ? grads[1] : at::Tensor();
    variable_list result(8);
    {
      static const auto backward_op = op_handle<decltype(na_backward)>("neighborhood_cpu::backward");
      at::NoGradGuard no_graph;
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      const auto given = [](const at::Tensor& t) { return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt; };
      const auto g = backward_op.call(given(grad_out), given(grad_weights), q, k, v, stats, given(rel), given(mask),
                                      ctx->saved_data["kernel_size"].toInt(), ctx->saved_data["border_mask"].toBool(),
                                      bits);
      if (needs[0]) result[0] = from_planes(g[0], q.scalar_type());
      if (needs[1]) result[1] = from_planes(g[1], k.scalar_type());
      if (needs[2] && g[2].numel() > 0) result[2] = from_planes(g[2], v.scalar_type());
      if (needs[3]) result[3] = g[3].reshape(rel.sizes()).to(rel.scalar_type());
      if (needs[4]) result[4] = g[4].reshape(mask.sizes()).to(mask.scalar_type());
    }
    // (the gradients are functions of the saved inputs and of the incoming gradients)
    const auto graphed = [](const at::Tensor& t) { return t.defined() && t.requires_grad(); };
    if (!at::GradMode::is_enabled() || (std::none_of(saved.begin(), saved.end(), graphed) &&
                                        std::none_of(grads.begin(), grads.end(), graphed))) {
      return result;
    }
    variable_list marked;
    for (const auto& t : result) marked.push_back(t.defined() ? t.detach().requires_grad_(true) : t);
    marked = torch::autograd::DelayedError(
                 "trying to differentiate twice the fused CPU neighbourhood attention, which is differentiable once; "
                 "use backend='reference' for higher-order gradients", static_cast<int64_t>(marked.size()))
                 .apply(std::move(marked));
    return marked;
  }
};

std::vector<at::Tensor> na_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const c10::optional<at::Tensor>& rel_pos,
                                     const c10::optional<at::Tensor>& window_mask, int64_t kernel_size,
                                     bool border_mask, bool return_weights) {
  return Attention::apply(q, k, v, rel_pos, window_mask, kernel_size, border_mask, return_weights);
}

}  // namespace

TORCH_LIBRARY(neighborhood_cpu, m) {
  m.def("forward(Tensor q, Tensor k, Tensor v, Tensor? rel_pos, Tensor? window_mask, int kernel_size, "
        "bool border_mask, bool return_weights) -> Tensor[]");
  m.def("backward(Tensor? grad_out, Tensor? grad_weights, Tensor q, Tensor k, Tensor v, Tensor stats, "
        "Tensor? rel_pos, Tensor? window_mask, int kernel_size, bool border_mask, int need_bits) -> Tensor[]");
  // the two above with autograd: [out] or [out, weights], (B, heads, H, W, C) in q's dtype
  m.def("attention(Tensor q, Tensor k, Tensor v, Tensor? rel_pos, Tensor? window_mask, int kernel_size, "
        "bool border_mask, bool return_weights) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(neighborhood_cpu, CPU, m) {
  m.impl("forward", &na_forward);
  m.impl("backward", &na_backward);
}

TORCH_LIBRARY_IMPL(neighborhood_cpu, CompositeImplicitAutograd, m) {
  m.impl("attention", &na_attention);
}
