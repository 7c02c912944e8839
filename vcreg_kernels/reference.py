"""The math of SPEC section 2 in plain PyTorch: the loss, G, and the ``reference`` backend.

X (n x d) is the activation flattened along the feature dimension ``dim``; then

    mu = mean of the rows of X,  Xc = X - mu,  M2 = Xc^T Xc,  C = M2 / (n - 1),  s_j = sqrt(C_jj + eps)
    l_var = (1/d) sum_j relu(gamma - s_j)
    l_cov = 1/(d(d-1)) sum_{i != j} phi(C_ij),  phi = square, or smooth L1 with threshold delta
    loss  = alpha * l_var + beta * l_cov

and the backward adds d(loss)/dX = Xc @ G with
    G_jj = -alpha / (d (n-1)) * [s_j < gamma] / s_j
    G_ij =  4 beta / (d (d-1) (n-1)) * clip(C_ij, -delta, delta)   (i != j)

Every backend (``dispatch``) computes this on canonical (B, d, L) tensors (``_layout``) in two
halves, ``stats`` -> (mu, M2) and ``apply`` -> grad_y + (X - mu) @ G, with ``gradient_matrix``
between them; the reference backend is exactly that composition in float64-capable torch ops.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._layout import check_apply_operands, check_canonical
from ._params import Params, check_args


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 input, float32 for everything else (SPEC section 2)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _flatten(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x.movedim(dim, -1).reshape(-1, x.shape[dim])


def _phi(c: torch.Tensor, delta: Optional[float]) -> torch.Tensor:
    if delta is None:
        return c * c
    a = c.abs()
    return torch.where(a <= delta, c * c, 2 * delta * a - delta * delta)


def vcreg_loss(
    x: torch.Tensor,
    alpha: float,
    beta: float,
    eps: float = 1e-4,
    gamma: float = 1.0,
    delta: Optional[float] = None,
    dim: int = -1,
) -> torch.Tensor:
    """The VCReg loss of SPEC section 2 as plain differentiable PyTorch (the "naive" form).

    Adding ``vcreg_loss(h, ...)`` to the training loss gives the same parameter gradients as
    passing ``h`` through ``torch.ops.vcreg.fused`` with the same arguments.
    """
    params = Params(alpha, beta, eps, gamma, delta)
    dim = check_args(x, params, dim)
    l_var, l_cov = vcreg_terms_of(x, eps, gamma, delta, dim)
    return alpha * l_var + beta * l_cov


def vcreg_terms_of(
    x: torch.Tensor, eps: float, gamma: float, delta: Optional[float], dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(l_var, l_cov) of x, differentiable, computed in x's accumulate dtype."""
    X = _flatten(x, dim).to(accumulate_dtype(x.dtype))
    n, d = X.shape
    Xc = X - X.mean(0)
    C = Xc.T @ Xc / (n - 1)
    s = torch.sqrt(torch.diagonal(C) + eps)
    l_var = torch.relu(gamma - s).mean()
    if d == 1:
        l_cov = C.new_zeros(())
    else:
        off = ~torch.eye(d, dtype=torch.bool, device=C.device)
        l_cov = _phi(C[off], delta).sum() / (d * (d - 1))
    return l_var, l_cov


def gradient_matrix(C: torch.Tensor, n, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
    """G of SPEC section 2 from the covariance C (d x d), and the terms tensor([l_var, l_cov]).

    ``n`` is an int, or a 0-dim tensor (the cross-rank mode's global count: no host sync)."""
    alpha, beta, eps, gamma, delta = params.values()
    d = C.shape[0]
    diag = torch.diagonal(C)
    s = torch.sqrt(diag + eps)
    active = s < gamma
    g_diag = torch.where(active, -alpha / (d * (n - 1)) / s, torch.zeros_like(s))
    l_var = torch.relu(gamma - s).mean()
    if d == 1:
        return torch.diag(g_diag), torch.stack([l_var, C.new_zeros(())])
    clipped = C if delta is None else C.clamp(-delta, delta)
    G = clipped * (4 * beta / (d * (d - 1) * (n - 1)))
    G.diagonal().copy_(g_diag)
    off_phi = _phi(C, delta)
    l_cov = (off_phi.sum() - torch.diagonal(off_phi).sum()) / (d * (d - 1))
    return G, torch.stack([l_var, l_cov])


def _rows(x3: torch.Tensor) -> torch.Tensor:
    """X (n x d) in the accumulate dtype from a (B, d, L) tensor."""
    return x3.to(accumulate_dtype(x3.dtype)).permute(0, 2, 1).reshape(-1, x3.shape[1])


def vcreg_stats_reference(x3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu, M2): the column means (d) and centred Gram M2 = Xc^T Xc (d x d) of x3: (B, d, L)."""
    check_canonical(x3)
    X = _rows(x3)
    mu = X.mean(0)
    Xc = X - mu
    return mu, Xc.T @ Xc


def vcreg_apply_reference(
    gy3: torch.Tensor, x3: torch.Tensor, G: torch.Tensor, mu: torch.Tensor
) -> torch.Tensor:
    """grad_y + (X - mu) @ G on canonical (B, d, L) tensors, in grad_y's dtype."""
    check_canonical(x3, gy3, min_samples=0)
    check_apply_operands(x3, G, mu)
    B, d, L = x3.shape
    dX = ((_rows(x3) - mu) @ G).view(B, L, d).permute(0, 2, 1)
    out = torch.empty_like(x3, dtype=gy3.dtype)
    return out.copy_(gy3.to(dX.dtype) + dX)


def backward_of_halves(stats, apply, gy3: torch.Tensor, x3: torch.Tensor, params: Params):
    """(grad_y + Xc @ G, tensor([l_var, l_cov])): a backend's two halves with G between them."""
    check_canonical(x3, gy3, min_samples=2)
    n = x3.shape[0] * x3.shape[2]
    mu, m2 = stats(x3)
    G, terms = gradient_matrix(m2 / (n - 1), n, params)
    return apply(gy3, x3, G, mu), terms


def vcreg_backward_reference(gy3: torch.Tensor, x3: torch.Tensor, params: Params):
    """grad_x = grad_y + Xc @ G and tensor([l_var, l_cov]) on canonical (B, d, L) tensors:
    two-pass demean in the accumulate dtype, so large means cost no accuracy."""
    return backward_of_halves(vcreg_stats_reference, vcreg_apply_reference, gy3, x3, params)
