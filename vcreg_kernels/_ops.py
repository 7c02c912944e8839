"""The op schemas, defined once (SPEC section 3). Compiled code only implements kernels for them.

* ``vcreg::fused(x, ...) -> x``: identity forward that returns a view of x (no copy); its
  backward adds d(loss)/dx through ``vcreg::fused_backward_terms``. It is a
  CompositeImplicitAutograd op that calls ``_VCRegFunction`` (as ``VCReg`` does, through
  ``vcreg_function``), so eager, torch.compile and autograd all see one definition.
* ``vcreg::eager_node(x, terms_out, enabled, ...) -> x``: the same layer as a C++ autograd node
  (csrc/vcreg_autograd.cpp), which ``vcreg_function`` records instead of ``_VCRegFunction`` for CPU
  tensors in plain eager mode on the cpu backend; its backward runs ``backward_kernel`` with no
  Python in between, and hands over to ``fused_backward_terms`` wherever anything watches.
* ``vcreg::fused_backward(grad_y, x, ...) -> grad_x``: a custom op with a fake implementation;
  its real implementation asks ``dispatch`` which backend runs.
* ``scale="paper"`` (on ``fused`` and ``fused_backward_terms``): the covariance coefficient is
  beta * (n - 1), n the layer's sample count (the group's, in the cross-rank mode), applied where
  the backward knows n (``dispatch.vcreg_backward``, ``distributed.vcreg_backward_sync``).
* ``vcreg::fused_backward_terms(grad_y, x, ..., group) -> (grad_x, terms)``: internal, the same
  implementation; what ``_VCRegFunction``'s backward calls. It also returns ``terms = tensor([l_var, l_cov])``, which the backward
  copies into the module's ``VCReg.terms`` buffer when it has one (logging without a second pass
  over x and without a host sync: a device-side copy, kept in the graph under torch.compile as a
  backward mutation of a forward input), and with ``group`` (a ``distributed.group_key``) it
  takes the statistics of the whole process group's batch (the cross-rank mode, SPEC section 8).
* ``vcreg::backward_kernel(grad_y3, x3, ...) -> (grad_x3, terms)``: the compiled backends' op on
  canonical (B, d, L) views, with CPU and CUDA kernels registered from csrc/; and its two halves
  ``vcreg::stats_kernel(x3) -> (mu, M2)`` and ``vcreg::apply_kernel(grad_y3, x3, G, mu) -> grad_x3``.
* ``vcreg::pair_stats_kernel(za3, zb3)`` and ``vcreg::pair_apply_kernel(g, za3, zb3, G_a, mu_a, G_b, mu_b, c)``:
  the VICReg loss's fused pair kernels (``dispatch.Backend``'s pair_stats, pair_apply), with CPU and
  CUDA kernels registered from csrc/vcreg_cpu.cpp and csrc/cuda/vcreg_cuda.cu.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import dispatch
from ._params import Params, check_args, check_scale
from .reference import accumulate_dtype

_lib = torch.library.Library("vcreg", "DEF")
_lib.define(
    "fused(Tensor(a) x, float alpha, float beta, float eps=0.0001, float gamma=1.0, "
    "float? delta=None, int dim=-1, str scale=\"exact\") -> Tensor(a)"
)
_lib.define(
    "backward_kernel(Tensor grad_y, Tensor x, float alpha, float beta, float eps, float gamma, "
    "float? delta) -> (Tensor, Tensor)"
)
# The two halves of backward_kernel, for the cross-rank mode that all-reduces the statistics
# between them: (mu, M2 = Xc^T Xc) of x3, and grad_y3 + (X - mu) @ G.
_lib.define("stats_kernel(Tensor x) -> (Tensor, Tensor)")
_lib.define("apply_kernel(Tensor grad_y, Tensor x, Tensor G, Tensor mu) -> Tensor")
# vcreg_function on CPU tensors in plain eager mode on the cpu backend: what _VCRegFunction does, as a
# C++ autograd node (csrc/vcreg_autograd.cpp) whose backward calls backward_kernel with no Python in
# between. ``enabled``: dispatch's flag of whether set_backend still lets the cpu kernel run, read in
# the backward.
_lib.define("eager_node(Tensor(a) x, Tensor? terms_out, Tensor enabled, float alpha, float beta, float eps, "
            "float gamma, float? delta, int dim, bool paper) -> Tensor(a)")
# The VICReg loss's pair kernels (vicreg.py; dispatch.Backend's pair_stats and pair_apply, with
# their semantics in reference.vicreg_pair_stats_reference and vicreg_pair_apply_reference):
# (mu_a, M2_a, mu_b, M2_b, sum (Z_a - Z_b)^2) of two canonical branches, and both gradients.
_lib.define("pair_stats_kernel(Tensor za, Tensor zb) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")
_lib.define("pair_apply_kernel(Tensor g, Tensor za, Tensor zb, Tensor Ga, Tensor mua, Tensor Gb, Tensor mub, "
            "Tensor c) -> (Tensor, Tensor)")


def _backward(grad_y, x, params: Params, dim, group, scale="exact"):
    """(grad_x, terms): both backward ops' implementation; ``dispatch`` picks the backend."""
    # In the cross-rank mode only the global n must reach 2: distributed.py checks it.
    dim = check_args(x, params, dim, min_samples=2 if group is None else 0)
    if grad_y.shape != x.shape:
        raise ValueError(f"vcreg: grad_y has shape {tuple(grad_y.shape)}, x has {tuple(x.shape)}")
    return _checked_backward(grad_y, x, params, dim, group, scale)


def _checked_backward(grad_y, x, params: Params, dim, group, scale):
    """``_backward`` on arguments already checked: ``dim`` normalised, grad_y of x's shape (what
    ``vcreg_function`` checked when the layer ran, and autograd of an output's gradient)."""
    # A backward run inside torch.autocast would otherwise cast the reference's matmuls (and the
    # finalisation's) to bf16/fp16: the backends keep their own precision policy (SPEC section 2).
    # Outside autocast the context is skipped (entering it costs about 4 us per call).
    if torch.is_autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return dispatch.vcreg_backward(grad_y, x, params, dim, group=group, scale=scale)
    return dispatch.vcreg_backward(grad_y, x, params, dim, group=group, scale=scale)


@torch.library.custom_op("vcreg::fused_backward", mutates_args=())
def fused_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    alpha: float,
    beta: float,
    eps: float,
    gamma: float,
    delta: Optional[float],
    dim: int,
) -> torch.Tensor:
    """grad_y + d(loss)/dx of SPEC section 2, on the backend ``dispatch`` picks."""
    grad_x, _terms = _backward(grad_y, x, Params.of(alpha, beta, eps, gamma, delta), dim, None)
    return grad_x


@fused_backward.register_fake
def _fused_backward_fake(grad_y, x, alpha, beta, eps, gamma, delta, dim):
    return torch.empty_like(x, dtype=grad_y.dtype)


@torch.library.custom_op("vcreg::fused_backward_terms", mutates_args=())
def fused_backward_terms(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    alpha: float,
    beta: float,
    eps: float,
    gamma: float,
    delta: Optional[float],
    dim: int,
    group: Optional[str],
    scale: str = "exact",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(fused_backward's grad_x, tensor([l_var, l_cov])); with ``group``, over the whole group's batch."""
    return _backward(grad_y, x, Params.of(alpha, beta, eps, gamma, delta), dim, group, scale)


@fused_backward_terms.register_fake
def _fused_backward_terms_fake(grad_y, x, alpha, beta, eps, gamma, delta, dim, group, scale="exact"):
    return torch.empty_like(x, dtype=grad_y.dtype), x.new_empty(2, dtype=accumulate_dtype(x.dtype))


# torch's own tests of "nothing intercepts" (private: where a torch release lacks one, the backward
# always goes through the op).
_HAS_INTERCEPT_CHECKS = all(hasattr(m, a) for m, a in ((torch._C, "_len_torch_dispatch_stack"),
                                                        (torch._C, "_is_torch_function_mode_enabled"),
                                                        (getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor")))


def _unwatched(*tensors: torch.Tensor) -> bool:
    """Whether nothing traces or intercepts ops on ``tensors``: plain tensors (no fake, functional
    or functorch-wrapped ones), no dispatch or torch-function mode, no compile tracing."""
    # is_compiling first: Dynamo, tracing this, folds it to True and reads no further.
    return (not torch.compiler.is_compiling()
            and _HAS_INTERCEPT_CHECKS
            and torch._C._len_torch_dispatch_stack() == 0
            and not torch._C._is_torch_function_mode_enabled()
            and all(type(t) is torch.Tensor and not torch._C._functorch.is_functorch_wrapped_tensor(t)
                    for t in tensors))


def _plain_eager(*tensors: torch.Tensor) -> bool:
    """Whether calling the backward op's implementation directly does exactly what calling the op
    would: ``_unwatched``, and no graph of the backward being recorded. The op's round trip through
    the dispatcher and torch.library's Python layers costs about 15 us per backward with warm
    caches and 150 us with cold ones (a network's backward evicts them between two layers), against
    a 2 ms kernel at (4, 96, 56, 56) on a 2-core CPU. Anything that traces, intercepts or
    differentiates the backward still sees ``vcreg::fused_backward_terms``."""
    return _unwatched(*tensors) and not torch.is_grad_enabled()


class _VCRegFunction(torch.autograd.Function):
    """Identity forward returning a view of x; backward = fused_backward_terms.

    ``terms_out``: None, or a float tensor of 2 elements that the backward overwrites with the
    terms (``VCReg.terms``); ``group``: None, or the ``distributed.group_key`` of the cross-rank mode;
    ``scale``: "exact" or "paper".
    """

    @staticmethod
    def forward(ctx, x, alpha, beta, eps, gamma, delta, dim, terms_out, group, scale):
        # forward(ctx, ...) rather than forward + setup_context: apply then costs about 4 us, not 30
        # (torch binds the arguments of a setup_context Function through inspect.signature).
        ctx.save_for_backward(x)
        ctx.params = (alpha, beta, eps, gamma, delta, dim, group, scale)
        # A plain attribute, not save_for_backward: the copy into it must not trip autograd's
        # version check of saved tensors when the same layer ran twice before one backward.
        ctx.terms_out = terms_out
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_y):
        (x,) = ctx.saved_tensors
        if _plain_eager(grad_y, x):
            alpha, beta, eps, gamma, delta, dim, group, scale = ctx.params
            grad_x, terms = _checked_backward(grad_y, x, Params.of(alpha, beta, eps, gamma, delta), dim, group,
                                              scale)
        else:
            grad_x, terms = torch.ops.vcreg.fused_backward_terms(grad_y, x, *ctx.params)
        if ctx.terms_out is not None:
            ctx.terms_out.copy_(terms)
        return (grad_x,) + (None,) * 9


def vcreg_function(x, params: Params, dim, terms_out=None, group=None, scale="exact"):
    """``fused``, and what ``VCReg`` calls: also logs the terms into ``terms_out``, syncs over ``group``."""
    dim = check_args(x, params, dim, min_samples=2 if group is None else 0)
    check_scale(scale)
    # _unwatched first: under torch.compile it is False before anything untraceable runs.
    if group is None and _unwatched(x) and x.device.type == "cpu" and dispatch.cpu_kernel_runs():
        # The same layer as a C++ autograd node (``eager_node`` above): no Python in its backward.
        return torch.ops.vcreg.eager_node(x, terms_out, dispatch.cpu_kernel_flag(), *params.values(), dim,
                                          scale == "paper")
    # The scalars travel separately: autograd.Function arguments that torch.compile traces as constants.
    return _VCRegFunction.apply(x, *params.values(), dim, terms_out, group, scale)


def _fused(x, alpha, beta, eps=1e-4, gamma=1.0, delta=None, dim=-1, scale="exact"):
    return vcreg_function(x, Params(alpha, beta, eps, gamma, delta), dim, scale=scale)


_lib.impl("fused", _fused, "CompositeImplicitAutograd")
