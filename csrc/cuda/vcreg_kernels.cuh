// Device code of the `cuda` backend: plain CUDA C++, templated on scalar types, with no torch
// headers, so that tools/hip_compile_check.py can hipify and compile it for AMD GPUs (gfx906)
// on a machine with neither a GPU nor a ROCm build of torch. The host side (dtype dispatch,
// allocation, the cuBLAS products through ATen, registration) is vcreg_cuda.cu.
//
// Notation of SPEC section 2. x3: (B, d, L) is contiguous, either "rows" (L == 1: X is a
// row-major n x d matrix) or "bdl" (NCHW with dim=1); the samples are s = b*L + l, n = B*L, and
// X[s, j] = x3[b, j, l] at offset (b*d + j)*L + l in both layouts.
//
// Statistics over shifted data (SPEC section 2, Numerics):
//   K    = mean of ns = min(n, 64) evenly spaced rows of X, rounded to x's dtype T   (d)   shift
//   Y    = X - K, subtracted in the accumulate dtype A, then rounded to T (the GEMM input; exact
//          where |mu| >> spread, as x and K are then within a factor 2 of each other), stored
//          "rows" as Y (n x d) or "bdl" as Y^T (d x n), row-major: both keep the pass coalesced
//   S    = 1^T (X - K) in A (d): per-chunk partial column sums, added up in a fixed order
//   Q    = Y^T Y  (d x d, in A): cuBLAS on the host side
//   mu   = K + S/n,  M2 = Xc^T Xc = sym(Q) - S S^T / n
// M2 is Chan's merge of the shifted sums: exact in real arithmetic, and since S/n = mu - K is of
// the order of the spread, not of |mu|, it has none of the cancellation of X^T X - n mu mu^T.
// sym(Q) = (Q + Q^T)/2 makes M2, C and G exactly symmetric whatever order cuBLAS summed in.
//
// Finalize: C = M2/(n-1), s_j = sqrt(C_jj + eps), G of SPEC section 2 (d x d, in A), the terms
// [l_var, l_cov], and r = G (S/n) (d), so that the apply needs no second centring pass:
//   (X - mu) G = Y G - 1 (S/n)^T G = P - 1 r^T,   P = Y G (cuBLAS, in A)
//   grad_x = grad_y + P - 1 r^T       (the epilogue; grad_x in grad_y's dtype, x3's layout)
// For half/bfloat16, the GEMM takes G in x's dtype: G is scaled by a power of two 2^k (chosen on
// the device from max|G|, so fp16 neither underflows, at G ~ 1e-9, nor overflows) and P by 2^-k.
//
// The VICReg loss's pair kernels (SPEC section 9) on two branches Z_a, Z_b of one shape:
//   statistics: each branch's as above; branch b's shift pass also reads Z_a and sums
//     (Z_a - Z_b)^2 per (chunk, feature) in A, and invariance_total_kernel adds those partial
//     sums in float64 in a fixed order: the invariance sum costs one extra read of Z_a.
//   apply: per branch Y = T(Z - mu) and P = Y G (cuBLAS), then one epilogue over both branches,
//     grad_a = g (P_a + c (Z_a - Z_b)),  grad_b = g (P_b - c (Z_a - Z_b)),  g, c device scalars.
//     The host side (vcreg_cuda.cu) says where Y and P live: no n x d temporary beyond the gradients.
//
// Determinism: no atomics; every reduction has a fixed shape (chunking depends only on the
// shapes and the device's SM count) and a fixed order (shared-memory trees). No warp-level
// primitives at all, so nothing assumes a 32-lane warp (AMD's is 64).
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace vcreg {
namespace cuda {

constexpr int kThreads = 256;  // every kernel's block size (a power of two: the trees rely on it)
constexpr int kUnroll = 4;     // loads in flight per thread in the streaming kernels
constexpr int kShiftSamples = 64;
constexpr int kPairUnroll = 2;  // the pair epilogue's elements in flight per thread (four streams each)

// bfloat16 as its bits, converted by hand: HIP's bf16 header differs between ROCm releases
// (older ones have none), and this keeps the device code identical on both vendors.
struct alignas(2) bf16 {
  unsigned short bits;
};

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };
template <typename T> using acc_t = typename Acc<T>::type;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(bf16 v) {
  return __uint_as_float(static_cast<unsigned int>(v.bits) << 16);
}

template <typename T> struct From;
template <> struct From<float> {
  template <typename A> static __device__ __forceinline__ float acc(A v) { return static_cast<float>(v); }
};
template <> struct From<double> {
  template <typename A> static __device__ __forceinline__ double acc(A v) { return static_cast<double>(v); }
};
template <> struct From<__half> {
  template <typename A> static __device__ __forceinline__ __half acc(A v) {
    return __float2half_rn(static_cast<float>(v));
  }
};
template <> struct From<bf16> {
  // Round to nearest even, NaN kept quiet: torch's float -> bfloat16 conversion.
  template <typename A> static __device__ __forceinline__ bf16 acc(A v) {
    unsigned int u = __float_as_uint(static_cast<float>(v));
    if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{static_cast<unsigned short>((u >> 16) | 0x40u)};
    u += 0x7fffu + ((u >> 16) & 1u);
    return bf16{static_cast<unsigned short>(u >> 16)};
  }
};
template <typename T, typename A> __device__ __forceinline__ T from_acc(A v) { return From<T>::acc(v); }

// NaN-propagating relu and clip (as torch.relu / torch.clamp), NaN-ignoring max (for the scale).
template <typename A> __device__ __forceinline__ A relu(A v) { return v > A(0) ? v : (v != v ? v : A(0)); }
template <typename A> __device__ __forceinline__ A clip(A v, A delta) {
  return v < -delta ? -delta : (v > delta ? delta : v);
}
template <typename A> __device__ __forceinline__ A max_ignore_nan(A a, A b) { return b > a ? b : a; }
template <typename A> __device__ __forceinline__ A absval(A v) { return v < A(0) ? -v : v; }

// phi of SPEC section 2: c^2, or the smooth L1 with threshold delta.
template <typename A> __device__ __forceinline__ A phi(A c, bool has_delta, A delta) {
  if (!has_delta) return c * c;
  const A a = absval(c);
  return a <= delta ? c * c : A(2) * delta * a - delta * delta;
}

struct Sum {
  template <typename A> __device__ __forceinline__ A operator()(A a, A b) const { return a + b; }
};
struct MaxIgnoreNan {
  template <typename A> __device__ __forceinline__ A operator()(A a, A b) const { return max_ignore_nan(a, b); }
};

// Reduce one value per thread over the block, in a fixed tree order (deterministic).
// smem: kThreads entries; returns the result to every thread.
template <typename A, typename Op>
__device__ __forceinline__ A block_reduce(A v, A* smem, Op op) {
  const int t = threadIdx.x;
  smem[t] = v;
  __syncthreads();
  for (int h = kThreads / 2; h > 0; h >>= 1) {
    if (t < h) smem[t] = op(smem[t], smem[t + h]);
    __syncthreads();
  }
  const A r = smem[0];
  __syncthreads();
  return r;
}

// The "bdl" walk: a thread visits the samples s = b*L + l of one feature j in steps of kThreads
// samples, keeping only the offset (b*d + j)*L + l of x3[b, j, l] and l; the steps are uniform,
// computed once on the host (make_walk), so the walk costs an add and a compare per sample.
struct Walk {
  int64_t L;         // samples per batch item
  int64_t step_l;    // kThreads % L
  int64_t step_off;  // offset change of a step without a carry: (kThreads / L)*d*L + step_l
  int64_t wrap;      // extra offset change when l wraps into the next batch item: d*L - L
};

inline Walk make_walk(int64_t d, int64_t L) {
  return Walk{L, kThreads % L, (kThreads / L) * d * L + kThreads % L, d * L - L};
}

struct SampleCursor {
  int64_t off, l;
  __device__ __forceinline__ SampleCursor(int64_t s, int64_t j, int64_t d, const Walk& w) {
    const int64_t b = s / w.L;
    l = s - b * w.L;
    off = (b * d + j) * w.L + l;
  }
  __device__ __forceinline__ void advance(const Walk& w) {
    l += w.step_l;
    off += w.step_off;
    if (l >= w.L) {
      l -= w.L;
      off += w.wrap;
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Statistics

// Sum v over the TS = kThreads/W lanes ts of each column lane tj (thread t = ts*W + tj), in a
// fixed tree order; the result is valid at ts == 0.
template <typename A>
__device__ __forceinline__ A lanes_reduce(A v, A* smem, int tj, int ts, int W) {
  smem[ts * W + tj] = v;
  __syncthreads();
  for (int h = kThreads / W / 2; h > 0; h >>= 1) {
    if (ts < h) smem[ts * W + tj] += smem[(ts + h) * W + tj];
    __syncthreads();
  }
  return smem[tj];
}

// K_j = mean of X[s_k, j] over ns = min(n, kShiftSamples) rows s_k = floor(k n / ns), spread over
// the batch so that K sits within a few standard deviations of mu. Grid: ceil(d / kShiftColumns),
// each block kShiftColumns columns by kThreads/kShiftColumns sample lanes.
constexpr int kShiftColumns = 32;
template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
shift_estimate_kernel(const T* __restrict__ x, int64_t n, int64_t d, int64_t L, A* __restrict__ K) {
  __shared__ A smem[kThreads];
  constexpr int W = kShiftColumns;
  const int tj = threadIdx.x % W;
  const int ts = threadIdx.x / W;
  const int64_t j = blockIdx.x * static_cast<int64_t>(W) + tj;
  const int ns = n < kShiftSamples ? static_cast<int>(n) : kShiftSamples;
  A acc = A(0);
  if (j < d) {
    for (int k = ts; k < ns; k += kThreads / W) {
      const int64_t s = static_cast<int64_t>(k) * n / ns;
      const int64_t b = s / L;
      acc += to_acc(x[(b * d + j) * L + (s - b * L)]);
    }
  }
  acc = lanes_reduce(acc, smem, tj, ts, W);
  // K on x's grid: where the mean dominates the spread, every x lies within a factor 2 of K, and
  // then x - K is exact in x's dtype (Sterbenz), so Y carries no rounding at all.
  if (ts == 0 && j < d) K[j] = ns > 0 ? to_acc(from_acc<T>(acc / A(ns))) : A(0);
}

// The "rows" tiling of shift_rows_kernel and the apply epilogues: W threads across features (tj),
// TS = kThreads / W along samples (ts); feature j = blockIdx.x * W + tj, rows [r0, r1) of chunk
// blockIdx.y.
struct RowsTile {
  int tj, ts, TS;
  int64_t j, r0, r1;
};

__device__ __forceinline__ RowsTile rows_tile(int W, int64_t n, int64_t rows_per_chunk) {
  RowsTile t;
  t.tj = threadIdx.x % W;
  t.ts = threadIdx.x / W;
  t.TS = kThreads / W;
  t.j = blockIdx.x * static_cast<int64_t>(W) + t.tj;
  t.r0 = blockIdx.y * rows_per_chunk;
  t.r1 = t.r0 + rows_per_chunk < n ? t.r0 + rows_per_chunk : n;
  return t;
}

// "rows" layout: Y[r, j] = T(X[r, j] - K_j) for the rows of chunk blockIdx.y and the columns of
// tile blockIdx.x (width W, a power of two <= 32, so each row's read is one coalesced segment);
// kSums: partial[blockIdx.y, j] = sum over the chunk of X[r, j] - K_j before its rounding to T,
// so that mu = K + S/n is as accurate as the accumulate dtype whatever x's dtype.
// kInv (the VICReg pair statistics, on branch b with other = branch a): also
// inv_partial[blockIdx.y, j] = sum over the chunk of (other[r, j] - X[r, j])^2 in A, from the
// same pass over X, so that the invariance sum costs one extra read of the other branch only.
template <typename T, typename A, bool kSums, bool kInv = false>
__global__ void __launch_bounds__(kThreads)
shift_rows_kernel(const T* __restrict__ x, const A* __restrict__ K, int64_t n, int64_t d, int W,
                  int64_t rows_per_chunk, T* __restrict__ y, A* __restrict__ partial,
                  const T* __restrict__ other = nullptr, A* __restrict__ inv_partial = nullptr) {
  __shared__ A smem[kThreads];
  const auto [tj, ts, TS, j, r0, r1] = rows_tile(W, n, rows_per_chunk);
  A sum = A(0), sq = A(0);
  if (j < d) {
    const A k = K[j];
    int64_t r = r0 + ts;
    for (; r + (kUnroll - 1) * TS < r1; r += kUnroll * TS) {
      A v[kUnroll], o[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        v[u] = to_acc(x[(r + u * TS) * d + j]);
        if (kInv) o[u] = to_acc(other[(r + u * TS) * d + j]);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const A yv = v[u] - k;
        y[(r + u * TS) * d + j] = from_acc<T>(yv);
        if (kSums) sum += yv;
        if (kInv) {
          const A t = o[u] - v[u];
          sq += t * t;
        }
      }
    }
    for (; r < r1; r += TS) {
      const A xv = to_acc(x[r * d + j]);
      const A yv = xv - k;
      y[r * d + j] = from_acc<T>(yv);
      if (kSums) sum += yv;
      if (kInv) {
        const A t = to_acc(other[r * d + j]) - xv;
        sq += t * t;
      }
    }
  }
  if (kSums) {
    sum = lanes_reduce(sum, smem, tj, ts, W);
    if (ts == 0 && j < d) partial[blockIdx.y * d + j] = sum;
  }
  if (kInv) {
    __syncthreads();  // every lane has read the column sums' result before smem is reused
    sq = lanes_reduce(sq, smem, tj, ts, W);
    if (ts == 0 && j < d) inv_partial[blockIdx.y * d + j] = sq;
  }
}

// "bdl" layout: Y^T[j, s] = T(x3[b, j, l] - K_j) for feature j = blockIdx.x and the samples of
// chunk blockIdx.y; both the read (along l) and the write (along s) are contiguous. kSums, kInv:
// as shift_rows_kernel's.
template <typename T, typename A, bool kSums, bool kInv = false>
__global__ void __launch_bounds__(kThreads)
shift_cols_kernel(const T* __restrict__ x, const A* __restrict__ K, int64_t n, int64_t d, Walk w,
                  int64_t samples_per_chunk, T* __restrict__ yt, A* __restrict__ partial,
                  const T* __restrict__ other = nullptr, A* __restrict__ inv_partial = nullptr) {
  __shared__ A smem[kThreads];
  const int64_t j = blockIdx.x;
  const int64_t s0 = blockIdx.y * samples_per_chunk;
  const int64_t s1 = s0 + samples_per_chunk < n ? s0 + samples_per_chunk : n;
  const A k = K[j];
  T* __restrict__ yrow = yt + j * n;
  A sum = A(0), sq = A(0);
  int64_t s = s0 + threadIdx.x;
  SampleCursor cur(s, j, d, w);
  for (; s + (kUnroll - 1) * kThreads < s1; s += kUnroll * kThreads) {
    A v[kUnroll], o[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      v[u] = to_acc(x[cur.off]);
      if (kInv) o[u] = to_acc(other[cur.off]);
      cur.advance(w);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const A yv = v[u] - k;
      yrow[s + u * kThreads] = from_acc<T>(yv);
      if (kSums) sum += yv;
      if (kInv) {
        const A t = o[u] - v[u];
        sq += t * t;
      }
    }
  }
  for (; s < s1; s += kThreads) {
    const A xv = to_acc(x[cur.off]);
    const A yv = xv - k;
    yrow[s] = from_acc<T>(yv);
    if (kSums) sum += yv;
    if (kInv) {
      const A t = to_acc(other[cur.off]) - xv;
      sq += t * t;
    }
    cur.advance(w);
  }
  if (kSums) {
    sum = block_reduce(sum, smem, Sum());
    if (threadIdx.x == 0) partial[blockIdx.y * d + j] = sum;
  }
  if (kInv) {
    sq = block_reduce(sq, smem, Sum());
    if (threadIdx.x == 0) inv_partial[blockIdx.y * d + j] = sq;
  }
}

// One block: *inv = the sum of the count partial sums of the invariance term (chunks x features),
// thread t adding entries t, t + kThreads, ... in float64, then the tree: a fixed order.
template <typename A>
__global__ void __launch_bounds__(kThreads)
invariance_total_kernel(const A* __restrict__ inv_partial, int64_t count, A* __restrict__ inv) {
  __shared__ double smem[kThreads];
  double s = 0.0;
  for (int64_t k = threadIdx.x; k < count; k += kThreads) s += static_cast<double>(inv_partial[k]);
  s = block_reduce(s, smem, Sum());
  if (threadIdx.x == 0) *inv = static_cast<A>(s);
}

// Per column j (one thread each): S_j = sum of the chunk partials in chunk order, mu_j = K_j + S_j/n,
// dmu_j = S_j/n (S_j NaN where it is infinite). With gdiag != nullptr (the backward) also the diagonal of SPEC section 2:
// C_jj = (Q_jj - S_j S_j/n)/(n-1), s_j = sqrt(C_jj + eps), G_jj, relu(gamma - s_j).
template <typename A>
__global__ void __launch_bounds__(kThreads)
column_stats_kernel(const A* __restrict__ partial, int64_t nchunks, const A* __restrict__ K,
                    const A* __restrict__ Q, int64_t n, int64_t d, A* __restrict__ colsum,
                    A* __restrict__ dmu, A* __restrict__ mu, A eps, A gamma, A coef_var,
                    A* __restrict__ gdiag, A* __restrict__ lvar) {
  const int64_t j = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x;
  if (j >= d) return;
  A S = A(0);
  for (int64_t c = 0; c < nchunks; ++c) S += partial[c * d + j];
  mu[j] = K[j] + S / A(n);  // NaN for n == 0, as the mean of no rows; +-Inf where x holds one
  // An infinite column sum means an infinite x in column j, where Xc = X - mu is NaN (Inf - Inf)
  // and with it row and column j of C; carried as a NaN sum, it makes them NaN here too, where
  // the shifted sums would give Inf - Inf or +-Inf depending on signs.
  if (isinf(S)) S = S - S;
  const A m = S / A(n);
  colsum[j] = S;
  dmu[j] = m;
  if (gdiag != nullptr) {
    const A c = (Q[j * d + j] - S * S / A(n)) / A(n - 1);
    const A sd = sqrt(c + eps);
    gdiag[j] = sd < gamma ? -coef_var / sd : A(0);  // the hinge's gradient is 0 at s_j == gamma
    lvar[j] = relu(gamma - sd);
  }
}

// M2[i, j] = (Q[i, j] + Q[j, i])/2 - (S_i S_j)/n: one block per row i (the stats op's output).
// Every term is symmetric in (i, j) bit for bit, so M2 is exactly symmetric.
template <typename A>
__global__ void __launch_bounds__(kThreads)
m2_kernel(const A* __restrict__ Q, const A* __restrict__ colsum, int64_t n, int64_t d, A* __restrict__ M2) {
  const int64_t i = blockIdx.x;
  const A Si = colsum[i];
  for (int64_t j = threadIdx.x; j < d; j += kThreads) {
    const A corr = n > 0 ? Si * colsum[j] / A(n) : A(0);  // no rows: M2 = 0, as Xc^T Xc of an empty Xc
    M2[i * d + j] = A(0.5) * (Q[i * d + j] + Q[j * d + i]) - corr;
  }
}

// Row i of G (one block per row): G_ij = coef_cov * clip(C_ij) for j != i, G_ii from
// column_stats_kernel; and the row's share of the finalize reductions: phi_row[i] = sum over
// j != i of phi(C_ij), r[i] = sum_j G_ij dmu_j (= (G dmu)_i = (dmu^T G)_i, G symmetric),
// amax_row[i] = max_j |G_ij| (for the half/bfloat16 scale).
template <typename A>
__global__ void __launch_bounds__(kThreads)
gradient_kernel(const A* __restrict__ Q, const A* __restrict__ colsum, const A* __restrict__ dmu,
                const A* __restrict__ gdiag, int64_t n, int64_t d, A coef_cov, bool has_delta, A delta,
                A* __restrict__ G, A* __restrict__ phi_row, A* __restrict__ r, A* __restrict__ amax_row) {
  __shared__ A smem[kThreads];
  const int64_t i = blockIdx.x;
  const A Si = colsum[i];
  const A nm1 = A(n - 1);
  A ph = A(0), ri = A(0), am = A(0);
  for (int64_t j = threadIdx.x; j < d; j += kThreads) {
    A g;
    if (j == i) {
      g = gdiag[i];
    } else {
      const A c = (A(0.5) * (Q[i * d + j] + Q[j * d + i]) - Si * colsum[j] / A(n)) / nm1;
      g = coef_cov * (has_delta ? clip(c, delta) : c);
      ph += phi(c, has_delta, delta);
    }
    G[i * d + j] = g;
    ri += g * dmu[j];
    am = max_ignore_nan(am, absval(g));
  }
  ph = block_reduce(ph, smem, Sum());
  ri = block_reduce(ri, smem, Sum());
  am = block_reduce(am, smem, MaxIgnoreNan());
  if (threadIdx.x == 0) {
    phi_row[i] = ph;
    r[i] = ri;
    amax_row[i] = am;
  }
}

// amax_row[i] = max_j |G_ij|, for the apply op's scale when G comes from the caller.
template <typename A>
__global__ void __launch_bounds__(kThreads)
row_absmax_kernel(const A* __restrict__ G, int64_t d, A* __restrict__ amax_row) {
  __shared__ A smem[kThreads];
  const int64_t i = blockIdx.x;
  A am = A(0);
  for (int64_t j = threadIdx.x; j < d; j += kThreads) am = max_ignore_nan(am, absval(G[i * d + j]));
  am = block_reduce(am, smem, MaxIgnoreNan());
  if (threadIdx.x == 0) amax_row[i] = am;
}

// One block. terms = [l_var, l_cov] = [sum(lvar)/d, sum(phi_row)/(d(d-1))] where lvar/phi_row
// are given; scale = [2^k, 2^-k] with 2^k max|G| in [2^14, 2^15) where amax_row is given (1 if
// G is zero or not finite).
template <typename A>
__global__ void __launch_bounds__(kThreads)
finalize_kernel(const A* __restrict__ lvar, const A* __restrict__ phi_row, const A* __restrict__ amax_row,
                int64_t d, A* __restrict__ terms, A* __restrict__ scale) {
  __shared__ A smem[kThreads];
  A lv = A(0), ph = A(0), am = A(0);
  for (int64_t k = threadIdx.x; k < d; k += kThreads) {
    if (lvar != nullptr) lv += lvar[k];
    if (phi_row != nullptr) ph += phi_row[k];
    if (amax_row != nullptr) am = max_ignore_nan(am, amax_row[k]);
  }
  lv = block_reduce(lv, smem, Sum());
  ph = block_reduce(ph, smem, Sum());
  am = block_reduce(am, smem, MaxIgnoreNan());
  if (threadIdx.x != 0) return;
  if (terms != nullptr) {
    terms[0] = lv / A(d);
    terms[1] = d > 1 ? ph / A(d * (d - 1)) : A(0);
  }
  if (scale != nullptr) {
    int k = 0;
    if (am > A(0) && am <= A(3.0e38)) {  // finite and nonzero
      int e;
      frexp(static_cast<double>(am), &e);  // am = f 2^e, f in [0.5, 1)
      k = 15 - e;
      k = k < -120 ? -120 : (k > 120 ? 120 : k);
    }
    scale[0] = static_cast<A>(ldexp(1.0, k));
    scale[1] = static_cast<A>(ldexp(1.0, -k));
  }
}

// Gs = T(G * scale[0]): the GEMM operand for half/bfloat16 inputs.
template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
scale_convert_kernel(const A* __restrict__ G, const A* __restrict__ scale, int64_t count, T* __restrict__ Gs) {
  const A sc = scale[0];
  for (int64_t k = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; k < count;
       k += static_cast<int64_t>(gridDim.x) * kThreads)
    Gs[k] = from_acc<T>(G[k] * sc);
}

// ---------------------------------------------------------------------------------------------
// Apply epilogue: grad_x = grad_y + P * inv_scale - r (r, inv_scale may be null: 0, 1).

// "rows": P (n x d) row-major; same tiling as shift_rows_kernel.
template <typename GY, typename A>
__global__ void __launch_bounds__(kThreads)
epilogue_rows_kernel(const GY* __restrict__ gy, const A* __restrict__ P, const A* __restrict__ r,
                     const A* __restrict__ inv_scale, int64_t n, int64_t d, int W, int64_t rows_per_chunk,
                     GY* __restrict__ out) {
  const auto [tj, ts, TS, j, r0, r1] = rows_tile(W, n, rows_per_chunk);
  if (j >= d) return;
  const A rj = r != nullptr ? r[j] : A(0);
  const A inv = inv_scale != nullptr ? inv_scale[0] : A(1);
  int64_t s = r0 + ts;
  for (; s + (kUnroll - 1) * TS < r1; s += kUnroll * TS) {
    A g[kUnroll], p[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      g[u] = A(to_acc(gy[(s + u * TS) * d + j]));
      p[u] = P[(s + u * TS) * d + j];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) out[(s + u * TS) * d + j] = from_acc<GY>(g[u] + (p[u] * inv - rj));
  }
  for (; s < r1; s += TS) out[s * d + j] = from_acc<GY>(A(to_acc(gy[s * d + j])) + (P[s * d + j] * inv - rj));
}

// "bdl": P^T (d x n) row-major; same walk as shift_cols_kernel.
template <typename GY, typename A>
__global__ void __launch_bounds__(kThreads)
epilogue_cols_kernel(const GY* __restrict__ gy, const A* __restrict__ PT, const A* __restrict__ r,
                     const A* __restrict__ inv_scale, int64_t n, int64_t d, Walk w,
                     int64_t samples_per_chunk, GY* __restrict__ out) {
  const int64_t j = blockIdx.x;
  const int64_t s0 = blockIdx.y * samples_per_chunk;
  const int64_t s1 = s0 + samples_per_chunk < n ? s0 + samples_per_chunk : n;
  const A rj = r != nullptr ? r[j] : A(0);
  const A inv = inv_scale != nullptr ? inv_scale[0] : A(1);
  const A* __restrict__ prow = PT + j * n;
  int64_t s = s0 + threadIdx.x;
  SampleCursor cur(s, j, d, w);
  for (; s + (kUnroll - 1) * kThreads < s1; s += kUnroll * kThreads) {
    int64_t off[kUnroll];
    A g[kUnroll], p[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      off[u] = cur.off;
      cur.advance(w);
      g[u] = A(to_acc(gy[off[u]]));
      p[u] = prow[s + u * kThreads];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) out[off[u]] = from_acc<GY>(g[u] + (p[u] * inv - rj));
  }
  for (; s < s1; s += kThreads) {
    out[cur.off] = from_acc<GY>(A(to_acc(gy[cur.off])) + (prow[s] * inv - rj));
    cur.advance(w);
  }
}

// ---------------------------------------------------------------------------------------------
// The VICReg pair apply's epilogue: both gradients from one read of both branches,
//   grad_a = g (Pa * inv_scale_a + c (Z_a - Z_b)),   grad_b = g (Pb * inv_scale_b - c (Z_a - Z_b)),
// Pa, Pb = (Z - mu) G of each branch (P^T in "bdl"), in A; the difference formed in A and
// multiplied by g (a GradScaler's 2^16, say) before the one rounding to z's dtype T, so that the
// ~1/(n d) parts do not underflow in float16. g, c, inv_scale: device scalars (inv_scale may be
// null: 1). Four streams per element: kPairUnroll elements per thread keep as many loads in
// flight as the apply's epilogue, within the 32 registers ptxas gives these kernels on sm_80.
// Pa may be grad_a itself (float32/float64 "rows": the product written straight into the
// gradient), so neither carries __restrict__: each thread reads an element before writing it.

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
pair_epilogue_rows_kernel(const T* __restrict__ za, const T* __restrict__ zb, const A* Pa, const A* __restrict__ Pb,
                          const A* __restrict__ inv_scale_a, const A* __restrict__ inv_scale_b,
                          const A* __restrict__ g, const A* __restrict__ c, int64_t n, int64_t d, int W,
                          int64_t rows_per_chunk, T* out_a, T* __restrict__ out_b) {
  const auto [tj, ts, TS, j, r0, r1] = rows_tile(W, n, rows_per_chunk);
  if (j >= d) return;
  const A gv = g[0], cv = c[0];
  const A ia = inv_scale_a != nullptr ? inv_scale_a[0] : A(1);
  const A ib = inv_scale_b != nullptr ? inv_scale_b[0] : A(1);
  int64_t s = r0 + ts;
  for (; s + (kPairUnroll - 1) * TS < r1; s += kPairUnroll * TS) {
    A a[kPairUnroll], b[kPairUnroll], pa[kPairUnroll], pb[kPairUnroll];
#pragma unroll
    for (int u = 0; u < kPairUnroll; ++u) {
      const int64_t o = (s + u * TS) * d + j;
      a[u] = to_acc(za[o]);
      b[u] = to_acc(zb[o]);
      pa[u] = Pa[o];
      pb[u] = Pb[o];
    }
#pragma unroll
    for (int u = 0; u < kPairUnroll; ++u) {
      const int64_t o = (s + u * TS) * d + j;
      const A inv = cv * (a[u] - b[u]);
      out_a[o] = from_acc<T>((pa[u] * ia + inv) * gv);
      out_b[o] = from_acc<T>((pb[u] * ib - inv) * gv);
    }
  }
  for (; s < r1; s += TS) {
    const int64_t o = s * d + j;
    const A inv = cv * (A(to_acc(za[o])) - A(to_acc(zb[o])));
    const A pa = Pa[o], pb = Pb[o];
    out_a[o] = from_acc<T>((pa * ia + inv) * gv);
    out_b[o] = from_acc<T>((pb * ib - inv) * gv);
  }
}

// "bdl": Pa^T, Pb^T (d x n) row-major, z and the gradients canonical (B, d, L); the walk of
// shift_cols_kernel.
template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
pair_epilogue_cols_kernel(const T* __restrict__ za, const T* __restrict__ zb, const A* __restrict__ PaT,
                          const A* __restrict__ PbT, const A* __restrict__ inv_scale_a,
                          const A* __restrict__ inv_scale_b, const A* __restrict__ g, const A* __restrict__ c,
                          int64_t n, int64_t d, Walk w, int64_t samples_per_chunk, T* __restrict__ out_a,
                          T* __restrict__ out_b) {
  const int64_t j = blockIdx.x;
  const int64_t s0 = blockIdx.y * samples_per_chunk;
  const int64_t s1 = s0 + samples_per_chunk < n ? s0 + samples_per_chunk : n;
  const A gv = g[0], cv = c[0];
  const A ia = inv_scale_a != nullptr ? inv_scale_a[0] : A(1);
  const A ib = inv_scale_b != nullptr ? inv_scale_b[0] : A(1);
  const A* __restrict__ parow = PaT + j * n;
  const A* __restrict__ pbrow = PbT + j * n;
  int64_t s = s0 + threadIdx.x;
  SampleCursor cur(s, j, d, w);
  for (; s + (kPairUnroll - 1) * kThreads < s1; s += kPairUnroll * kThreads) {
    int64_t off[kPairUnroll];
    A a[kPairUnroll], b[kPairUnroll], pa[kPairUnroll], pb[kPairUnroll];
#pragma unroll
    for (int u = 0; u < kPairUnroll; ++u) {
      off[u] = cur.off;
      cur.advance(w);
      a[u] = to_acc(za[off[u]]);
      b[u] = to_acc(zb[off[u]]);
      pa[u] = parow[s + u * kThreads];
      pb[u] = pbrow[s + u * kThreads];
    }
#pragma unroll
    for (int u = 0; u < kPairUnroll; ++u) {
      const A inv = cv * (a[u] - b[u]);
      out_a[off[u]] = from_acc<T>((pa[u] * ia + inv) * gv);
      out_b[off[u]] = from_acc<T>((pb[u] * ib - inv) * gv);
    }
  }
  for (; s < s1; s += kThreads) {
    const A inv = cv * (A(to_acc(za[cur.off])) - A(to_acc(zb[cur.off])));
    out_a[cur.off] = from_acc<T>((parow[s] * ia + inv) * gv);
    out_b[cur.off] = from_acc<T>((pbrow[s] * ib - inv) * gv);
    cur.advance(w);
  }
}

// ---------------------------------------------------------------------------------------------

// The address of every kernel above for x dtype T (grad dtype GY = T, accumulate dtype A =
// acc_t<T>, and the epilogues for both accumulate dtypes). Explicitly instantiating this makes a
// compile of this header alone cover all device code (tools/hip_compile_check.py); returns the count.
template <typename T>
int kernel_table(const void** out) {
  using A = acc_t<T>;
  int k = 0;
  out[k++] = reinterpret_cast<const void*>(&shift_estimate_kernel<T, A>);
  out[k++] = reinterpret_cast<const void*>(&shift_rows_kernel<T, A, true>);
  out[k++] = reinterpret_cast<const void*>(&shift_rows_kernel<T, A, false>);
  out[k++] = reinterpret_cast<const void*>(&shift_cols_kernel<T, A, true>);
  out[k++] = reinterpret_cast<const void*>(&shift_cols_kernel<T, A, false>);
  out[k++] = reinterpret_cast<const void*>(&shift_rows_kernel<T, A, true, true>);
  out[k++] = reinterpret_cast<const void*>(&shift_cols_kernel<T, A, true, true>);
  out[k++] = reinterpret_cast<const void*>(&invariance_total_kernel<A>);
  out[k++] = reinterpret_cast<const void*>(&column_stats_kernel<A>);
  out[k++] = reinterpret_cast<const void*>(&m2_kernel<A>);
  out[k++] = reinterpret_cast<const void*>(&gradient_kernel<A>);
  out[k++] = reinterpret_cast<const void*>(&row_absmax_kernel<A>);
  out[k++] = reinterpret_cast<const void*>(&finalize_kernel<A>);
  out[k++] = reinterpret_cast<const void*>(&scale_convert_kernel<T, A>);
  out[k++] = reinterpret_cast<const void*>(&epilogue_rows_kernel<T, float>);
  out[k++] = reinterpret_cast<const void*>(&epilogue_rows_kernel<T, double>);
  out[k++] = reinterpret_cast<const void*>(&epilogue_cols_kernel<T, float>);
  out[k++] = reinterpret_cast<const void*>(&epilogue_cols_kernel<T, double>);
  out[k++] = reinterpret_cast<const void*>(&pair_epilogue_rows_kernel<T, A>);
  out[k++] = reinterpret_cast<const void*>(&pair_epilogue_cols_kernel<T, A>);
  return k;
}

}  // namespace cuda
}  // namespace vcreg
