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


def gradient_matrix_(
    M2: torch.Tensor, n, alpha: float, beta: float, eps: float, gamma: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """G of SPEC section 2 (delta None) written over M2 = Xc^T Xc (d x d), and (l_var, l_cov).

    The same G and terms as ``gradient_matrix(M2 / (n - 1), n, ...)``, with no other d x d tensor:
    C is never formed (every entry of G is M2's times a scalar), and l_cov is the Frobenius norm of
    M2 with its diagonal zeroed (no cancellation against the variances). ``n`` may be a 0-dim
    tensor (no host sync). Returns (G, which is M2, l_var, l_cov).
    """
    d = M2.shape[0]
    nm1 = n - 1
    s = torch.sqrt(torch.diagonal(M2) / nm1 + eps)
    g_diag = torch.where(s < gamma, -alpha / (d * nm1) / s, torch.zeros_like(s))
    l_var = torch.relu(gamma - s).mean()
    if d == 1:
        M2.diagonal().copy_(g_diag)
        return M2, l_var, M2.new_zeros(())
    M2.diagonal().zero_()
    l_cov = torch.linalg.vector_norm(M2).square() / (nm1 * nm1 * (d * (d - 1)))
    M2.mul_(4 * beta / (d * (d - 1) * nm1 * nm1))
    M2.diagonal().copy_(g_diag)
    return M2, l_var, l_cov


# ---------------------------------------------------------------------------------------------
# The VICReg loss (SPEC section 9) on two branches z_a, z_b: (..., d), every leading dimension a
# sample dimension; Z_a, Z_b (n x d) their rows, C^a, C^b the unbiased covariances, s = sqrt(C_jj + eps):
#
#   inv  = sum (Z_a - Z_b)^2 / (n d)
#   var  = (1/2) [(1/d) sum_j relu(gamma - s^a_j) + (1/d) sum_j relu(gamma - s^b_j)]
#   cov  = (1/d) sum_{i != j} (C^a_ij)^2 + (1/d) sum_{i != j} (C^b_ij)^2
#   loss = sim_coeff inv + std_coeff var + cov_coeff cov
#
# In section 2's terms: var = (l_var^a + l_var^b) / 2, cov = (d - 1)(l_cov^a + l_cov^b), so each
# branch's gradient is c (Z_a - Z_b) (resp. c (Z_b - Z_a)), c = 2 sim_coeff / (n d), plus
# Xc @ G with G at alpha = std_coeff / 2, beta = cov_coeff (d - 1).


def vicreg_terms_of(z_a: torch.Tensor, z_b: torch.Tensor, eps: float = 1e-4, gamma: float = 1.0) -> torch.Tensor:
    """tensor([inv, var, cov]) of SPEC section 9, differentiable, in the accumulate dtype."""
    acc = accumulate_dtype(z_a.dtype)
    d = z_a.shape[-1]
    Za, Zb = z_a.reshape(-1, d).to(acc), z_b.reshape(-1, d).to(acc)
    inv = (Za - Zb).square().mean()
    var, cov = [], []
    for Z in (Za, Zb):
        l_var, l_cov = vcreg_terms_of(Z, eps, gamma, None, 1)
        var.append(l_var)
        cov.append(l_cov * (d - 1))
    return torch.stack([inv, (var[0] + var[1]) / 2, cov[0] + cov[1]])


def vicreg_loss_reference(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    sim_coeff: float = 25.0,
    std_coeff: float = 25.0,
    cov_coeff: float = 1.0,
    eps: float = 1e-4,
    gamma: float = 1.0,
) -> torch.Tensor:
    """The VICReg loss of SPEC section 9 as plain differentiable PyTorch (what the fused loss is checked against)."""
    inv, var, cov = vicreg_terms_of(z_a, z_b, eps, gamma)
    return sim_coeff * inv + std_coeff * var + cov_coeff * cov


def vicreg_pair_stats_reference(
    za3: torch.Tensor, zb3: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pair statistics: (mu_a, M2_a, mu_b, M2_b, sum (Z_a - Z_b)^2) of two (B, d, L) views in
    the same layout, in the accumulate dtype (what a fused kernel computes in one pass over both)."""
    Za, Zb = _rows(za3), _rows(zb3)
    mu_a, M2_a = vcreg_stats_reference(za3)
    mu_b, M2_b = vcreg_stats_reference(zb3)
    return mu_a, M2_a, mu_b, M2_b, (Za - Zb).square().sum()


def vicreg_pair_apply_reference(
    g: torch.Tensor,
    za3: torch.Tensor,
    zb3: torch.Tensor,
    G_a: torch.Tensor,
    mu_a: torch.Tensor,
    G_b: torch.Tensor,
    mu_b: torch.Tensor,
    c: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both gradients of the pair (what a fused kernel writes in one pass over z_a and z_b):

        grad_a = g (c (Z_a - Z_b) + (Z_a - mu_a) @ G_a),   grad_b = g (c (Z_b - Z_a) + (Z_b - mu_b) @ G_b)

    g, c: 0-dim tensors; computed in the accumulate dtype, returned in za3's strides and dtype.
    """
    B, d, L = za3.shape
    Za, Zb = _rows(za3), _rows(zb3)
    inv = (Za - Zb).mul_(c)
    out = []
    for Z, G, mu, sign in ((Za, G_a, mu_a, 1), (Zb, G_b, mu_b, -1)):
        grad = ((Z - mu) @ G).add_(inv, alpha=sign).mul_(g).view(B, L, d).transpose(1, 2)
        if grad.dtype != za3.dtype or (L > 1 and grad.stride() != za3.stride()):
            grad = torch.empty_strided(za3.shape, za3.stride(), dtype=za3.dtype, device=za3.device).copy_(grad)
        out.append(grad)
    return out[0], out[1]
