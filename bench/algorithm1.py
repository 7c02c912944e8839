"""The paper's Algorithm 1 (Zhu et al., Appendix B) as eager PyTorch: a baseline, not the product.

Written as the paper prints it, so the latency report can compare our kernels with the paper's
own "fast implementation" on the same device. With X the activation flattened to (n, d) along
the feature dimension and demeaned over the batch (the paper applies "a batch demean operation
before calling the function"; here that demean runs inside the backward so that the forward
stays the identity, like ours):

    C      = X^T X / (n - 1)                                   (d x d)
    D      = threshold(rsqrt(diag C) + eps, 1.0, 0.0)          (d)
    grad_x = grad_y - alpha/(d(n-1)) * X * D + 4 beta/(d(d-1)) * X @ offdiag(C)

It runs in the input's dtype (bf16 matmuls for bf16 input), as the paper's code would. It is
not the gradient of SPEC section 2's loss: eps sits after the rsqrt and the covariance term has
no 1/(n-1) (SPEC section 2 lists the differences); its cost is what matters here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class PaperVCRegFunction(torch.autograd.Function):
    """Algorithm 1: identity forward; the backward adds the paper's VCReg gradient."""

    @staticmethod
    def forward(ctx, x, alpha, beta, eps, dim):
        ctx.save_for_backward(x)
        ctx.alpha, ctx.beta, ctx.eps, ctx.dim = alpha, beta, eps, dim
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        alpha, beta, eps = ctx.alpha, ctx.beta, ctx.eps
        # The paper's code takes the features in the last dimension: move them there.
        moved = x.movedim(ctx.dim, -1)
        flattened_input = moved.flatten(start_dim=0, end_dim=-2)
        flattened_input = flattened_input - flattened_input.mean(dim=0)  # the batch demean
        n, d = flattened_input.shape
        covariance_matrix = torch.mm(flattened_input.t(), flattened_input) / (n - 1)
        diagonal = F.threshold(torch.rsqrt(covariance_matrix.diagonal()) + eps, 1.0, 0.0)
        std_grad_input = diagonal * flattened_input
        cov_grad_input = torch.mm(flattened_input, covariance_matrix.fill_diagonal_(0))
        grad = -alpha / (d * (n - 1)) * std_grad_input + 4 * beta / (d * (d - 1)) * cov_grad_input
        grad_input = grad_output + grad.view(moved.shape).movedim(-1, ctx.dim)
        return grad_input, None, None, None, None


def paper_vcreg(x: torch.Tensor, alpha: float, beta: float, eps: float = 1e-4, dim: int = -1) -> torch.Tensor:
    """``x`` unchanged; its backward is the paper's Algorithm 1 along ``dim``."""
    return PaperVCRegFunction.apply(x, alpha, beta, eps, dim % x.dim())
