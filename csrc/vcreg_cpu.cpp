// The `cpu` backend: CPU kernels of vcreg::backward_kernel, vcreg::stats_kernel and
// vcreg::apply_kernel, whose schemas are defined once in vcreg_kernels/_ops.py and whose exact
// semantics are those of vcreg_kernels/reference.py.
//
// Inputs are the canonical views of vcreg_kernels/_layout.py, x3 and grad_y3: (B, d, L), samples
// s = (b, l), n = B * L, X (n x d) the activation flattened along its feature dimension:
//   "rows": L == 1, strides (d, 1, 1): X is x3 as a row-major matrix
//           (x: (N, T, d) with dim=-1, or x: (N, C, H, W) channels_last with dim=1);
//   "bdl":  contiguous, L > 1: slab b is the d x L matrix X_b^T (x: (N, C, H, W) with dim=1, L = H*W).
// Both are contiguous (B, d, L) tensors; any other strides are made contiguous first.
//
//   stats_kernel(x3)              -> mu = X^T 1 / n  (d),  M2 = Xc^T Xc  (d x d),  Xc = X - 1 mu^T
//   apply_kernel(gy3, x3, G, mu)  -> grad_x3 = grad_y3 + (X - 1 mu^T) G   (G: d x d)
//   backward_kernel(gy3, x3, ...) -> C = M2 / (n-1); G and (l_var, l_cov) of SPEC section 2 from C
//                                    (in float64); then apply_kernel with that G and mu.
// mu, M2 and the terms are returned in the accumulate dtype (float64 for float64 input, else
// float32); grad_x3 in grad_y3's dtype with x3's strides.
//
// Numerics (SPEC section 2). The Gram products run on shifted data X - 1 K^T, K the mean of 64
// samples spread over X, subtracted in the accumulate dtype before any product:
//   S = (X - 1 K^T)^T (X - 1 K^T),  s = (X - 1 K^T)^T 1,  mu = K + s / n,  M2 = S - s s^T / n,
// which is Chan's merge with one shared shift; with K within a few std of mu no float32 product
// sees the mean, so |mu|/std = 1000 costs nothing. Each float32 product covers one gathered panel;
// S, s and the merge are accumulated in float64. The apply subtracts K' = mu rounded to the
// accumulate dtype and corrects by the rounding's image (mu - K') G, a d-vector in float64.
//
// Work split: fixed by n and d only, never by the thread count, so results are bitwise the same
// run to run and for any number of threads. Stats: the upper triangle of S is cut into tiles
// (diagonal tiles whole), each a BLAS product over a group of samples added into that group's
// float64 accumulator; the groups' accumulators and column sums are summed in group order.
// Where n is large against d ("grouped"), 16 fixed sample ranges are the parallel tasks, each
// gathering its shifted samples panel by panel into its own buffer (in L2) and running every tile
// on it. Otherwise ("shared") X is gathered in super-panels of ~8 MiB by parallel chunks, and the
// (sample group x tile) products of each super-panel are the parallel tasks. Apply: independent
// panels of samples, each gathered, multiplied by G and added to grad_y. BLAS is called inside
// at::parallel_for tasks, each told to run its products on one thread (SingleThreadBlas).
// Temporaries (a few MiB; d^2 float64 for M2) are per-thread scratch reused across calls.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm_cpu_dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "vcreg_common.h"

namespace vcreg {
namespace {

// Tuning constants. None depends on the thread count (see the work split above).
constexpr int64_t kShiftSamples = 64;              // samples averaged for the shift K
constexpr int64_t kSumBlock = 256;                 // values per float32 partial column sum
constexpr int64_t kSuperPanelBytes = 8 << 20;      // shared: shifted X gathered per round; fits L3
constexpr int64_t kGroups = 16;                    // grouped: parallel tasks, each a range of samples
constexpr int64_t kGroupPanelBytes = 512 << 10;    // grouped: gathered panel per task; fits L2
constexpr int64_t kGroupAccBytes = 8 << 20;        // grouped: all float64 accumulators together
constexpr int64_t kGatherChunk = 1024;             // samples per gather task (bdl: 4 KiB runs per row)
constexpr int64_t kTile = 96;                      // Gram tile width: one BLAS call per tile
constexpr int64_t kMinSplitWidth = 96;             // from here on even two tiles beat one square product
constexpr int64_t kMinGramItems = 16;              // shared: tiles x sample groups per super-panel
constexpr int64_t kMinGroupSamples = 128;          // the shortest product worth one BLAS call
constexpr int64_t kApplyPanelBytes = 256 << 10;    // apply: gathered panel for small d; stays in L2
constexpr int64_t kApplyPanelSamples = 512;        // apply: panel length for large d
constexpr int64_t kApplyPanelMaxBytes = 4 << 20;   // apply: panel cap for very large d
constexpr int64_t kMinApplyPanelSamples = 256;     // apply: shortest panel worth rounding the count for
constexpr int64_t kApplyPanelMultiple = 8;         // apply: panel count splits evenly over 1, 2, 4, 8 threads
constexpr int64_t kRowGrain = 256;                 // d x d passes: rows per task (smaller d runs inline)

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Scratch memory kept per calling thread and reused by later calls. The temporaries are a few MiB;
// allocated afresh on each call they fragment the heap so that grad_x often lands on fresh pages,
// which the kernel then faults in and zeroes (~1 ms for a 10 MB gradient, as much as a product).
enum class Scratch { kGramAcc, kGramPanel, kGramProd, kM2, kG, kApply, kCount };

void* scratch_bytes(Scratch slot, int64_t bytes) {
  thread_local at::Tensor buffers[static_cast<int>(Scratch::kCount)];
  at::Tensor& b = buffers[static_cast<int>(slot)];
  if (!b.defined() || b.nbytes() < static_cast<size_t>(bytes)) b = at::empty({bytes}, at::kByte);
  return b.mutable_data_ptr();
}

template <typename T>
T* scratch(Scratch slot, int64_t count) {
  return static_cast<T*>(scratch_bytes(slot, count * static_cast<int64_t>(sizeof(T))));
}

struct Shape {
  int64_t d, L, n;
  bool rows() const { return L == 1; }
};

Shape shape_of(const at::Tensor& x3) { return {x3.size(1), x3.size(2), x3.size(0) * x3.size(2)}; }

// MKL may cut a product's inner (sample) dimension by the number of threads it is allowed, which
// changes the order of its sums: a task's product must then not depend on that number, nor on
// whether the task runs inside a parallel region (an inline task may get every thread). Each
// task holding this guard runs its products on one thread. MKL_Set_Num_Threads_Local (the C entry
// point that mkl_service.h's mkl_set_num_threads_local names; the lowercase symbol is Fortran's,
// taking a pointer) is thread-local and restored on exit; it comes with torch's MKL builds (x86),
// and where it is absent (weak symbol, null) the BLAS is left as it is.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

class SingleThreadBlas {
 public:
  SingleThreadBlas() : previous_(MKL_Set_Num_Threads_Local != nullptr ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~SingleThreadBlas() {
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(previous_);
  }
  SingleThreadBlas(const SingleThreadBlas&) = delete;
  SingleThreadBlas& operator=(const SingleThreadBlas&) = delete;

 private:
  int previous_;  // 0: the thread had no local setting (MKL then follows the global one)
};

// In "bdl" a panel's samples are short runs, one per feature row, L elements apart; the hardware
// prefetcher starts afresh on each, so the loops request the next row's lines while on this one.
// (A prefetch never faults, also past the end of the tensor.)
template <typename T>
inline void prefetch(const T* p, bool write) {
#if defined(__GNUC__)
  if (write) {
    __builtin_prefetch(p, 1);
  } else {
    __builtin_prefetch(p, 0);
  }
#else
  (void)p;
  (void)write;
#endif
}

// Calls f(b, l, r, len) for each maximal run of samples s0 + r .. s0 + r + len - 1 that lie in
// one slab b, starting at position l.
template <typename F>
void for_each_run(const Shape& sh, int64_t s0, int64_t count, const F& f) {
  for (int64_t r = 0; r < count;) {
    const int64_t s = s0 + r, b = s / sh.L, l = s % sh.L;
    const int64_t len = std::min(sh.L - l, count - r);
    f(b, l, r, len);
    r += len;
  }
}

// P = X[s0 : s0+count] - 1 K^T in the accumulate dtype: a row-major count x d matrix ("rows") or
// its transpose, d x count with leading dimension ldp ("bdl"). kSums adds P's column sums to sums
// (float64), summing at most kSumBlock values per partial sum in acc_t: cheap, and bounded error
// even where K is a poor estimate of mu.
template <bool kSums, typename scalar_t, typename acc_t>
void gather_shifted(const scalar_t* x, const Shape& sh, int64_t s0, int64_t count, const acc_t* K,
                    acc_t* P, int64_t ldp, double* sums) {
  const int64_t d = sh.d;
  if (sh.rows()) {
    std::vector<acc_t> part(kSums ? d : 0, acc_t(0));
    for (int64_t r = 0; r < count; ++r) {
      const scalar_t* src = x + (s0 + r) * d;
      acc_t* dst = P + r * ldp;
      for (int64_t j = 0; j < d; ++j) {
        const acc_t v = static_cast<acc_t>(src[j]) - K[j];
        dst[j] = v;
        if constexpr (kSums) part[j] += v;
      }
      if constexpr (kSums) {
        if ((r + 1) % kSumBlock == 0 || r + 1 == count) {
          for (int64_t j = 0; j < d; ++j) {
            sums[j] += part[j];
            part[j] = 0;
          }
        }
      }
    }
    return;
  }
  for_each_run(sh, s0, count, [&](int64_t b, int64_t l, int64_t r, int64_t len) {
    for (int64_t j = 0; j < d; ++j) {
      const scalar_t* src = x + (b * d + j) * sh.L + l;
      acc_t* dst = P + j * ldp + r;
      const acc_t k = K[j];
      for (int64_t i0 = 0; i0 < len; i0 += 8 * kSumBlock) {
        const int64_t i1 = std::min(len, i0 + 8 * kSumBlock);
        // Eight independent partial sums: one running sum would wait on each add's latency.
        acc_t part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int64_t i = i0;
        for (; i + 8 <= i1; i += 8) {
          prefetch(src + sh.L + i, /*write=*/false);
          for (int u = 0; u < 8; ++u) {
            const acc_t v = static_cast<acc_t>(src[i + u]) - k;
            dst[i + u] = v;
            if constexpr (kSums) part[u] += v;
          }
        }
        for (; i < i1; ++i) {
          const acc_t v = static_cast<acc_t>(src[i]) - k;
          dst[i] = v;
          if constexpr (kSums) part[0] += v;
        }
        if constexpr (kSums) {
          sums[j] += static_cast<double>(((part[0] + part[1]) + (part[2] + part[3])) +
                                         ((part[4] + part[5]) + (part[6] + part[7])));
        }
      }
    }
  });
}

// out[s0 : s0+count] = gy + (T - 1 c^T), T laid out as gather_shifted's P (leading dimension ldt).
template <typename acc_t, typename grad_t>
void add_grad(const acc_t* T, int64_t ldt, const acc_t* c, const grad_t* gy, grad_t* out, const Shape& sh,
              int64_t s0, int64_t count) {
  const int64_t d = sh.d;
  if (sh.rows()) {
    for (int64_t r = 0; r < count; ++r) {
      const int64_t o = (s0 + r) * d;
      const acc_t* t = T + r * ldt;
      for (int64_t j = 0; j < d; ++j) {
        out[o + j] = static_cast<grad_t>(static_cast<acc_t>(gy[o + j]) + (t[j] - c[j]));
      }
    }
    return;
  }
  for_each_run(sh, s0, count, [&](int64_t b, int64_t l, int64_t r, int64_t len) {
    for (int64_t j = 0; j < d; ++j) {
      const int64_t o = (b * d + j) * sh.L + l;
      const acc_t* t = T + j * ldt + r;
      const acc_t cj = c[j];
      int64_t i = 0;
      for (; i + 8 <= len; i += 8) {
        prefetch(gy + o + sh.L + i, /*write=*/false);
        prefetch(out + o + sh.L + i, /*write=*/true);
        for (int u = 0; u < 8; ++u) {
          out[o + i + u] = static_cast<grad_t>(static_cast<acc_t>(gy[o + i + u]) + (t[i + u] - cj));
        }
      }
      for (; i < len; ++i) {
        out[o + i] = static_cast<grad_t>(static_cast<acc_t>(gy[o + i]) + (t[i] - cj));
      }
    }
  });
}

// How the Gram matrix S is cut into BLAS calls: tiles of its upper triangle (diagonal tiles
// whole), each computed for one group of samples at a time into that group's float64 accumulator.
//   grouped (n large against d): kGroups fixed ranges of samples, one parallel task each; a task
//     gathers its samples panel by panel into its own buffer (in L2) and runs every tile on it;
//   shared (otherwise): X in super-panels gathered in parallel into one buffer, whose
//     (sample group x tile) products are the parallel tasks.
struct GramPlan {
  std::vector<int64_t> edges;                      // tile boundaries along the d features
  std::vector<std::pair<int64_t, int64_t>> tiles;  // (I, J), I <= J
  int64_t max_width = 0;
  bool grouped = false;
  int64_t groups = 0;  // sample groups, each with its own accumulator
  int64_t panel = 0;   // samples gathered at once: per task (grouped) or per super-panel (shared)
};

GramPlan plan_gram(int64_t n, int64_t d, int64_t elem_bytes) {
  GramPlan p;
  // Skipping the lower triangle pays from d = 96 on: 3 tiles of 48 cost 0.87 of one 96 x 96 product.
  const int64_t nt = std::max(ceil_div(d, kTile), d >= kMinSplitWidth ? int64_t{2} : int64_t{1});
  for (int64_t i = 0; i <= nt; ++i) {
    // Multiples of 16 elements keep every tile's first column cache-line aligned.
    p.edges.push_back(std::min(d, ceil_div(i * d / nt, 16) * 16));
  }
  for (int64_t I = 0; I < nt; ++I) {
    p.max_width = std::max(p.max_width, p.edges[I + 1] - p.edges[I]);
    for (int64_t J = I; J < nt; ++J) p.tiles.emplace_back(I, J);
  }
  const int64_t ntiles = static_cast<int64_t>(p.tiles.size());
  // Grouped needs products long against d (accumulators cost d^2 per group) and d^2 accumulators
  // that stay small.
  p.grouped = n / kGroups >= std::max(4 * kMinGroupSamples, 2 * d) && kGroups * d * d * 8 <= kGroupAccBytes;
  if (p.grouped) {
    p.groups = kGroups;
    const int64_t per_group = ceil_div(n, kGroups);
    const int64_t target = std::max(kMinGroupSamples, kGroupPanelBytes / (d * elem_bytes));
    p.panel = ceil_div(per_group, ceil_div(per_group, target));
  } else {
    const int64_t target = std::max(kMinGroupSamples, kSuperPanelBytes / (d * elem_bytes));
    p.panel = ceil_div(n, ceil_div(n, target));  // equal super-panels, none a small remainder
    p.groups = std::clamp<int64_t>(ceil_div(kMinGramItems, ntiles), 1,
                                   std::max<int64_t>(1, p.panel / kMinGroupSamples));
  }
  return p;
}

// acc[I, J] += P_I^T P_J over the k samples of P from sample k0 on, for the tile (i0 + wi, j0 + wj)
// (acc[I, J] = ... for the first product of a group: no accumulator needs zeroing beforehand).
// P holds samples as rows ("rows": k x d) or as columns ("bdl": d x k), with leading dimension ld.
// The product lands in prod (wi x wj, acc_t), then goes into acc (d x d, float64).
template <typename acc_t>
void gram_tile(bool rows, acc_t* P, int64_t ld, int64_t k0, int64_t k, int64_t i0, int64_t wi, int64_t j0,
               int64_t wj, int64_t d, acc_t* prod, double* acc, bool first, const at::TensorOptions& opts) {
  at::Tensor a, b;  // (wi x k) and (k x wj)
  if (rows) {
    a = at::from_blob(P + k0 * ld + i0, {k, wi}, {ld, 1}, opts).t();
    b = at::from_blob(P + k0 * ld + j0, {k, wj}, {ld, 1}, opts);
  } else {
    a = at::from_blob(P + i0 * ld + k0, {wi, k}, {ld, 1}, opts);
    b = at::from_blob(P + j0 * ld + k0, {wj, k}, {ld, 1}, opts).t();
  }
  at::Tensor out = at::from_blob(prod, {wi, wj}, {wj, 1}, opts);
  at::cpu::mm_out(out, a, b);
  double* dst = acc + i0 * d + j0;
  for (int64_t i = 0; i < wi; ++i) {
    if (first) {
      for (int64_t j = 0; j < wj; ++j) dst[i * d + j] = prod[i * wj + j];
    } else {
      for (int64_t j = 0; j < wj; ++j) dst[i * d + j] += prod[i * wj + j];
    }
  }
}

// (mu, M2) of x3 (contiguous) in float64: the column means of X and Xc^T Xc, full and symmetric.
// M2 lives in this thread's scratch: valid until the next call, to be copied if it must outlive it.
template <typename scalar_t>
std::pair<at::Tensor, at::Tensor> stats_impl(const at::Tensor& x3) {
  using acc_t = at::opmath_type<scalar_t>;
  const Shape sh = shape_of(x3);
  const int64_t d = sh.d, n = sh.n;
  const scalar_t* x = x3.const_data_ptr<scalar_t>();
  const auto acc_opts = x3.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const auto f64 = x3.options().dtype(at::kDouble);

  // The shift: samples spread over all of X, as the first rows may belong to one image or token.
  std::vector<double> k_sum(d, 0.0);
  const int64_t m = std::min(n, kShiftSamples);
  for (int64_t k = 0; k < m; ++k) {
    const int64_t s = k * n / m, b = s / sh.L, l = s % sh.L;
    for (int64_t j = 0; j < d; ++j) k_sum[j] += static_cast<double>(x[(b * d + j) * sh.L + l]);
  }
  std::vector<acc_t> K(d);
  for (int64_t j = 0; j < d; ++j) K[j] = static_cast<acc_t>(k_sum[j] / static_cast<double>(m));

  const GramPlan plan = plan_gram(n, d, sizeof(acc_t));
  const int64_t ntiles = static_cast<int64_t>(plan.tiles.size());
  const int64_t groups = plan.groups, w2 = plan.max_width * plan.max_width;
  const int64_t nthreads = at::get_num_threads();
  // S per sample group; only its upper tiles are written and read.
  double* acc = scratch<double>(Scratch::kGramAcc, groups * d * d);
  acc_t* prod_all = scratch<acc_t>(Scratch::kGramProd, nthreads * w2);
  // Column sums s in slots summed in a fixed order: per group (grouped) or per gather chunk (shared).
  const int64_t nchunks_max = plan.grouped ? groups : ceil_div(plan.panel, kGatherChunk);
  std::vector<double> part_sums(nchunks_max * d, 0.0);
  std::vector<double> colsum(d, 0.0);

  if (plan.grouped) {
    acc_t* panel_all = scratch<acc_t>(Scratch::kGramPanel, nthreads * plan.panel * d);
    at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
      const SingleThreadBlas single_thread_blas;
      const int64_t tid = at::get_thread_num();
      acc_t* P = panel_all + tid * plan.panel * d;
      acc_t* prod = prod_all + tid * w2;
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t begin = g * n / groups, end = (g + 1) * n / groups;
        for (int64_t s0 = begin; s0 < end; s0 += plan.panel) {
          const int64_t cnt = std::min(plan.panel, end - s0), ld = sh.rows() ? d : cnt;
          gather_shifted<true>(x, sh, s0, cnt, K.data(), P, ld, part_sums.data() + g * d);
          for (const auto& [I, J] : plan.tiles) {
            gram_tile(sh.rows(), P, ld, 0, cnt, plan.edges[I], plan.edges[I + 1] - plan.edges[I], plan.edges[J],
                      plan.edges[J + 1] - plan.edges[J], d, prod, acc + g * d * d, s0 == begin, acc_opts);
          }
        }
      }
    });
    for (int64_t g = 0; g < groups; ++g) {
      for (int64_t j = 0; j < d; ++j) colsum[j] += part_sums[g * d + j];
    }
  } else {
    acc_t* P = scratch<acc_t>(Scratch::kGramPanel, plan.panel * d);
    for (int64_t s0 = 0; s0 < n; s0 += plan.panel) {
      const int64_t len = std::min(plan.panel, n - s0), ld = sh.rows() ? d : len;
      const int64_t nchunks = ceil_div(len, kGatherChunk), chunk = ceil_div(len, nchunks);
      std::fill(part_sums.begin(), part_sums.end(), 0.0);
      at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t r0 = c * chunk, cnt = std::min(chunk, len - r0);
          if (cnt <= 0) continue;
          gather_shifted<true>(x, sh, s0 + r0, cnt, K.data(), sh.rows() ? P + r0 * d : P + r0, ld,
                               part_sums.data() + c * d);
        }
      });
      for (int64_t c = 0; c < nchunks; ++c) {
        for (int64_t j = 0; j < d; ++j) colsum[j] += part_sums[c * d + j];
      }
      at::parallel_for(0, groups * ntiles, 1, [&](int64_t q0, int64_t q1) {
        const SingleThreadBlas single_thread_blas;
        acc_t* prod = prod_all + at::get_thread_num() * w2;
        for (int64_t q = q0; q < q1; ++q) {
          const int64_t g = q / ntiles;
          const auto [I, J] = plan.tiles[q % ntiles];
          const int64_t k0 = g * len / groups, k = (g + 1) * len / groups - k0;
          // The first super-panel has len >= groups (plan_gram), so every product there is non-empty.
          TORCH_INTERNAL_ASSERT(k > 0 || s0 > 0);
          if (k == 0) continue;
          gram_tile(sh.rows(), P, ld, k0, k, plan.edges[I], plan.edges[I + 1] - plan.edges[I], plan.edges[J],
                    plan.edges[J + 1] - plan.edges[J], d, prod, acc + g * d * d, s0 == 0, acc_opts);
        }
      });
    }
  }

  at::Tensor mu_t = at::empty({d}, f64);
  double* mu = mu_t.mutable_data_ptr<double>();
  double* M2 = scratch<double>(Scratch::kM2, d * d);
  at::Tensor m2_t = at::from_blob(M2, {d, d}, f64);
  const double nd = static_cast<double>(n);
  for (int64_t j = 0; j < d; ++j) mu[j] = static_cast<double>(K[j]) + colsum[j] / nd;
  // Tile by tile (d^2 work, in parallel for large d): the mirrored writes stay in a tile's rows.
  at::parallel_for(0, ntiles, d < kRowGrain ? ntiles : 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const auto [I, J] = plan.tiles[t];
      for (int64_t i = plan.edges[I]; i < plan.edges[I + 1]; ++i) {
        for (int64_t j = std::max(i, plan.edges[J]); j < plan.edges[J + 1]; ++j) {
          double S = 0.0;
          for (int64_t g = 0; g < groups; ++g) S += acc[(g * d + i) * d + j];
          M2[i * d + j] = M2[j * d + i] = S - colsum[i] * colsum[j] / nd;
        }
      }
    }
  });
  return {mu_t, m2_t};
}

// grad_x3 = gy3 + (X - 1 K^T) G - 1 c^T, panel by panel. G: (d x d) contiguous, K, c: (d) in the
// accumulate dtype; out: contiguous like x3, in grad_t.
template <typename scalar_t, typename grad_t>
void apply_impl(const at::Tensor& gy3, const at::Tensor& x3, const at::Tensor& G, const at::Tensor& K,
                const at::Tensor& c, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const Shape sh = shape_of(x3);
  const int64_t d = sh.d, n = sh.n;
  const auto acc_opts = x3.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  // Panels of about kApplyPanelBytes, at least kApplyPanelSamples long (each product packs G again:
  // about 1/R of its own cost) unless that passes kApplyPanelMaxBytes. Their count is rounded up to
  // a multiple of kApplyPanelMultiple for balance where panels stay kMinApplyPanelSamples long,
  // else to an even count.
  const int64_t row_bytes = d * static_cast<int64_t>(sizeof(acc_t));
  const int64_t target = std::min(std::max(kApplyPanelSamples, kApplyPanelBytes / row_bytes),
                                  std::max(kMinGroupSamples, kApplyPanelMaxBytes / row_bytes));
  int64_t panels = ceil_div(n, target);
  const int64_t balanced = ceil_div(panels, kApplyPanelMultiple) * kApplyPanelMultiple;
  if (n / balanced >= kMinApplyPanelSamples) {
    panels = balanced;
  } else if (panels > 1) {
    panels = ceil_div(panels, 2) * 2;
  }
  const int64_t R = ceil_div(n, panels);
  panels = ceil_div(n, R);

  const scalar_t* x = x3.const_data_ptr<scalar_t>();
  const grad_t* gy = gy3.const_data_ptr<grad_t>();
  grad_t* o = out.mutable_data_ptr<grad_t>();
  const acc_t* Kp = K.const_data_ptr<acc_t>();
  const acc_t* cp = c.const_data_ptr<acc_t>();
  const at::Tensor Gt = G.t();  // bdl panels are d x R: their product is G^T P
  acc_t* buf_all = scratch<acc_t>(Scratch::kApply, at::get_num_threads() * 2 * R * d);

  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    const SingleThreadBlas single_thread_blas;
    acc_t* P = buf_all + at::get_thread_num() * 2 * R * d;
    acc_t* T = P + R * d;
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t s0 = p * R, cnt = std::min(R, n - s0);
      const int64_t ld = sh.rows() ? d : cnt;
      gather_shifted<false>(x, sh, s0, cnt, Kp, P, ld, nullptr);
      if (sh.rows()) {
        at::Tensor t = at::from_blob(T, {cnt, d}, {d, 1}, acc_opts);
        at::cpu::mm_out(t, at::from_blob(P, {cnt, d}, {d, 1}, acc_opts), G);
      } else {
        at::Tensor t = at::from_blob(T, {d, cnt}, {cnt, 1}, acc_opts);
        at::cpu::mm_out(t, Gt, at::from_blob(P, {d, cnt}, {cnt, 1}, acc_opts));
      }
      add_grad(T, ld, cp, gy, o, sh, s0, cnt);
    }
  });
}

// Back in x3's own strides (the canonical layouts are contiguous already; other dense strides get
// a copy) and in grad_y's dtype.
at::Tensor restore(at::Tensor out, const at::Tensor& x3, at::ScalarType dtype) {
  if (x3.is_contiguous() || !x3.is_non_overlapping_and_dense()) return out.to(dtype);
  return at::empty_strided(x3.sizes(), x3.strides(), out.options().dtype(dtype)).copy_(out);
}

// gy3 + (X - 1 mu^T) G with G (d x d, contiguous) in the accumulate dtype and mu (d) in float64.
// The apply's operands in the layout its loops take, and its output, allocated up front: the
// backward allocates grad_x before the statistics' temporaries, so that it can take the block
// the previous step's gradient freed rather than fresh pages the kernel must fault in and zero.
struct ApplyIO {
  at::Tensor x3, gy3, out;
  bool same_dtype;
};

ApplyIO prepare_apply(const at::Tensor& gy3_in, const at::Tensor& x3_in) {
  ApplyIO io;
  io.x3 = x3_in.contiguous();
  io.same_dtype = gy3_in.scalar_type() == io.x3.scalar_type();
  // grad_y in another dtype is added in the accumulate dtype, as the reference does.
  io.gy3 = (io.same_dtype ? gy3_in : gy3_in.to(accumulate_type(io.x3.scalar_type()))).contiguous();
  io.out = at::empty_strided(io.x3.sizes(), io.x3.strides(), io.gy3.options());
  return io;
}

at::Tensor apply_host(const ApplyIO& io, const at::Tensor& x3_in, at::ScalarType grad_dtype, const at::Tensor& G,
                      const at::Tensor& mu64) {
  const at::Tensor& x3 = io.x3;
  const at::Tensor& gy3 = io.gy3;
  at::Tensor out = io.out;
  const bool same_dtype = io.same_dtype;
  const at::ScalarType acc = accumulate_type(x3.scalar_type());

  // K = mu rounded to the accumulate dtype; c = (mu - K) G restores what the rounding dropped
  // (at |mu|/std = 1000 in float32 it would be a 3e-5 relative error of the gradient).
  const int64_t d = x3.size(1);
  const at::Tensor K = mu64.to(acc);
  std::vector<double> c(d, 0.0);
  if (acc == at::kFloat) {
    const float* g = G.const_data_ptr<float>();
    const float* k = K.const_data_ptr<float>();
    const double* mu = mu64.const_data_ptr<double>();
    at::parallel_for(0, d, kRowGrain, [&](int64_t j0, int64_t j1) {
      for (int64_t i = 0; i < d; ++i) {
        const double e = mu[i] - static_cast<double>(k[i]);
        for (int64_t j = j0; j < j1; ++j) c[j] += e * static_cast<double>(g[i * d + j]);
      }
    });
  }
  const at::Tensor c_acc =
      at::from_blob(c.data(), {d}, mu64.options()).to(acc, /*non_blocking=*/false, /*copy=*/true);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x3.scalar_type(), "vcreg_apply_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (same_dtype) {
      apply_impl<scalar_t, scalar_t>(gy3, x3, G, K, c_acc, out);
    } else {
      apply_impl<scalar_t, acc_t>(gy3, x3, G, K, c_acc, out);
    }
  });
  return restore(out, x3_in, grad_dtype);
}

std::pair<at::Tensor, at::Tensor> stats_f64(const at::Tensor& x3_in) {
  const at::Tensor x3 = x3_in.contiguous();
  std::pair<at::Tensor, at::Tensor> r;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x3.scalar_type(), "vcreg_stats_cpu",
                                  [&] { r = stats_impl<scalar_t>(x3); });
  return r;
}

// G (d x d, in acc_t) of SPEC section 2 from M2 = Xc^T Xc (float64); returns (l_var, l_cov). NaN
// propagates as in the reference: a NaN variance gives a NaN l_var and G_jj = 0 (hinge inactive).
template <typename acc_t>
std::pair<double, double> fill_gradient_matrix(const double* M2, int64_t d, int64_t n, double alpha, double beta,
                                               double eps, double gamma, std::optional<double> delta, acc_t* G) {
  const double inv_nm1 = 1.0 / static_cast<double>(n - 1), dd = static_cast<double>(d);
  double l_var = 0.0, l_cov = 0.0;
  for (int64_t j = 0; j < d; ++j) {
    const double s = std::sqrt(M2[j * d + j] * inv_nm1 + eps);
    const double hinge = gamma - s;
    l_var += hinge < 0 ? 0.0 : hinge;  // relu that keeps NaN
    G[j * d + j] = static_cast<acc_t>(s < gamma ? -alpha * inv_nm1 / dd / s : 0.0);
  }
  if (d == 1) return {l_var / dd, 0.0};
  const double scale = 4.0 * beta * inv_nm1 / (dd * (dd - 1.0));
  // Rows in parallel, their phi sums added in row order: the same l_cov for any thread count.
  std::vector<double> row_cov(d, 0.0);
  at::parallel_for(0, d, kRowGrain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      double sum = 0.0;
      for (int64_t j = 0; j < d; ++j) {
        if (i == j) continue;
        const double c = M2[i * d + j] * inv_nm1;
        if (!delta) {
          G[i * d + j] = static_cast<acc_t>(c * scale);
          sum += c * c;
          continue;
        }
        const double dl = *delta, a = std::abs(c);
        G[i * d + j] = static_cast<acc_t>(std::min(std::max(c, -dl), dl) * scale);  // keeps NaN
        sum += a <= dl ? c * c : 2.0 * dl * a - dl * dl;
      }
      row_cov[i] = sum;
    }
  });
  for (int64_t i = 0; i < d; ++i) l_cov += row_cov[i];
  return {l_var / dd, l_cov / (dd * (dd - 1.0))};
}

std::tuple<at::Tensor, at::Tensor> vcreg_stats_cpu(const at::Tensor& x3) {
  check_stats_args(x3);
  auto [mu, M2] = stats_f64(x3);
  const at::ScalarType acc = accumulate_type(x3.scalar_type());
  return {mu.to(acc), M2.to(acc, /*non_blocking=*/false, /*copy=*/true)};  // M2 is scratch
}

at::Tensor vcreg_apply_cpu(const at::Tensor& gy3, const at::Tensor& x3, const at::Tensor& G, const at::Tensor& mu) {
  check_apply_args(gy3, x3, G, mu);
  const at::ScalarType acc = accumulate_type(x3.scalar_type());
  return apply_host(prepare_apply(gy3, x3), x3, gy3.scalar_type(), G.to(acc).contiguous(),
                    mu.to(at::kDouble).contiguous());
}

std::tuple<at::Tensor, at::Tensor> vcreg_backward_cpu(const at::Tensor& gy3, const at::Tensor& x3, double alpha,
                                                      double beta, double eps, double gamma,
                                                      std::optional<double> delta) {
  check_backward_args(gy3, x3);
  const at::ScalarType acc = accumulate_type(x3.scalar_type());
  const int64_t d = x3.size(1);
  const ApplyIO io = prepare_apply(gy3, x3);
  auto [mu, M2] = stats_f64(io.x3);
  at::Tensor G;
  std::pair<double, double> terms;
  AT_DISPATCH_FLOATING_TYPES(acc, "vcreg_gradient_matrix_cpu", [&] {
    scalar_t* g = scratch<scalar_t>(Scratch::kG, d * d);
    G = at::from_blob(g, {d, d}, M2.options().dtype(acc));
    terms = fill_gradient_matrix<scalar_t>(M2.const_data_ptr<double>(), d, num_samples(x3), alpha, beta, eps,
                                           gamma, delta, g);
  });
  at::Tensor terms_t = at::empty({2}, M2.options());
  terms_t.mutable_data_ptr<double>()[0] = terms.first;
  terms_t.mutable_data_ptr<double>()[1] = terms.second;
  return {apply_host(io, x3, gy3.scalar_type(), G, mu), terms_t.to(acc)};
}

}  // namespace
}  // namespace vcreg

TORCH_LIBRARY_IMPL(vcreg, CPU, m) {
  m.impl("backward_kernel", &vcreg::vcreg_backward_cpu);
  m.impl("stats_kernel", &vcreg::vcreg_stats_cpu);
  m.impl("apply_kernel", &vcreg::vcreg_apply_cpu);
}
