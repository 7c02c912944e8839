// vcreg::eager_node: the layer of vcreg_kernels/_ops.py (what _VCRegFunction does) as a C++ autograd
// node, for CPU tensors in plain eager mode on the compiled cpu backend. Its forward returns a view
// of x, as _VCRegFunction's does; its backward runs vcreg::backward_kernel on x's canonical view with
// no Python in between. A Python autograd node's backward and the layout and dispatch code it runs
// cost 0.3 to 0.5 ms with cold caches (where a network's backward leaves them between two layers),
// against kernels of 1 to 3 ms at the small-batch shapes of bench/cpu_ratios.py (2-core Xeon).
//
// Python calls this op only where nothing traces or intercepts the layer and the cpu backend runs
// (vcreg_kernels/_ops.py, vcreg_function). Its backward still goes the whole way, through
// vcreg::fused_backward_terms (whose implementation picks the backend and the layout), wherever
// something could be watching, the backend setting changed since the forward, or x needs a copy:
//   - `enabled` (dispatch.py's flag, a 0-dim bool tensor that set_backend keeps) is false;
//   - grad mode is on (create_graph), or a TorchDispatchMode or a torch function mode is active;
//   - grad_y is not a plain dense tensor (a subclass, functorch-wrapped, sparse);
//   - x is neither a view of canonical (B, d, L) shape in the rows layout nor in the bdl one
//     (vcreg_kernels/_layout.py: "rows" when x with its feature axis moved last is contiguous;
//     "bdl" when x is contiguous and d * L < 2^31).
// Where both run, the two give the same gradient and terms, bitwise (tests/test_eager_node.py).
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <string>
#include <tuple>

namespace vcreg {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// x's canonical (B, d, L) shape, where x has one without a copy (_layout.choose's two views).
struct View {
  bool ok = false;
  bool moved = false;  // rows: x with its feature axis moved last is X, row-major
  int64_t B = 0, d = 0, L = 0;
};

View canonical_view(const at::Tensor& x, int64_t dim) {
  View v;
  v.d = x.size(dim);
  const int64_t n = v.d == 0 ? 0 : x.numel() / v.d;
  if (x.movedim(dim, -1).is_contiguous()) {
    v.ok = true, v.moved = true, v.B = n, v.L = 1;
    return v;
  }
  v.L = 1;
  for (int64_t i = dim + 1; i < x.dim(); ++i) v.L *= x.size(i);
  v.B = v.L == 0 ? 0 : n / v.L;
  v.ok = x.is_contiguous() && v.d * v.L <= std::numeric_limits<int32_t>::max();
  return v;
}

// t (x or grad_y) in x's canonical shape: a view where t's strides are x's, else a copy
// (_layout.canonical).
at::Tensor as_canonical(const at::Tensor& t, const View& v, int64_t dim) {
  return (v.moved ? t.movedim(dim, -1).contiguous() : t.contiguous()).view({v.B, v.d, v.L});
}

// A tensor that the dispatcher hands to the CPU kernel and nothing else.
bool plain(const at::Tensor& t) {
  const c10::DispatchKeySet ks = t.key_set();
  return t.layout() == at::kStrided && !ks.has(c10::DispatchKey::Python) &&
         !ks.has(c10::DispatchKey::FuncTorchGradWrapper) && !ks.has(c10::DispatchKey::FuncTorchBatched);
}

bool nothing_intercepts() {
  return !at::GradMode::is_enabled() && c10::impl::TorchDispatchModeTLS::stack_len() == 0 &&
         !at::impl::torch_function_mode_enabled();
}

class EagerNode : public torch::autograd::Function<EagerNode> {
  enum Saved { kTermsOut, kEnabled, kAlpha, kBeta, kEps, kGamma, kDelta, kDim, kPaper };

 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const std::optional<at::Tensor>& terms_out,
                            const at::Tensor& enabled, double alpha, double beta, double eps, double gamma,
                            std::optional<double> delta, int64_t dim, bool paper) {
    ctx->save_for_backward({x});
    // The rest as one tuple, in the order of Saved: one map entry rather than nine (0.6 us of the
    // op's 4.8 with warm caches). terms_out is not saved for backward: the copy into it must not
    // trip autograd's version check when the same layer ran twice before one backward (as
    // _VCRegFunction's terms_out).
    ctx->saved_data["args"] =
        c10::ivalue::Tuple::create({terms_out, enabled, alpha, beta, eps, gamma, delta, dim, paper});
    return x.view_as(x);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor x = ctx->get_saved_variables()[0];
    const at::Tensor& grad_y = grads[0];
    const auto& a = ctx->saved_data.at("args").toTupleRef().elements();
    const c10::IValue& terms_out = a[kTermsOut];
    const double alpha = a[kAlpha].toDouble(), eps = a[kEps].toDouble(), gamma = a[kGamma].toDouble();
    double beta = a[kBeta].toDouble();
    const std::optional<double> delta = a[kDelta].toOptional<double>();
    const int64_t dim = a[kDim].toInt();
    const bool paper = a[kPaper].toBool();
    at::Tensor grad_x, terms;
    const View v = canonical_view(x, dim);
    if (*a[kEnabled].toTensor().const_data_ptr<bool>() && v.ok && plain(grad_y) && nothing_intercepts()) {
      static const auto kernel = c10::Dispatcher::singleton()
                                     .findSchemaOrThrow("vcreg::backward_kernel", "")
                                     .typed<std::tuple<at::Tensor, at::Tensor>(
                                         const at::Tensor&, const at::Tensor&, double, double, double, double,
                                         std::optional<double>)>();
      if (paper) beta *= static_cast<double>(v.B * v.L - 1);  // dispatch.vcreg_backward's scale="paper"
      at::Tensor g3;
      std::tie(g3, terms) =
          kernel.call(as_canonical(grad_y, v, dim), as_canonical(x, v, dim), alpha, beta, eps, gamma, delta);
      grad_x = v.moved ? g3.view(x.movedim(dim, -1).sizes()).movedim(-1, dim) : g3.view(x.sizes());
    } else {
      static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("vcreg::fused_backward_terms", "");
      torch::jit::Stack stack{grad_y, x, alpha, beta, eps, gamma, delta, dim, c10::IValue(),
                              std::string(paper ? "paper" : "exact")};
      op.callBoxed(&stack);
      grad_x = stack[0].toTensor();
      terms = stack[1].toTensor();
    }
    if (!terms_out.isNone()) terms_out.toTensor().copy_(terms);
    variable_list result(10);  // no gradient for the other nine arguments
    result[0] = grad_x;
    return result;
  }
};

at::Tensor eager_node(const at::Tensor& x, const std::optional<at::Tensor>& terms_out, const at::Tensor& enabled,
                      double alpha, double beta, double eps, double gamma, std::optional<double> delta, int64_t dim,
                      bool paper) {
  return EagerNode::apply(x, terms_out, enabled, alpha, beta, eps, gamma, delta, dim, paper);
}

}  // namespace
}  // namespace vcreg

TORCH_LIBRARY_IMPL(vcreg, CompositeImplicitAutograd, m) { m.impl("eager_node", &vcreg::eager_node); }
