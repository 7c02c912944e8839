// Argument checks shared by the compiled kernels of vcreg::backward_kernel, stats_kernel,
// apply_kernel and the VICReg pair kernels pair_stats_kernel, pair_apply_kernel (csrc/vcreg_cpu.cpp,
// csrc/cuda/). Torch headers only, so that any device's
// translation unit can include it. The public checks of SPEC section 5 live in Python
// (vcreg_kernels/_params.py); these guard the ops' own contract: canonical (B, d, L) tensors
// (vcreg_kernels/_layout.py) with n = B * L samples and d features.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace vcreg {
// Internal linkage: each translation unit keeps its own copy of these helpers, compiled by its own
// compiler (g++ for csrc/*.cpp, nvcc for csrc/cuda/*.cu), rather than the linker keeping one
// compiler's copy for both.
namespace {

// float64 for float64 input, float32 for every other floating dtype (SPEC section 2).
inline at::ScalarType accumulate_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline int64_t num_samples(const at::Tensor& x3) { return x3.size(0) * x3.size(2); }

// Canonical: a contiguous (B, d, L) tensor (vcreg_kernels/_layout.py decides the layout once and
// hands every backend such tensors; "rows" is L == 1).
inline void check_canonical(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 3 && t.is_contiguous(), "vcreg: ", name,
              " must be a contiguous canonical (B, d, L) tensor, got shape ", t.sizes(), " and strides ",
              t.strides());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "vcreg: ", name, " must be floating point, got ",
              t.scalar_type());
  TORCH_CHECK_VALUE(t.size(1) >= 1, "vcreg: ", name, " has no features (d = 0), shape ", t.sizes());
}

inline void check_stats_args(const at::Tensor& x3) {
  check_canonical(x3, "x");
  TORCH_CHECK_VALUE(num_samples(x3) >= 1, "vcreg: x has no samples, shape ", x3.sizes());
}

inline void check_grad_pair(const at::Tensor& gy3, const at::Tensor& x3) {
  check_stats_args(x3);
  check_canonical(gy3, "grad_y");
  TORCH_CHECK(gy3.sizes() == x3.sizes(), "vcreg: grad_y has shape ", gy3.sizes(), ", x has ", x3.sizes());
  TORCH_CHECK(gy3.device() == x3.device(), "vcreg: grad_y is on ", gy3.device(), ", x on ", x3.device());
}

inline void check_backward_args(const at::Tensor& gy3, const at::Tensor& x3) {
  check_grad_pair(gy3, x3);
  TORCH_CHECK_VALUE(num_samples(x3) >= 2, "vcreg: needs at least 2 samples, got n = ", num_samples(x3),
                    " for a (B, d, L) tensor of shape ", x3.sizes());
}

inline void check_apply_operands(const at::Tensor& x3, const at::Tensor& G, const at::Tensor& mu) {
  const int64_t d = x3.size(1);
  TORCH_CHECK(G.dim() == 2 && G.size(0) == d && G.size(1) == d, "vcreg: G must be (d, d) = (", d, ", ", d,
              "), got ", G.sizes());
  TORCH_CHECK(mu.dim() == 1 && mu.size(0) == d, "vcreg: mu must be (d,) = (", d, ",), got ", mu.sizes());
  TORCH_CHECK(at::isFloatingType(G.scalar_type()) && at::isFloatingType(mu.scalar_type()),
              "vcreg: G and mu must be floating point, got ", G.scalar_type(), " and ", mu.scalar_type());
  TORCH_CHECK(G.device() == x3.device() && mu.device() == x3.device(), "vcreg: G and mu must be on ",
              x3.device());
}

inline void check_apply_args(const at::Tensor& gy3, const at::Tensor& x3, const at::Tensor& G,
                             const at::Tensor& mu) {
  check_grad_pair(gy3, x3);
  check_apply_operands(x3, G, mu);
}

// The VICReg pair kernels' two branches: canonical tensors of one shape, dtype and device (the
// messages of vcreg_kernels/reference.py's _check_pair).
inline void check_pair_args(const at::Tensor& za3, const at::Tensor& zb3) {
  check_canonical(za3, "z_a");
  check_canonical(zb3, "z_b");
  TORCH_CHECK(za3.sizes() == zb3.sizes() && za3.scalar_type() == zb3.scalar_type(), "vcreg: the branches differ: ",
              za3.sizes(), " ", za3.scalar_type(), ", ", zb3.sizes(), " ", zb3.scalar_type());
  TORCH_CHECK(za3.device() == zb3.device(), "vcreg: z_a is on ", za3.device(), ", z_b on ", zb3.device());
}

// pair_apply_kernel's operands: G and mu per branch as apply_kernel's, g and c one-element floating
// tensors on the branches' device.
inline void check_pair_apply_args(const at::Tensor& g, const at::Tensor& za3, const at::Tensor& zb3,
                                  const at::Tensor& G_a, const at::Tensor& mu_a, const at::Tensor& G_b,
                                  const at::Tensor& mu_b, const at::Tensor& c) {
  check_pair_args(za3, zb3);
  check_apply_operands(za3, G_a, mu_a);
  check_apply_operands(zb3, G_b, mu_b);
  for (const at::Tensor* t : {&g, &c}) {
    TORCH_CHECK(t->numel() == 1 && at::isFloatingType(t->scalar_type()), "vcreg: ", t == &g ? "g" : "c",
                " must be a one-element floating point tensor, got shape ", t->sizes(), " and ", t->scalar_type());
    TORCH_CHECK(t->device() == za3.device(), "vcreg: ", t == &g ? "g" : "c", " must be on ", za3.device());
  }
}

}  // namespace
}  // namespace vcreg
