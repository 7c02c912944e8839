"""The op schemas, defined once (SPEC section 3). Compiled code only implements kernels for them.

* ``vcreg::fused(x, ...) -> x``: identity forward that returns a view of x (no copy); its
  backward adds d(loss)/dx through ``vcreg::fused_backward``. It is a CompositeImplicitAutograd
  op that calls ``_VCRegFunction``, so eager, torch.compile and autograd all see one definition.
* ``vcreg::fused_backward(grad_y, x, ...) -> grad_x``: a custom op with a fake implementation;
  its real implementation asks ``dispatch`` which backend runs.
* ``vcreg::backward_kernel(grad_y3, x3, ...) -> (grad_x3, terms)``: the compiled backends' op on
  canonical (B, d, L) views, with CPU and CUDA kernels registered from csrc/; and its two halves
  ``vcreg::stats_kernel(x3) -> (mu, M2)`` and ``vcreg::apply_kernel(grad_y3, x3, G, mu) -> grad_x3``.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import dispatch
from ._checks import check_args

_lib = torch.library.Library("vcreg", "DEF")
_lib.define(
    "fused(Tensor(a) x, float alpha, float beta, float eps=0.0001, float gamma=1.0, "
    "float? delta=None, int dim=-1) -> Tensor(a)"
)
_lib.define(
    "backward_kernel(Tensor grad_y, Tensor x, float alpha, float beta, float eps, float gamma, "
    "float? delta) -> (Tensor, Tensor)"
)
# The two halves of backward_kernel, for the cross-rank mode that all-reduces the statistics
# between them: (mu, M2 = Xc^T Xc) of x3, and grad_y3 + (X - mu) @ G.
_lib.define("stats_kernel(Tensor x) -> (Tensor, Tensor)")
_lib.define("apply_kernel(Tensor grad_y, Tensor x, Tensor G, Tensor mu) -> Tensor")


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
    dim = check_args(x, alpha, beta, eps, gamma, delta, dim)
    if grad_y.shape != x.shape:
        raise ValueError(f"vcreg: grad_y has shape {tuple(grad_y.shape)}, x has {tuple(x.shape)}")
    grad_x, _terms = dispatch.vcreg_backward(grad_y, x, alpha, beta, eps, gamma, delta, dim)
    return grad_x


@fused_backward.register_fake
def _fused_backward_fake(grad_y, x, alpha, beta, eps, gamma, delta, dim):
    return torch.empty_like(x, dtype=grad_y.dtype)


class _VCRegFunction(torch.autograd.Function):
    """Identity forward returning a view of x; backward = fused_backward."""

    @staticmethod
    def forward(x, alpha, beta, eps, gamma, delta, dim):
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, *params = inputs
        ctx.save_for_backward(x)
        ctx.params = params

    @staticmethod
    def backward(ctx, grad_y):
        (x,) = ctx.saved_tensors
        grad_x = torch.ops.vcreg.fused_backward(grad_y, x, *ctx.params)
        return (grad_x,) + (None,) * len(ctx.params)


def _fused(x, alpha, beta, eps=1e-4, gamma=1.0, delta=None, dim=-1):
    dim = check_args(x, alpha, beta, eps, gamma, delta, dim)
    return _VCRegFunction.apply(x, alpha, beta, eps, gamma, delta, dim)


_lib.impl("fused", _fused, "CompositeImplicitAutograd")
