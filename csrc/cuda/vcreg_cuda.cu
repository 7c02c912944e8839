// Host side of the `cuda` backend: the CUDA kernels of vcreg::backward_kernel, vcreg::stats_kernel,
// vcreg::apply_kernel and the VICReg pair kernels vcreg::pair_stats_kernel, vcreg::pair_apply_kernel,
// whose schemas are defined once in vcreg_kernels/_ops.py. The device code (and the full
// derivation) is vcreg_kernels.cuh; this file dispatches over dtypes, allocates, calls cuBLAS
// through ATen on the current stream and registers the kernels.
//
// x3, grad_y3, za3, zb3: (B, d, L) canonical views (vcreg_kernels/_layout.py), X = n x d with n = B*L:
//   stats_kernel(x3)                -> mu (d), M2 = Xc^T Xc (d x d)            accumulate dtype
//   apply_kernel(gy3, x3, G, mu)    -> grad_y + (X - mu) @ G                   grad_y's dtype, x3's layout
//   backward_kernel(gy3, x3, ...)   -> (grad_y + Xc @ G, [l_var, l_cov])      G of SPEC section 2
//   pair_stats_kernel(za3, zb3)     -> (mu_a, M2_a, mu_b, M2_b, sum (Z_a - Z_b)^2)   accumulate dtype
//   pair_apply_kernel(g, za3, zb3, G_a, mu_a, G_b, mu_b, c)
//                                   -> (g (c (Z_a - Z_b) + (Z_a - mu_a) @ G_a),
//                                       g (c (Z_b - Z_a) + (Z_b - mu_b) @ G_b))    z's dtype and layout
// Accumulate dtype: float32, float64 for float64 input. The backward is
//   K (shift) -> Y = X - K, S = 1^T (X - K) -> Q = Y^T Y (cuBLAS) -> mu, C, G, r, terms
//   -> P = Y G (cuBLAS) -> grad_x = grad_y + P - 1 r^T,
// one full read of X and of grad_y, with Y (n x d, x's dtype) and P (n x d, accumulate dtype) as
// temporaries; Y is freed before grad_x is allocated, so the extra peak is about Y + P.
// The pair kernels' memory: pair_stats holds one branch's Y at a time (as stats_kernel); pair_apply
// no n x d temporary beyond the two gradients (pair_apply_impl says where Y and P live).
// Nothing here waits on the device or branches on tensor values (g and c of the pair apply are
// read by the epilogue on the device): every op is CUDA-graph capturable.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContextLight.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../vcreg_common.h"
#include "vcreg_kernels.cuh"

namespace vcreg {
namespace cuda {
namespace {

// at:: scalar types -> the header's device types (same bits).
template <typename S> struct Device { using type = S; };
template <> struct Device<at::Half> { using type = __half; };
template <> struct Device<at::BFloat16> { using type = bf16; };

template <typename S>
const typename Device<S>::type* in_ptr(const at::Tensor& t) {
  return reinterpret_cast<const typename Device<S>::type*>(t.const_data_ptr<S>());
}
template <typename S>
typename Device<S>::type* out_ptr(const at::Tensor& t) {
  return reinterpret_cast<typename Device<S>::type*>(t.mutable_data_ptr<S>());
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// How the streaming kernels (shift, epilogue) cover X. It depends only on the shape and the
// device's SM count, so the partial sums, and with them the results, are bitwise repeatable.
struct Plan {
  int64_t B, d, L, n;
  bool rows;        // L == 1: X is x3 itself, row-major n x d
  int W;            // rows: columns per block (a power of two <= 32)
  int64_t chunk;    // rows, or samples, per block
  int64_t nchunks;  // blocks along the samples (>= 1, also for n == 0)
  dim3 grid;
};

Plan make_plan(const at::Tensor& x3) {
  Plan p;
  p.B = x3.size(0);
  p.d = x3.size(1);
  p.L = x3.size(2);
  p.n = p.B * p.L;
  p.rows = p.L == 1;
  int64_t tiles, min_chunk;
  if (p.rows) {
    p.W = 1;
    while (p.W < 32 && p.W < p.d) p.W *= 2;
    tiles = ceil_div(p.d, p.W);
    min_chunk = (kThreads / p.W) * kUnroll;
  } else {
    p.W = 0;
    tiles = p.d;
    min_chunk = static_cast<int64_t>(kThreads) * kUnroll;
  }
  // Enough 256-thread blocks to fill every SM (these kernels are bandwidth-bound and need many
  // loads in flight), but chunks of at least kUnroll steps so that the unrolled loop runs.
  const int64_t target = 8 * static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  const int64_t want = std::max<int64_t>(1, ceil_div(target, tiles));
  const int64_t cap = std::max<int64_t>(1, ceil_div(p.n, min_chunk));
  const int64_t nch = std::min<int64_t>({want, cap, 65535});
  p.chunk = std::max<int64_t>(1, ceil_div(p.n, nch));
  p.nchunks = std::max<int64_t>(1, ceil_div(p.n, p.chunk));
  p.grid = dim3(static_cast<unsigned int>(tiles), static_cast<unsigned int>(p.nchunks));
  return p;
}

// cuBLAS through ATen: half/bfloat16 operands multiply on tensor cores into float32.
at::Tensor gemm_acc(const at::Tensor& a, const at::Tensor& b, at::ScalarType acc) {
  return a.scalar_type() == acc ? at::mm(a, b) : at::mm(a, b, acc);
}

// Y = T(X - K) in the layout of the plan ((n, d) or (d, n)), and with kSums the per-chunk
// column sums of Y (nchunks, d); with kInv also the per-chunk sums of (other - X)^2 (nchunks, d).
template <typename T, typename A, bool kSums, bool kInv = false>
void launch_shift(const T* x, const A* K, const Plan& p, T* y, A* partial, cudaStream_t stream,
                  const T* other = nullptr, A* inv_partial = nullptr) {
  if (p.rows) {
    shift_rows_kernel<T, A, kSums, kInv><<<p.grid, kThreads, 0, stream>>>(x, K, p.n, p.d, p.W, p.chunk, y, partial,
                                                                          other, inv_partial);
  } else {
    shift_cols_kernel<T, A, kSums, kInv><<<p.grid, kThreads, 0, stream>>>(x, K, p.n, p.d, make_walk(p.d, p.L),
                                                                          p.chunk, y, partial, other, inv_partial);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// grad_x = grad_y + P * inv_scale - r, in grad_y's dtype (any of the four).
template <typename A>
void launch_epilogue(const at::Tensor& gy, const at::Tensor& P, const A* r, const A* inv_scale, const Plan& p,
                     const at::Tensor& out, cudaStream_t stream) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gy.scalar_type(), "vcreg_apply_cuda", [&] {
    using GY = typename Device<scalar_t>::type;
    if (p.rows) {
      epilogue_rows_kernel<GY, A><<<p.grid, kThreads, 0, stream>>>(
          in_ptr<scalar_t>(gy), P.const_data_ptr<A>(), r, inv_scale, p.n, p.d, p.W, p.chunk, out_ptr<scalar_t>(out));
    } else {
      epilogue_cols_kernel<GY, A><<<p.grid, kThreads, 0, stream>>>(
          in_ptr<scalar_t>(gy), P.const_data_ptr<A>(), r, inv_scale, p.n, p.d, make_walk(p.d, p.L), p.chunk,
          out_ptr<scalar_t>(out));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// The apply's matrix product: P = Y G ("rows", n x d) or P^T = G^T Y^T ("bdl", d x n).
at::Tensor apply_gemm(const at::Tensor& y, const at::Tensor& Gm, const Plan& p, at::ScalarType acc) {
  return p.rows ? gemm_acc(y, Gm, acc) : gemm_acc(Gm.t(), y, acc);
}

void check_cuda(const at::Tensor& x3, const char* op) {
  TORCH_CHECK(x3.is_cuda(), op, ": the cuda backend takes CUDA tensors, got one on ", x3.device());
}

// The shared first half: K, Y, the chunk partial sums of Y, and Q = Y^T Y.
struct Shifted {
  at::Tensor K, y, partial, Q;
};

// other, inv_partial (the pair statistics, on branch b): the shift pass also sums (other - X)^2
// into inv_partial (nchunks, d).
template <typename S>
Shifted shifted_stats(const at::Tensor& x3, const Plan& p, cudaStream_t stream, const at::Tensor* other = nullptr,
                      acc_t<typename Device<S>::type>* inv_partial = nullptr) {
  using T = typename Device<S>::type;
  using A = acc_t<T>;
  const auto acc = accumulate_type(x3.scalar_type());
  const auto acc_opts = x3.options().dtype(acc);
  Shifted s;
  s.K = at::empty({p.d}, acc_opts);
  shift_estimate_kernel<T, A><<<static_cast<unsigned int>(ceil_div(p.d, kShiftColumns)), kThreads, 0, stream>>>(
      in_ptr<S>(x3), p.n, p.d, p.L, s.K.mutable_data_ptr<A>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  s.y = p.rows ? at::empty({p.n, p.d}, x3.options()) : at::empty({p.d, p.n}, x3.options());
  s.partial = at::empty({p.nchunks, p.d}, acc_opts);
  if (other != nullptr) {
    launch_shift<T, A, true, true>(in_ptr<S>(x3), s.K.const_data_ptr<A>(), p, out_ptr<S>(s.y),
                                   s.partial.mutable_data_ptr<A>(), stream, in_ptr<S>(*other), inv_partial);
  } else {
    launch_shift<T, A, true>(in_ptr<S>(x3), s.K.const_data_ptr<A>(), p, out_ptr<S>(s.y),
                             s.partial.mutable_data_ptr<A>(), stream);
  }
  s.Q = p.rows ? gemm_acc(s.y.t(), s.y, acc) : gemm_acc(s.y, s.y.t(), acc);
  return s;
}

// (mu, M2) of x3; other, inv_partial as shifted_stats's. The shifted copy Y is freed on return.
template <typename S>
std::tuple<at::Tensor, at::Tensor> branch_stats(const at::Tensor& x3, const Plan& p, cudaStream_t stream,
                                                const at::Tensor* other = nullptr,
                                                acc_t<typename Device<S>::type>* inv_partial = nullptr) {
  using T = typename Device<S>::type;
  using A = acc_t<T>;
  const auto acc_opts = x3.options().dtype(accumulate_type(x3.scalar_type()));
  Shifted s = shifted_stats<S>(x3, p, stream, other, inv_partial);
  s.y.reset();
  at::Tensor colsum = at::empty({p.d}, acc_opts), dmu = at::empty({p.d}, acc_opts), mu = at::empty({p.d}, acc_opts);
  column_stats_kernel<A><<<static_cast<unsigned int>(ceil_div(p.d, kThreads)), kThreads, 0, stream>>>(
      s.partial.const_data_ptr<A>(), p.nchunks, s.K.const_data_ptr<A>(), s.Q.const_data_ptr<A>(), p.n, p.d,
      colsum.mutable_data_ptr<A>(), dmu.mutable_data_ptr<A>(), mu.mutable_data_ptr<A>(), A(0), A(0), A(0), nullptr,
      nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor M2 = at::empty({p.d, p.d}, acc_opts);
  m2_kernel<A><<<static_cast<unsigned int>(p.d), kThreads, 0, stream>>>(
      s.Q.const_data_ptr<A>(), colsum.const_data_ptr<A>(), p.n, p.d, M2.mutable_data_ptr<A>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {mu, M2};
}

template <typename S>
std::tuple<at::Tensor, at::Tensor> stats_impl(const at::Tensor& x3) {
  const auto stream = at::cuda::getCurrentCUDAStream().stream();
  return branch_stats<S>(x3, make_plan(x3), stream);
}

// Gs = x's dtype (G * 2^k) and the device scalars [2^k, 2^-k] for half/bfloat16 (the GEMM takes
// operands of one dtype); float32/float64 use G itself. amax_row: max_j |G_ij| per row.
template <typename S>
std::tuple<at::Tensor, at::Tensor> gemm_operand(const at::Tensor& G, const at::Tensor& amax_row, const Plan& p,
                                                const at::Tensor& x3, cudaStream_t stream) {
  using T = typename Device<S>::type;
  using A = acc_t<T>;
  if constexpr (std::is_same<T, float>::value || std::is_same<T, double>::value) {
    return {G, at::Tensor()};
  } else {
    at::Tensor scale = at::empty({2}, G.options());
    finalize_kernel<A><<<1, kThreads, 0, stream>>>(nullptr, nullptr, amax_row.const_data_ptr<A>(), p.d, nullptr,
                                                   scale.mutable_data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    at::Tensor Gs = at::empty({p.d, p.d}, x3.options());
    const int64_t count = p.d * p.d;
    const auto blocks = static_cast<unsigned int>(std::min<int64_t>(ceil_div(count, kThreads), 1024));
    scale_convert_kernel<T, A><<<blocks, kThreads, 0, stream>>>(G.const_data_ptr<A>(), scale.const_data_ptr<A>(),
                                                                count, out_ptr<S>(Gs));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {Gs, scale};
  }
}

template <typename S>
std::tuple<at::Tensor, at::Tensor> backward_impl(const at::Tensor& gy3, const at::Tensor& x3, double alpha,
                                                 double beta, double eps, double gamma, std::optional<double> delta) {
  using T = typename Device<S>::type;
  using A = acc_t<T>;
  const auto stream = at::cuda::getCurrentCUDAStream().stream();
  const Plan p = make_plan(x3);
  const auto acc = accumulate_type(x3.scalar_type());
  const auto acc_opts = x3.options().dtype(acc);
  const int64_t n = p.n, d = p.d;
  Shifted s = shifted_stats<S>(x3, p, stream);

  // Finalize: mu, the diagonal, then G row by row, then the terms.
  at::Tensor colsum = at::empty({d}, acc_opts), dmu = at::empty({d}, acc_opts), mu = at::empty({d}, acc_opts);
  at::Tensor gdiag = at::empty({d}, acc_opts), lvar = at::empty({d}, acc_opts);
  const double coef_var = alpha / (static_cast<double>(d) * static_cast<double>(n - 1));
  column_stats_kernel<A><<<static_cast<unsigned int>(ceil_div(d, kThreads)), kThreads, 0, stream>>>(
      s.partial.const_data_ptr<A>(), p.nchunks, s.K.const_data_ptr<A>(), s.Q.const_data_ptr<A>(), n, d,
      colsum.mutable_data_ptr<A>(), dmu.mutable_data_ptr<A>(), mu.mutable_data_ptr<A>(), static_cast<A>(eps),
      static_cast<A>(gamma), static_cast<A>(coef_var), gdiag.mutable_data_ptr<A>(), lvar.mutable_data_ptr<A>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  at::Tensor G = at::empty({d, d}, acc_opts);
  at::Tensor phi_row = at::empty({d}, acc_opts), r = at::empty({d}, acc_opts), amax_row = at::empty({d}, acc_opts);
  const double coef_cov =
      d > 1 ? 4.0 * beta / (static_cast<double>(d) * static_cast<double>(d - 1) * static_cast<double>(n - 1)) : 0.0;
  gradient_kernel<A><<<static_cast<unsigned int>(d), kThreads, 0, stream>>>(
      s.Q.const_data_ptr<A>(), colsum.const_data_ptr<A>(), dmu.const_data_ptr<A>(), gdiag.const_data_ptr<A>(), n, d,
      static_cast<A>(coef_cov), delta.has_value(), static_cast<A>(delta.value_or(0.0)), G.mutable_data_ptr<A>(),
      phi_row.mutable_data_ptr<A>(), r.mutable_data_ptr<A>(), amax_row.mutable_data_ptr<A>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  s.Q.reset();

  at::Tensor terms = at::empty({2}, acc_opts);
  finalize_kernel<A><<<1, kThreads, 0, stream>>>(lvar.const_data_ptr<A>(), phi_row.const_data_ptr<A>(), nullptr, d,
                                                 terms.mutable_data_ptr<A>(), nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // Apply: P = Y Gs, then grad_x = grad_y + P 2^-k - r. Y is freed before grad_x is allocated, so
  // that grad_x can take its memory.
  at::Tensor Gm, scale;
  std::tie(Gm, scale) = gemm_operand<S>(G, amax_row, p, x3, stream);
  at::Tensor P = apply_gemm(s.y, Gm, p, acc);
  s.y.reset();
  at::Tensor out = at::empty(x3.sizes(), gy3.options());
  launch_epilogue<A>(gy3, P, r.const_data_ptr<A>(), scale.defined() ? scale.const_data_ptr<A>() + 1 : nullptr, p,
                     out, stream);
  return {out, terms};
}

// gemm_operand for a G that comes from the caller (the apply ops): its row maxima first.
template <typename S>
std::tuple<at::Tensor, at::Tensor> caller_gemm_operand(const at::Tensor& G, const Plan& p, const at::Tensor& x3,
                                                       cudaStream_t stream) {
  using T = typename Device<S>::type;
  using A = acc_t<T>;
  at::Tensor amax_row;
  if constexpr (!(std::is_same<T, float>::value || std::is_same<T, double>::value)) {
    amax_row = at::empty({p.d}, G.options());
    row_absmax_kernel<A><<<static_cast<unsigned int>(p.d), kThreads, 0, stream>>>(G.const_data_ptr<A>(), p.d,
                                                                                  amax_row.mutable_data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return gemm_operand<S>(G, amax_row, p, x3, stream);
}

template <typename S>
at::Tensor apply_impl(const at::Tensor& gy3, const at::Tensor& x3, const at::Tensor& G, const at::Tensor& mu) {
  using T = typename Device<S>::type;
  using A = acc_t<T>;
  const auto stream = at::cuda::getCurrentCUDAStream().stream();
  const Plan p = make_plan(x3);
  const auto acc = accumulate_type(x3.scalar_type());
  at::Tensor out = at::empty(x3.sizes(), gy3.options());
  if (p.n == 0) return out;
  // Y = X - mu: centred exactly in the accumulate dtype before the rounding to x's dtype.
  at::Tensor y = p.rows ? at::empty({p.n, p.d}, x3.options()) : at::empty({p.d, p.n}, x3.options());
  launch_shift<T, A, false>(in_ptr<S>(x3), mu.const_data_ptr<A>(), p, out_ptr<S>(y), nullptr, stream);
  at::Tensor Gm, scale;
  std::tie(Gm, scale) = caller_gemm_operand<S>(G, p, x3, stream);
  at::Tensor P = apply_gemm(y, Gm, p, acc);
  y.reset();
  launch_epilogue<A>(gy3, P, static_cast<const A*>(nullptr),
                     scale.defined() ? scale.const_data_ptr<A>() + 1 : nullptr, p, out, stream);
  return out;
}

// ---------------------------------------------------------------------------------------------
// The VICReg pair kernels (SPEC section 9).

// Both branches' statistics and the invariance sum: branch a's statistics, then branch b's, whose
// shift pass also reads Z_a for the partial sums of (Z_a - Z_b)^2 (vcreg_kernels.cuh). One
// shifted copy Y at a time.
template <typename S>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> pair_stats_impl(const at::Tensor& za3,
                                                                                      const at::Tensor& zb3) {
  using T = typename Device<S>::type;
  using A = acc_t<T>;
  const auto stream = at::cuda::getCurrentCUDAStream().stream();
  const Plan p = make_plan(za3);
  const auto acc_opts = za3.options().dtype(accumulate_type(za3.scalar_type()));
  at::Tensor mu_a, M2_a, mu_b, M2_b;
  std::tie(mu_a, M2_a) = branch_stats<S>(za3, p, stream);
  at::Tensor inv_partial = at::empty({p.nchunks, p.d}, acc_opts);
  std::tie(mu_b, M2_b) = branch_stats<S>(zb3, p, stream, &za3, inv_partial.mutable_data_ptr<A>());
  at::Tensor inv = at::empty({}, acc_opts);
  invariance_total_kernel<A><<<1, kThreads, 0, stream>>>(inv_partial.const_data_ptr<A>(), inv_partial.numel(),
                                                         inv.mutable_data_ptr<A>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {mu_a, M2_a, mu_b, M2_b, inv};
}

// The pair apply's blocks: whole batch items of the canonical tensors (each block is canonical
// itself), at least kPairMinSamples samples, else as many as keep the block's products within
// kPairScratchBytes. The products' scratch is then bounded whatever n; more, shorter products
// would read G once more each (at 512 samples a float32 product already does 256 flops per byte
// of G it reads).
constexpr int64_t kPairScratchBytes = 8 << 20;
constexpr int64_t kPairMinSamples = 512;

// Both gradients of the pair apply (vcreg_kernels.cuh), block by block:
//   Y_a = T(Z_a - mu_a) into grad_b's block (free until the epilogue writes it), P_a = Y_a G_a;
//   Y_b the same, into the same place, P_b = Y_b G_b; then the epilogue writes both gradients.
// P_a goes straight into grad_a's block where the product's dtype and layout are the gradient's
// (float32/float64 "rows"); otherwise P_a and P_b are scratch in the accumulate dtype (P^T, d x
// samples, in "bdl"). No n x d temporary beyond the two gradients: the scratch is one or two
// blocks' products. Half/bfloat16: G scaled by 2^k for the GEMM, P by 2^-k in the epilogue, as
// the apply's. g, c: device scalars read by the epilogue, never by the host.
template <typename S>
std::tuple<at::Tensor, at::Tensor> pair_apply_impl(const at::Tensor& g, const at::Tensor& za3, const at::Tensor& zb3,
                                                   const at::Tensor& G_a, const at::Tensor& mu_a,
                                                   const at::Tensor& G_b, const at::Tensor& mu_b,
                                                   const at::Tensor& c) {
  using T = typename Device<S>::type;
  using A = acc_t<T>;
  constexpr bool same = std::is_same<T, A>::value;
  const auto stream = at::cuda::getCurrentCUDAStream().stream();
  const auto acc = accumulate_type(za3.scalar_type());
  const auto acc_opts = za3.options().dtype(acc);
  at::Tensor out_a = at::empty(za3.sizes(), za3.options()), out_b = at::empty(zb3.sizes(), zb3.options());
  const int64_t B = za3.size(0), d = za3.size(1), L = za3.size(2);
  if (B * L == 0) return {out_a, out_b};
  const Plan whole = make_plan(za3);
  at::Tensor Gm_a, scale_a, Gm_b, scale_b;
  std::tie(Gm_a, scale_a) = caller_gemm_operand<S>(G_a, whole, za3, stream);
  std::tie(Gm_b, scale_b) = caller_gemm_operand<S>(G_b, whole, zb3, stream);
  const A* inv_a = scale_a.defined() ? scale_a.const_data_ptr<A>() + 1 : nullptr;
  const A* inv_b = scale_b.defined() ? scale_b.const_data_ptr<A>() + 1 : nullptr;

  const bool direct = same && L == 1;
  const int64_t sample_bytes = d * static_cast<int64_t>(sizeof(A)) * (direct ? 1 : 2);
  const int64_t samples = std::max<int64_t>(kPairMinSamples, kPairScratchBytes / sample_bytes);
  const int64_t nblocks = ceil_div(B, std::max<int64_t>(1, samples / L));
  const int64_t items = ceil_div(B, nblocks);  // equal blocks
  at::Tensor scratch = at::empty({(direct ? 1 : 2) * items * L * d}, acc_opts);

  // P = Y Gm into P ("rows": (n, d); "bdl": P^T = Gm^T Y^T, (d, n)), in the accumulate dtype.
  const auto product = [&](at::Tensor& P, const at::Tensor& y, const at::Tensor& Gm, bool rows) {
    const at::Tensor lhs = rows ? y : Gm.t();
    const at::Tensor rhs = rows ? Gm : y;
    if (same) {
      at::mm_out(P, lhs, rhs);
    } else {
      at::mm_out(P, lhs, rhs, acc);
    }
  };
  for (int64_t b0 = 0; b0 < B; b0 += items) {
    const int64_t nb = std::min(items, B - b0);
    const at::Tensor za = za3.narrow(0, b0, nb), zb = zb3.narrow(0, b0, nb);
    at::Tensor oa = out_a.narrow(0, b0, nb), ob = out_b.narrow(0, b0, nb);
    const Plan p = make_plan(za);
    const std::vector<int64_t> shape = p.rows ? std::vector<int64_t>{p.n, d} : std::vector<int64_t>{d, p.n};
    at::Tensor y = ob.view(shape);
    at::Tensor Pa = direct ? oa.view(shape) : scratch.narrow(0, 0, p.n * d).view(shape);
    at::Tensor Pb = scratch.narrow(0, direct ? 0 : items * L * d, p.n * d).view(shape);
    launch_shift<T, A, false>(in_ptr<S>(za), mu_a.const_data_ptr<A>(), p, out_ptr<S>(y), nullptr, stream);
    product(Pa, y, Gm_a, p.rows);
    launch_shift<T, A, false>(in_ptr<S>(zb), mu_b.const_data_ptr<A>(), p, out_ptr<S>(y), nullptr, stream);
    product(Pb, y, Gm_b, p.rows);
    if (p.rows) {
      pair_epilogue_rows_kernel<T, A><<<p.grid, kThreads, 0, stream>>>(
          in_ptr<S>(za), in_ptr<S>(zb), Pa.const_data_ptr<A>(), Pb.const_data_ptr<A>(), inv_a, inv_b,
          g.const_data_ptr<A>(), c.const_data_ptr<A>(), p.n, d, p.W, p.chunk, out_ptr<S>(oa), out_ptr<S>(ob));
    } else {
      pair_epilogue_cols_kernel<T, A><<<p.grid, kThreads, 0, stream>>>(
          in_ptr<S>(za), in_ptr<S>(zb), Pa.const_data_ptr<A>(), Pb.const_data_ptr<A>(), inv_a, inv_b,
          g.const_data_ptr<A>(), c.const_data_ptr<A>(), p.n, d, make_walk(d, p.L), p.chunk, out_ptr<S>(oa),
          out_ptr<S>(ob));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {out_a, out_b};
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// The registered kernels. x3 and grad_y3 are canonical (contiguous; vcreg_common.h checks), so
// the results are contiguous (B, d, L) tensors too.

std::tuple<at::Tensor, at::Tensor> vcreg_stats_cuda(const at::Tensor& x3) {
  check_stats_args(x3);
  check_cuda(x3, "vcreg::stats_kernel");
  const c10::cuda::CUDAGuard guard(x3.device());
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x3.scalar_type(), "vcreg_stats_cuda",
                                         [&] { return stats_impl<scalar_t>(x3); });
}

at::Tensor vcreg_apply_cuda(const at::Tensor& gy3, const at::Tensor& x3, const at::Tensor& G, const at::Tensor& mu) {
  check_apply_args(gy3, x3, G, mu);
  check_cuda(x3, "vcreg::apply_kernel");
  const c10::cuda::CUDAGuard guard(x3.device());
  const auto acc = accumulate_type(x3.scalar_type());
  const at::Tensor Gc = G.to(acc).contiguous(), muc = mu.to(acc).contiguous();
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x3.scalar_type(), "vcreg_apply_cuda",
                                         [&] { return apply_impl<scalar_t>(gy3, x3, Gc, muc); });
}

std::tuple<at::Tensor, at::Tensor> vcreg_backward_cuda(const at::Tensor& gy3, const at::Tensor& x3, double alpha,
                                                       double beta, double eps, double gamma,
                                                       std::optional<double> delta) {
  check_backward_args(gy3, x3);
  check_cuda(x3, "vcreg::backward_kernel");
  const c10::cuda::CUDAGuard guard(x3.device());
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x3.scalar_type(), "vcreg_backward_cuda",
                                         [&] { return backward_impl<scalar_t>(gy3, x3, alpha, beta, eps, gamma, delta); });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> vicreg_pair_stats_cuda(const at::Tensor& za3,
                                                                                               const at::Tensor& zb3) {
  check_pair_args(za3, zb3);
  TORCH_CHECK_VALUE(num_samples(za3) >= 1, "vcreg: z_a and z_b have no samples, shape ", za3.sizes());
  check_cuda(za3, "vcreg::pair_stats_kernel");
  const c10::cuda::CUDAGuard guard(za3.device());
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, za3.scalar_type(), "vicreg_pair_stats_cuda",
                                         [&] { return pair_stats_impl<scalar_t>(za3, zb3); });
}

std::tuple<at::Tensor, at::Tensor> vicreg_pair_apply_cuda(const at::Tensor& g, const at::Tensor& za3,
                                                          const at::Tensor& zb3, const at::Tensor& G_a,
                                                          const at::Tensor& mu_a, const at::Tensor& G_b,
                                                          const at::Tensor& mu_b, const at::Tensor& c) {
  check_pair_apply_args(g, za3, zb3, G_a, mu_a, G_b, mu_b, c);
  check_cuda(za3, "vcreg::pair_apply_kernel");
  const c10::cuda::CUDAGuard guard(za3.device());
  // Device-side conversions (no copy where the operands are in the accumulate dtype already, as
  // the loss passes them): the scalars g and c stay on the device.
  const auto acc = accumulate_type(za3.scalar_type());
  const auto conv = [acc](const at::Tensor& t) { return t.to(acc).contiguous(); };
  const at::Tensor g_acc = conv(g), c_acc = conv(c);
  const at::Tensor Ga = conv(G_a), mua = conv(mu_a), Gb = conv(G_b), mub = conv(mu_b);
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, za3.scalar_type(), "vicreg_pair_apply_cuda",
                                         [&] { return pair_apply_impl<scalar_t>(g_acc, za3, zb3, Ga, mua, Gb, mub, c_acc); });
}

TORCH_LIBRARY_IMPL(vcreg, CUDA, m) {
  m.impl("backward_kernel", &vcreg_backward_cuda);
  m.impl("stats_kernel", &vcreg_stats_cuda);
  m.impl("apply_kernel", &vcreg_apply_cuda);
  m.impl("pair_stats_kernel", &vicreg_pair_stats_cuda);
  m.impl("pair_apply_kernel", &vicreg_pair_apply_cuda);
}

}  // namespace cuda
}  // namespace vcreg
