"""The math of SPEC section 2 in plain PyTorch: the loss, and the ``reference`` backend.

X (n x d) is the activation flattened along the feature dimension ``dim``; then

    mu = mean of the rows of X,  Xc = X - mu,  C = Xc^T Xc / (n - 1),  s_j = sqrt(C_jj + eps)
    l_var = (1/d) sum_j relu(gamma - s_j)
    l_cov = 1/(d(d-1)) sum_{i != j} phi(C_ij),  phi = square, or smooth L1 with threshold delta
    loss  = alpha * l_var + beta * l_cov

and the backward adds d(loss)/dX = Xc @ G with
    G_jj = -alpha / (d (n-1)) * [s_j < gamma] / s_j
    G_ij =  4 beta / (d (d-1) (n-1)) * clip(C_ij, -delta, delta)   (i != j)
"""
from __future__ import annotations

from typing import Optional

import torch

from ._checks import check_args


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
    dim = check_args(x, alpha, beta, eps, gamma, delta, dim)
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


def gradient_matrix(
    C: torch.Tensor, n: int, alpha: float, beta: float, eps: float, gamma: float, delta: Optional[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """G of SPEC section 2 from the covariance C (d x d), and the terms (l_var, l_cov)."""
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
    """X (n x d) in the accumulate dtype from a (B, d, L) view."""
    return x3.to(accumulate_dtype(x3.dtype)).permute(0, 2, 1).reshape(-1, x3.shape[1])


def vcreg_stats_reference(x3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu, M2): the column means (d) and centred sums M2 = Xc^T Xc (d x d) of x3: (B, d, L)."""
    X = _rows(x3)
    mu = X.mean(0)
    Xc = X - mu
    return mu, Xc.T @ Xc


def vcreg_apply_reference(
    gy3: torch.Tensor, x3: torch.Tensor, G: torch.Tensor, mu: torch.Tensor
) -> torch.Tensor:
    """grad_y + (X - mu) @ G on (B, d, L) views, in x3's strides and grad_y's dtype."""
    B, d, L = x3.shape
    dX = ((_rows(x3) - mu) @ G).view(B, L, d).permute(0, 2, 1)
    out = torch.empty_strided(x3.shape, x3.stride(), dtype=gy3.dtype, device=x3.device)
    return out.copy_(gy3.to(dX.dtype) + dX)


def vcreg_backward_reference(
    gy3: torch.Tensor,
    x3: torch.Tensor,
    alpha: float,
    beta: float,
    eps: float,
    gamma: float,
    delta: Optional[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """grad_x = grad_y + Xc @ G on canonical views ``x3``, ``gy3``: (B, d, L).

    Returns (grad_x3 with x3's strides and grad_y's dtype, tensor([l_var, l_cov])).
    Two-pass demean in the accumulate dtype, so large means cost no accuracy.
    """
    n = x3.shape[0] * x3.shape[2]
    mu, m2 = vcreg_stats_reference(x3)
    G, terms = gradient_matrix(m2 / (n - 1), n, alpha, beta, eps, gamma, delta)
    return vcreg_apply_reference(gy3, x3, G, mu), terms
