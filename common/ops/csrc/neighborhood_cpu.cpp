// Fused neighbourhood attention for the CPU: forward and backward in one pass each over the image, no
// k*k-expanded tensor and no GEMM on halo keys. Built on first use by common/ops/jit_build.py and wrapped
// by common/ops/neighborhood_cpu.py (which documents the layout and the math); the oracle is
// `reference_attention` in common/ops/neighborhood.py.
//
// Vectorisation runs along image rows: one SIMD vector holds LANES consecutive query pixels of one channel,
// so every dot product of the window is a vertical multiply-add and no horizontal reduction is needed in the
// inner loops. That needs the channel-major ("planar") layout (B, heads, C, H, W) that convolution outputs
// already have; the Python side hands over q, k, v, grad_out in that layout, zero-padded by r = k // 2 on
// every side (and the row length rounded up to whole vectors), so a window read never needs a bounds check.
//
// Threads: ATen's parallel_for (torch's OpenMP pool and thread count). The forward pass splits image rows
// among threads; the backward pass splits (batch, head) planes, and every plane is processed in a fixed order
// whatever the thread count, so the backward pass is deterministic (bitwise, for any number of threads).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

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

template <typename T>
struct Simd;
template <>
struct Simd<float> {
  typedef float V __attribute__((vector_size(NA_VBYTES)));
  typedef int32_t I __attribute__((vector_size(NA_VBYTES)));
};
template <>
struct Simd<double> {
  typedef double V __attribute__((vector_size(NA_VBYTES)));
  typedef int64_t I __attribute__((vector_size(NA_VBYTES)));
};

template <typename V, typename T>
inline V loadu(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V, typename T>
inline void storeu(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

template <typename V, typename T>
inline void store_n(T* p, const V& v, int64_t n) {  // the first n lanes (n <= lanes)
  if (n * static_cast<int64_t>(sizeof(T)) == static_cast<int64_t>(sizeof(V))) {
    storeu(p, v);
  } else {
    std::memcpy(p, &v, n * sizeof(T));
  }
}

template <typename V>
inline auto hsum(const V& v) {
  auto s = v[0];
  for (size_t i = 1; i < sizeof(V) / sizeof(v[0]); ++i) s += v[i];
  return s;
}

// exp for float vectors (the Cephes expf polynomial, about 1 ulp): exact 0 below -87.3 (so exp(-inf) = 0).
inline Simd<float>::V vexp(Simd<float>::V x) {
  using V = Simd<float>::V;
  using I = Simd<float>::I;
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

// doubles (tests and fp64 users): the libm exp per lane; speed does not matter there, exactness does.
inline Simd<double>::V vexp(Simd<double>::V x) {
  for (size_t i = 0; i < sizeof(x) / sizeof(double); ++i) x[i] = std::exp(x[i]);
  return x;
}

// The geometry of one call. Padded planes are (C, hk, wk) with the image at rows [r, r + h), columns
// [r, r + w); hk = h + 2r, wk = wq + 2r, wq = w rounded up to whole vectors.
struct Geo {
  int64_t batch, heads, bh, d, dv, h, w, k, r, kk, lanes, wq, hk, wk, plane;
  bool border_mask;

  Geo(int64_t batch_, int64_t heads_, int64_t d_, int64_t dv_, int64_t h_, int64_t w_, int64_t k_, int64_t lanes_,
      bool border_mask_)
      : batch(batch_), heads(heads_), bh(batch_ * heads_), d(d_), dv(dv_), h(h_), w(w_), k(k_), r(k_ / 2),
        kk(k_ * k_), lanes(lanes_), border_mask(border_mask_) {
    wq = (w + lanes - 1) / lanes * lanes;
    hk = h + 2 * r;
    wk = wq + 2 * r;
    plane = hk * wk;
  }
};

// For each head and window row dy, the columns [lo, hi) whose window_mask is non-zero (all columns without a
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
};

template <typename T>
struct Kernel {
  using V = typename Simd<T>::V;
  static constexpr int64_t LANES = sizeof(V) / sizeof(T);
  static constexpr int GROUP = 8;  // offsets, or channels, whose accumulators stay in registers together

  // acc[j] = sum_c a[c] * (b[c][off[j]] + rel[o[j]][c]) for the n <= GROUP entries of one group; a and b
  // are planes of `stride` elements per channel. With REL false, rel is ignored.
  template <int N, bool REL>
  static inline void dots_group(const T* a, const T* b, int64_t stride, int64_t channels, const int64_t* off,
                                const int64_t* o, const T* rel, int64_t d, V* out) {
    V acc[N];
    for (int j = 0; j < N; ++j) acc[j] = V{};
    for (int64_t c = 0; c < channels; ++c) {
      const V av = loadu<V>(a + c * stride);
      const T* bc = b + c * stride;
      for (int j = 0; j < N; ++j) {
        if (REL) {
          acc[j] += av * (loadu<V>(bc + off[j]) + rel[o[j] * d + c]);
        } else {
          acc[j] += av * loadu<V>(bc + off[j]);
        }
      }
    }
    for (int j = 0; j < N; ++j) out[j] = acc[j];
  }

  template <bool REL>
  static void dots(const T* a, const T* b, int64_t stride, int64_t channels, const int64_t* off, const int64_t* o,
                   int64_t n, const T* rel, int64_t d, V* out) {
    int64_t j = 0;
    for (; j + GROUP <= n; j += GROUP) {
      dots_group<GROUP, REL>(a, b, stride, channels, off + j, o + j, rel, d, out + j);
    }
    switch (n - j) {
#define NA_CASE(N) \
  case N:          \
    dots_group<N, REL>(a, b, stride, channels, off + j, o + j, rel, d, out + j); \
    break;
      NA_CASE(1) NA_CASE(2) NA_CASE(3) NA_CASE(4) NA_CASE(5) NA_CASE(6) NA_CASE(7)
#undef NA_CASE
      default:
        break;
    }
  }

  static void window_dots(const T* a, const T* b, int64_t stride, int64_t channels, const int64_t* off,
                          const int64_t* o, int64_t n, const T* rel, int64_t d, V* out) {
    if (rel != nullptr) {
      dots<true>(a, b, stride, channels, off, o, n, rel, d, out);
    } else {
      dots<false>(a, b, stride, channels, off, o, n, rel, d, out);
    }
  }

  // out[c] (c < N) = sum_j w[j] * (b[c][off[j]] + rel[o[j]][c]): a weighted sum of window vectors for N
  // channels at once; stored (first `valid` lanes) to dst + c * dst_stride.
  template <int N, bool REL>
  static inline void weighted_group(const V* w, const T* b, int64_t stride, const int64_t* off, const int64_t* o,
                                    int64_t n, const T* rel, int64_t d, T* dst, int64_t dst_stride, int64_t valid) {
    V acc[N];
    for (int c = 0; c < N; ++c) acc[c] = V{};
    for (int64_t j = 0; j < n; ++j) {
      const V wj = w[j];
      const T* bj = b + off[j];
      for (int c = 0; c < N; ++c) {
        if (REL) {
          acc[c] += wj * (loadu<V>(bj + c * stride) + rel[o[j] * d + c]);
        } else {
          acc[c] += wj * loadu<V>(bj + c * stride);
        }
      }
    }
    for (int c = 0; c < N; ++c) store_n(dst + c * dst_stride, acc[c], valid);
  }

  static void weighted(const V* w, const T* b, int64_t stride, int64_t channels, const int64_t* off,
                       const int64_t* o, int64_t n, const T* rel, int64_t d, T* dst, int64_t dst_stride,
                       int64_t valid) {
    for (int64_t c = 0; c < channels; c += GROUP) {
      const T* bc = b + c * stride;
      T* dc = dst + c * dst_stride;
      const T* rc = rel == nullptr ? nullptr : rel + c;
      switch (std::min<int64_t>(GROUP, channels - c)) {
#define NA_CASE(N)                                                                      \
  case N:                                                                               \
    if (rc) {                                                                           \
      weighted_group<N, true>(w, bc, stride, off, o, n, rc, d, dc, dst_stride, valid);  \
    } else {                                                                            \
      weighted_group<N, false>(w, bc, stride, off, o, n, rc, d, dc, dst_stride, valid); \
    }                                                                                   \
    break;
        NA_CASE(1) NA_CASE(2) NA_CASE(3) NA_CASE(4) NA_CASE(5) NA_CASE(6) NA_CASE(7) NA_CASE(8)
#undef NA_CASE
        default:
          break;
      }
    }
  }

  // The window entries of query block (y, xb) of a plane of head `head`: offsets o = dy * k + dx over the rows
  // dy in [dy0, dy1) and the columns ranges.lo/hi of each row; off[j] is where the entry's key lies relative
  // to the block's own padded position... shifted by (-r, -r): key (y + dy - r, x + dx - r) sits at padded
  // (y + dy, x + dx), so off = dy * wk + dx from the block's padded top-left corner (y, xb).
  static int64_t window_list(const Geo& g, const Ranges& ranges, int64_t head, int64_t dy0, int64_t dy1,
                             int64_t* off, int64_t* o) {
    int64_t n = 0;
    for (int64_t dy = dy0; dy < dy1; ++dy) {
      const int64_t lo = ranges.lo[head * g.k + dy], hi = ranges.hi[head * g.k + dy];
      for (int64_t dx = lo; dx < hi; ++dx) {
        off[n] = dy * g.wk + dx;
        o[n] = dy * g.k + dx;
        ++n;
      }
    }
    return n;
  }

  // rows dy of the window of query row y that lie in the image (border="mask"), or all of them ("zeros")
  static void window_rows(const Geo& g, int64_t y, int64_t& dy0, int64_t& dy1) {
    if (g.border_mask) {
      dy0 = std::max<int64_t>(0, g.r - y);
      dy1 = std::min<int64_t>(g.k, g.h + g.r - y);
    } else {
      dy0 = 0;
      dy1 = g.k;
    }
  }

  // border="mask" at the left and right edges: per window column dx, 0 for lanes whose key column is inside
  // the image, -inf for those outside. Lanes past the image's right edge (padding queries, discarded) are
  // never masked, so their softmax stays finite. Returns false when no lane of the block needs it.
  static bool column_bias(const Geo& g, int64_t xb, V* bias) {
    if (!g.border_mask || (xb >= g.r && xb + LANES - 1 + g.r < g.w)) return false;
    const T inf = std::numeric_limits<T>::infinity();
    for (int64_t dx = 0; dx < g.k; ++dx) {
      for (int64_t lane = 0; lane < LANES; ++lane) {
        const int64_t x = xb + lane, col = x + dx - g.r;
        bias[dx][lane] = (x < g.w && (col < 0 || col >= g.w)) ? -inf : T(0);
      }
    }
    return true;
  }

  // -------------------------------------------------------------------------------------------------------
  // forward

  static void forward(const Geo& g, const T* qb, const T* kb, const T* vb, const T* rel, bool rel_per_head,
                      const T* mask, T* out, T* weights, T* lse) {
    const Ranges ranges(g, mask, false);
    const int64_t nxb = g.wq / LANES;
    at::parallel_for(0, g.bh * g.h, 1, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> off(g.kk), o(g.kk);
      std::vector<V> s(g.kk), bias(g.k);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t p = row / g.h, y = row % g.h, head = p % g.heads;
        const T* relh = rel == nullptr ? nullptr : rel + (rel_per_head ? head : 0) * g.kk * g.d;
        const T* maskh = mask == nullptr ? nullptr : mask + head * g.kk;
        int64_t dy0, dy1;
        window_rows(g, y, dy0, dy1);
        const int64_t n = window_list(g, ranges, head, dy0, dy1, off.data(), o.data());
        for (int64_t xi = 0; xi < nxb; ++xi) {
          const int64_t xb = xi * LANES, valid = std::min<int64_t>(LANES, g.w - xb);
          const T* qpos = qb + p * g.d * g.plane + (y + g.r) * g.wk + xb + g.r;
          const T* kpos = kb + p * g.d * g.plane + y * g.wk + xb;
          const T* vpos = vb + p * g.dv * g.plane + y * g.wk + xb;
          window_dots(qpos, kpos, g.plane, g.d, off.data(), o.data(), n, relh, g.d, s.data());
          if (column_bias(g, xb, bias.data())) {
            for (int64_t j = 0; j < n; ++j) s[j] += bias[o[j] % g.k];
          }
          // softmax over the window, times the mask, renormalised: P_j = e_j m_j / sum e m
          V mx = V{} - std::numeric_limits<T>::infinity();
          for (int64_t j = 0; j < n; ++j) mx = s[j] > mx ? s[j] : mx;
          mx = mx == -std::numeric_limits<T>::infinity() ? V{} : mx;  // nothing left: all weights 0
          V total = V{};
          for (int64_t j = 0; j < n; ++j) {
            V e = vexp(s[j] - mx);
            if (maskh != nullptr) e *= maskh[o[j]];
            s[j] = e;
            total += e;
          }
          const V inv = total > 0 ? T(1) / total : V{};
          for (int64_t j = 0; j < n; ++j) s[j] *= inv;
          V l;
          for (int64_t lane = 0; lane < LANES; ++lane) {
            l[lane] = total[lane] > 0 ? mx[lane] + std::log(total[lane]) : std::numeric_limits<T>::infinity();
          }
          storeu(lse + (p * g.h + y) * g.wq + xb, l);
          weighted(s.data(), vpos, g.plane, g.dv, off.data(), o.data(), n, nullptr, g.d,
                   out + (p * g.dv * g.h + y) * g.w + xb, g.h * g.w, valid);
          if (weights != nullptr) {
            T* wrow = weights + (p * g.kk * g.h + y) * g.w + xb;
            for (int64_t oo = 0; oo < g.kk; ++oo) store_n(wrow + oo * g.h * g.w, V{}, valid);
            for (int64_t j = 0; j < n; ++j) store_n(wrow + o[j] * g.h * g.w, s[j], valid);
          }
        }
      }
    });
  }

  // -------------------------------------------------------------------------------------------------------
  // backward

  struct Grads {
    T* dq;      // (bh, d, h, w) or null
    T* dk;      // (bh, d, h, w) or null
    T* dv;      // (bh, dv, h, w) or null
    T* drel;    // (bh, kk, d) per plane, or null
    T* dmask;   // (bh, kk) per plane, or null
  };

  // Per plane: (1) for every query block, the logits again, P = m exp(S - lse), dP = grad_out . v (+ the
  // weights' own gradient), dS = P (dP - sum P dP), dq = sum dS (k + rel), and P, dS written into planes of
  // the padded layout; (2) for every key block, dk = sum_o dS_o q and dv = sum_o P_o grad_out, gathered over
  // the queries that see the key (register accumulation, no scatter); (3) d rel = sum dS q per offset and
  // d mask = sum exp(S - lse) (dP - D), per plane, summed over planes by the caller in plane order.
  static void backward(const Geo& g, const T* gb, const T* gw, const T* qb, const T* kb, const T* vb, const T* lse,
                       const T* rel, bool rel_per_head, const T* mask, Grads out) {
    const bool need_mask = out.dmask != nullptr && mask != nullptr;
    const Ranges live(g, mask, need_mask), active(g, mask, false);
    const int64_t nxb = g.wq / LANES, nkb = (g.w + LANES - 1) / LANES;
    at::parallel_for(0, g.bh, 1, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> off(g.kk), o(g.kk), off2(g.kk), o2(g.kk);
      std::vector<V> s(g.kk), pw(g.kk), dp(g.kk), bias(g.k), dm(g.kk);
      // P and dS of every query and offset of one plane, (kk, hk, wk), zero outside the queries' positions
      std::vector<T> pplane(g.kk * g.plane, T(0)), dsplane(g.kk * g.plane, T(0));
      for (int64_t p = begin; p < end; ++p) {
        const int64_t head = p % g.heads;
        const T* relh = rel == nullptr ? nullptr : rel + (rel_per_head ? head : 0) * g.kk * g.d;
        const T* maskh = mask == nullptr ? nullptr : mask + head * g.kk;
        const T* qp = qb + p * g.d * g.plane;
        const T* kp = kb + p * g.d * g.plane;
        const T* vp = vb + p * g.dv * g.plane;
        const T* gp = gb == nullptr ? nullptr : gb + p * g.dv * g.plane;
        std::fill(dm.begin(), dm.end(), V{});
        for (int64_t y = 0; y < g.h; ++y) {
          int64_t dy0, dy1;
          window_rows(g, y, dy0, dy1);
          const int64_t n = window_list(g, live, head, dy0, dy1, off.data(), o.data());
          for (int64_t xi = 0; xi < nxb; ++xi) {
            const int64_t xb = xi * LANES, valid = std::min<int64_t>(LANES, g.w - xb);
            const int64_t qoff = (y + g.r) * g.wk + xb + g.r, koff = y * g.wk + xb;
            window_dots(qp + qoff, kp + koff, g.plane, g.d, off.data(), o.data(), n, relh, g.d, s.data());
            if (column_bias(g, xb, bias.data())) {
              for (int64_t j = 0; j < n; ++j) s[j] += bias[o[j] % g.k];
            }
            const V l = loadu<V>(lse + (p * g.h + y) * g.wq + xb);
            for (int64_t j = 0; j < n; ++j) {
              s[j] = vexp(s[j] - l);  // exp(S - lse): e / sum(e m)
              pw[j] = maskh == nullptr ? s[j] : s[j] * maskh[o[j]];
            }
            if (gp != nullptr) {
              window_dots(gp + qoff, vp + koff, g.plane, g.dv, off.data(), o.data(), n, nullptr, g.d, dp.data());
            } else {
              std::fill(dp.begin(), dp.begin() + n, V{});
            }
            if (gw != nullptr) {
              const T* gwrow = gw + (p * g.kk * g.h + y) * g.wq + xb;
              for (int64_t j = 0; j < n; ++j) dp[j] += loadu<V>(gwrow + o[j] * g.h * g.wq);
            }
            V dsum = V{};
            for (int64_t j = 0; j < n; ++j) dsum += pw[j] * dp[j];
            T* pcol = pplane.data() + qoff;
            T* dscol = dsplane.data() + qoff;
            for (int64_t oo = 0; oo < g.kk; ++oo) {
              storeu(pcol + oo * g.plane, V{});
              storeu(dscol + oo * g.plane, V{});
            }
            for (int64_t j = 0; j < n; ++j) {
              const V centred = dp[j] - dsum;
              if (need_mask) dm[o[j]] += s[j] * centred;
              dp[j] = pw[j] * centred;  // dS
              storeu(pcol + o[j] * g.plane, pw[j]);
              storeu(dscol + o[j] * g.plane, dp[j]);
            }
            if (out.dq != nullptr) {
              weighted(dp.data(), kp + koff, g.plane, g.d, off.data(), o.data(), n, relh, g.d,
                       out.dq + (p * g.d * g.h + y) * g.w + xb, g.h * g.w, valid);
            }
          }
        }
        // (2) key blocks: gather from the queries whose window holds the key
        if (out.dk != nullptr || out.dv != nullptr) {
          for (int64_t yk = 0; yk < g.h; ++yk) {
            // query row y = yk + r - dy must lie in the image
            const int64_t dy0 = std::max<int64_t>(0, yk + g.r - g.h + 1), dy1 = std::min<int64_t>(g.k, yk + g.r + 1);
            int64_t n = 0;
            for (int64_t dy = dy0; dy < dy1; ++dy) {
              for (int64_t dx = active.lo[head * g.k + dy]; dx < active.hi[head * g.k + dy]; ++dx) {
                off2[n] = (yk + 2 * g.r - dy) * g.wk + 2 * g.r - dx;  // the query's padded position, less xb
                o2[n] = (dy * g.k + dx) * g.plane;
                ++n;
              }
            }
            for (int64_t xi = 0; xi < nkb; ++xi) {
              const int64_t xb = xi * LANES, valid = std::min<int64_t>(LANES, g.w - xb);
              if (out.dk != nullptr) gather(dsplane.data() + xb, qp + xb, g.plane, g.d, off2.data(), o2.data(), n,
                                            out.dk + (p * g.d * g.h + yk) * g.w + xb, g.h * g.w, valid);
              if (out.dv != nullptr) gather(pplane.data() + xb, gp + xb, g.plane, g.dv, off2.data(), o2.data(), n,
                                            out.dv + (p * g.dv * g.h + yk) * g.w + xb, g.h * g.w, valid);
            }
          }
        }
        if (out.drel != nullptr) offset_channel_sums(g, dsplane.data(), qp, out.drel + p * g.kk * g.d);
        if (out.dmask != nullptr) {
          for (int64_t oo = 0; oo < g.kk; ++oo) out.dmask[p * g.kk + oo] = need_mask ? hsum(dm[oo]) : T(0);
        }
      }
    });
  }

  // dst[c] = sum_j w[wo[j] + off[j]] * x[c][off[j]] for channels c, N at a time (w: offset planes, x: channel
  // planes, both of `stride` elements per plane, pointers already at the block's column).
  template <int N>
  static inline void gather_group(const T* w, const T* x, int64_t stride, const int64_t* off, const int64_t* wo,
                                  int64_t n, T* dst, int64_t dst_stride, int64_t valid) {
    V acc[N];
    for (int c = 0; c < N; ++c) acc[c] = V{};
    for (int64_t j = 0; j < n; ++j) {
      const V wj = loadu<V>(w + wo[j] + off[j]);
      const T* xj = x + off[j];
      for (int c = 0; c < N; ++c) acc[c] += wj * loadu<V>(xj + c * stride);
    }
    for (int c = 0; c < N; ++c) store_n(dst + c * dst_stride, acc[c], valid);
  }

  static void gather(const T* w, const T* x, int64_t stride, int64_t channels, const int64_t* off, const int64_t* wo,
                     int64_t n, T* dst, int64_t dst_stride, int64_t valid) {
    for (int64_t c = 0; c < channels; c += GROUP) {
      const T* xc = x + c * stride;
      T* dc = dst + c * dst_stride;
      switch (std::min<int64_t>(GROUP, channels - c)) {
#define NA_CASE(N)                                                        \
  case N:                                                                 \
    gather_group<N>(w, xc, stride, off, wo, n, dc, dst_stride, valid);    \
    break;
        NA_CASE(1) NA_CASE(2) NA_CASE(3) NA_CASE(4) NA_CASE(5) NA_CASE(6) NA_CASE(7) NA_CASE(8)
#undef NA_CASE
        default:
          break;
      }
    }
  }

  // out[o][c] = sum over the plane's query positions of ds[o][pos] * q[c][pos] (4 offsets x 4 channels of
  // accumulators at a time; the last group repeats an index instead of branching, and stores only once).
  static void offset_channel_sums(const Geo& g, const T* ds, const T* q, T* out) {
    for (int64_t o0 = 0; o0 < g.kk; o0 += 4) {
      for (int64_t c0 = 0; c0 < g.d; c0 += 4) {
        int64_t oi[4], ci[4];
        for (int i = 0; i < 4; ++i) {
          oi[i] = std::min<int64_t>(o0 + i, g.kk - 1);
          ci[i] = std::min<int64_t>(c0 + i, g.d - 1);
        }
        V acc[4][4];
        for (int a = 0; a < 4; ++a)
          for (int b = 0; b < 4; ++b) acc[a][b] = V{};
        for (int64_t y = 0; y < g.h; ++y) {
          const int64_t row = (y + g.r) * g.wk + g.r;
          for (int64_t xb = 0; xb < g.wq; xb += LANES) {
            V dv[4], qv[4];
            for (int i = 0; i < 4; ++i) {
              dv[i] = loadu<V>(ds + oi[i] * g.plane + row + xb);
              qv[i] = loadu<V>(q + ci[i] * g.plane + row + xb);
            }
            for (int a = 0; a < 4; ++a)
              for (int b = 0; b < 4; ++b) acc[a][b] += dv[a] * qv[b];
          }
        }
        for (int a = 0; a < 4 && o0 + a < g.kk; ++a)
          for (int b = 0; b < 4 && c0 + b < g.d; ++b) out[(o0 + a) * g.d + c0 + b] = hsum(acc[a][b]);
      }
    }
  }
};

// ----------------------------------------------------------------------------------------------------------
// ATen glue

int64_t lanes_for(at::ScalarType t) {
  return NA_VBYTES / (t == at::kDouble ? 8 : 4);
}

at::ScalarType compute_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// (B, heads, H, W, C) any strides and dtype -> (B, heads, C, hk, wk) in the compute dtype, zero-padded
at::Tensor padded_planes(const at::Tensor& x, const Geo& g, at::ScalarType ct) {
  auto out = at::zeros({g.batch, g.heads, x.size(4), g.hk, g.wk}, x.options().dtype(ct));
  out.narrow(3, g.r, g.h).narrow(4, g.r, g.w).copy_(x.permute({0, 1, 4, 2, 3}));
  return out;
}

std::vector<at::Tensor> na_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const c10::optional<at::Tensor>& rel_pos,
                                   const c10::optional<at::Tensor>& window_mask, int64_t kernel_size,
                                   bool border_mask, bool return_weights) {
  TORCH_CHECK(q.dim() == 5 && k.sizes() == q.sizes() && v.dim() == 5, "q, k, v must be (B, heads, H, W, d)");
  TORCH_CHECK(q.device().is_cpu(), "the fused CPU kernel takes CPU tensors");
  const auto ct = compute_type(q.scalar_type());
  const Geo g(q.size(0), q.size(1), q.size(4), v.size(4), q.size(2), q.size(3), kernel_size, lanes_for(ct),
              border_mask);
  auto qb = padded_planes(q, g, ct), kb = padded_planes(k, g, ct), vb = padded_planes(v, g, ct);
  at::Tensor rel, mask;
  if (rel_pos.has_value() && rel_pos->defined()) rel = rel_pos->to(ct).contiguous();
  if (window_mask.has_value() && window_mask->defined()) mask = window_mask->to(ct).contiguous();
  auto opts = q.options().dtype(ct);
  auto out = at::empty({g.batch, g.heads, g.dv, g.h, g.w}, opts);
  auto lse = at::empty({g.batch, g.heads, g.h, g.wq}, opts);
  auto weights = return_weights ? at::empty({g.batch, g.heads, g.kk, g.h, g.w}, opts) : at::empty({0}, opts);
  AT_DISPATCH_FLOATING_TYPES(ct, "neighborhood_cpu_forward", [&] {
    Kernel<scalar_t>::forward(g, qb.data_ptr<scalar_t>(), kb.data_ptr<scalar_t>(), vb.data_ptr<scalar_t>(),
                              rel.defined() ? rel.data_ptr<scalar_t>() : nullptr, rel.defined() && rel.dim() == 4,
                              mask.defined() ? mask.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(),
                              return_weights ? weights.data_ptr<scalar_t>() : nullptr, lse.data_ptr<scalar_t>());
  });
  return {out, weights, lse, qb, kb, vb};
}

std::vector<at::Tensor> na_backward(const c10::optional<at::Tensor>& grad_out,
                                    const c10::optional<at::Tensor>& grad_weights, const at::Tensor& qb,
                                    const at::Tensor& kb, const at::Tensor& vb, const at::Tensor& lse,
                                    const c10::optional<at::Tensor>& rel_pos,
                                    const c10::optional<at::Tensor>& window_mask, int64_t kernel_size,
                                    bool border_mask, int64_t height, int64_t width, int64_t need_bits) {
  // which gradients are wanted, one bit each: q, k, v, rel_pos, window_mask
  const bool needs[5] = {bool(need_bits & 1), bool(need_bits & 2), bool(need_bits & 4), bool(need_bits & 8),
                         bool(need_bits & 16)};
  const auto ct = qb.scalar_type();
  const Geo g(qb.size(0), qb.size(1), qb.size(2), vb.size(2), height, width, kernel_size, lanes_for(ct),
              border_mask);
  TORCH_CHECK(qb.size(3) == g.hk && qb.size(4) == g.wk && lse.size(3) == g.wq, "inconsistent saved geometry");
  const bool has_out = grad_out.has_value() && grad_out->defined();
  const bool has_w = grad_weights.has_value() && grad_weights->defined();
  at::Tensor gb, gw, rel, mask;
  if (has_out) gb = padded_planes(*grad_out, g, ct);
  if (has_w) {  // (B, heads, H, W, kk) -> (B, heads, kk, H, wq), zero in the padding lanes
    gw = at::zeros({g.batch, g.heads, g.kk, g.h, g.wq}, qb.options());
    gw.narrow(4, 0, g.w).copy_(grad_weights->permute({0, 1, 4, 2, 3}));
  }
  if (rel_pos.has_value() && rel_pos->defined()) rel = rel_pos->to(ct).contiguous();
  if (window_mask.has_value() && window_mask->defined()) mask = window_mask->to(ct).contiguous();
  auto opts = qb.options();
  auto none = at::empty({0}, opts);
  auto dq = needs[0] ? at::empty({g.batch, g.heads, g.d, g.h, g.w}, opts) : none;
  auto dk = needs[1] ? at::empty({g.batch, g.heads, g.d, g.h, g.w}, opts) : none;
  auto dv = needs[2] && has_out ? at::empty({g.batch, g.heads, g.dv, g.h, g.w}, opts) : none;
  const bool need_rel = rel.defined() && needs[3], need_mask = mask.defined() && needs[4];
  auto drel_part = need_rel ? at::empty({g.batch, g.heads, g.kk, g.d}, opts) : none;
  auto dmask_part = need_mask ? at::empty({g.batch, g.heads, g.kk}, opts) : none;
  AT_DISPATCH_FLOATING_TYPES(ct, "neighborhood_cpu_backward", [&] {
    using K = Kernel<scalar_t>;
    typename K::Grads grads{needs[0] ? dq.data_ptr<scalar_t>() : nullptr,
                            needs[1] ? dk.data_ptr<scalar_t>() : nullptr,
                            dv.numel() ? dv.data_ptr<scalar_t>() : nullptr,
                            need_rel ? drel_part.data_ptr<scalar_t>() : nullptr,
                            need_mask ? dmask_part.data_ptr<scalar_t>() : nullptr};
    K::backward(g, has_out ? gb.data_ptr<scalar_t>() : nullptr, has_w ? gw.data_ptr<scalar_t>() : nullptr,
                qb.data_ptr<scalar_t>(), kb.data_ptr<scalar_t>(), vb.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(),
                rel.defined() ? rel.data_ptr<scalar_t>() : nullptr, rel.defined() && rel.dim() == 4,
                mask.defined() ? mask.data_ptr<scalar_t>() : nullptr, grads);
  });
  // per-plane partial sums -> per head (or shared), summed in plane order: deterministic
  at::Tensor drel, dmask;
  if (need_rel) {
    const int64_t groups = rel.dim() == 4 ? g.heads : 1;
    drel = at::zeros({groups, g.kk, g.d}, opts);
    AT_DISPATCH_FLOATING_TYPES(ct, "neighborhood_cpu_drel", [&] {
      const scalar_t* src = drel_part.data_ptr<scalar_t>();
      scalar_t* dst = drel.data_ptr<scalar_t>();
      for (int64_t p = 0; p < g.bh; ++p) {
        scalar_t* to = dst + (groups == 1 ? 0 : p % g.heads) * g.kk * g.d;
        for (int64_t i = 0; i < g.kk * g.d; ++i) to[i] += src[p * g.kk * g.d + i];
      }
    });
  } else {
    drel = none;
  }
  if (need_mask && g.kk == 1) {  // one offset: its renormalised weight is 1 whatever the mask
    dmask = at::zeros({g.heads, g.kk}, opts);
  } else if (need_mask) {
    dmask = at::zeros({g.heads, g.kk}, opts);
    AT_DISPATCH_FLOATING_TYPES(ct, "neighborhood_cpu_dmask", [&] {
      const scalar_t* src = dmask_part.data_ptr<scalar_t>();
      scalar_t* dst = dmask.data_ptr<scalar_t>();
      for (int64_t p = 0; p < g.bh; ++p)
        for (int64_t i = 0; i < g.kk; ++i) dst[(p % g.heads) * g.kk + i] += src[p * g.kk + i];
    });
  } else {
    dmask = none;
  }
  return {dq, dk, dv, drel, dmask};
}

int64_t na_lanes(int64_t double_precision) {
  return lanes_for(double_precision ? at::kDouble : at::kFloat);
}

}  // namespace

TORCH_LIBRARY(neighborhood_cpu, m) {
  m.def("forward(Tensor q, Tensor k, Tensor v, Tensor? rel_pos, Tensor? window_mask, int kernel_size, "
        "bool border_mask, bool return_weights) -> Tensor[]");
  m.def("backward(Tensor? grad_out, Tensor? grad_weights, Tensor qb, Tensor kb, Tensor vb, Tensor lse, "
        "Tensor? rel_pos, Tensor? window_mask, int kernel_size, bool border_mask, int height, int width, "
        "int need_bits) -> Tensor[]");
  m.def("lanes(int double_precision) -> int", &na_lanes);
}

TORCH_LIBRARY_IMPL(neighborhood_cpu, CPU, m) {
  m.impl("forward", &na_forward);
  m.impl("backward", &na_backward);
}
