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


def gradient_matrix_(M2: torch.Tensor, n, params: Params) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """G of SPEC section 2 (delta None) written over M2 = Xc^T Xc (d x d), and (l_var, l_cov).

    The same G and terms as ``gradient_matrix(M2 / (n - 1), n, params)``, with no other d x d
    tensor: C is never formed (every entry of G is M2's times a scalar), and l_cov is the Frobenius
    norm of M2 with its diagonal zeroed (no cancellation against the variances). ``n`` may be a
    0-dim tensor (no host sync). Returns (G, which is M2, l_var, l_cov).
    """
    alpha, beta, eps, gamma, delta = params.values()
    assert delta is None, "the smooth-L1 covariance term needs C itself: gradient_matrix"
    d = M2.shape[0]
    nm1 = n - 1
    s = torch.sqrt(torch.diagonal(M2) / nm1 + eps)
    g_diag = torch.where(s < gamma, -alpha / (d * nm1) / s, torch.zeros_like(s))
    l_var = torch.relu(gamma - s).mean()
    if d == 1:
        M2.diagonal().copy_(g_diag)
        return M2, l_var, M2.new_zeros(())
    M2.diagonal().zero_()
    # Row by row, then the d rows' squares summed: torch's CPU vector_norm of all d^2 entries at
    # once accumulates them in one float32 sum (1e-2 relative error at d = 8192, against 3e-8).
    l_cov = torch.linalg.vector_norm(M2, dim=1).square().sum() / (nm1 * nm1 * (d * (d - 1)))
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
# Xc @ G with G at alpha = std_coeff / 2, beta = cov_coeff (d - 1). A backend computes it with
# its pair kernels (``dispatch.Backend``: pair_stats, pair_apply); those below are the reference
# backend's, and the composition of a backend's halves serves those without their own.


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


def _check_pair(za3: torch.Tensor, zb3: torch.Tensor, min_samples: int = 1) -> None:
    check_canonical(za3, min_samples=min_samples)
    check_canonical(zb3, min_samples=min_samples)
    if zb3.shape != za3.shape or zb3.dtype != za3.dtype:
        raise RuntimeError(f"vcreg: the branches differ: {tuple(za3.shape)} {za3.dtype}, {tuple(zb3.shape)} {zb3.dtype}")


def vicreg_pair_stats_reference(
    za3: torch.Tensor, zb3: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pair statistics: (mu_a, M2_a, mu_b, M2_b, sum (Z_a - Z_b)^2) of two canonical (B, d, L)
    tensors, in the accumulate dtype (what a fused kernel computes in one pass over both)."""
    _check_pair(za3, zb3)
    mu_a, M2_a = vcreg_stats_reference(za3)
    mu_b, M2_b = vcreg_stats_reference(zb3)
    return mu_a, M2_a, mu_b, M2_b, (_rows(za3) - _rows(zb3)).square().sum()


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

    g, c: 0-dim tensors; computed in the accumulate dtype, returned canonical in z's dtype.
    """
    _check_pair(za3, zb3, min_samples=0)
    B, d, L = za3.shape
    Za, Zb = _rows(za3), _rows(zb3)
    inv = (Za - Zb).mul_(c)
    out = []
    for Z, G, mu, sign in ((Za, G_a, mu_a, 1), (Zb, G_b, mu_b, -1)):
        grad = ((Z - mu) @ G).add_(inv, alpha=sign).mul_(g).view(B, L, d).transpose(1, 2)
        out.append(grad.to(za3.dtype) if L == 1 else torch.empty_like(za3).copy_(grad))
    return out[0], out[1]


_INVARIANCE_BLOCK_BYTES = 4 << 20  # the difference is formed this much at a time


def _invariance_sum(za3: torch.Tensor, zb3: torch.Tensor) -> torch.Tensor:
    """sum (Z_a - Z_b)^2 in the accumulate dtype, a block of samples at a time (no n x d temporary)."""
    acc = accumulate_dtype(za3.dtype)
    B = za3.shape[0]
    step = max(1, _INVARIANCE_BLOCK_BYTES // max(1, za3[0].numel() * acc.itemsize))
    total = za3.new_zeros((), dtype=acc)
    for b0 in range(0, B, step):
        total += (za3[b0:b0 + step].to(acc) - zb3[b0:b0 + step].to(acc)).square_().sum()
    return total


def pair_stats_of_halves(stats, za3: torch.Tensor, zb3: torch.Tensor):
    """``pair_stats`` of a backend without its own: its ``stats`` half on each branch (two passes
    over each, counting the invariance sum's)."""
    _check_pair(za3, zb3)
    mu_a, m2_a = stats(za3)
    mu_b, m2_b = stats(zb3)
    return mu_a, m2_a, mu_b, m2_b, _invariance_sum(za3, zb3)


def pair_apply_of_halves(apply, g, za3, zb3, G_a, mu_a, G_b, mu_b, c):
    """``pair_apply`` of a backend without its own: its ``apply`` half on each branch, with the
    invariance part as grad_y. No apply writes into its grad_y, so that part is one n x d
    temporary beyond the gradients (shared: b's is its negative)."""
    _check_pair(za3, zb3, min_samples=0)
    # g multiplies after the apply, and float16 goes through float32: the parts before the
    # multiplication by g (a GradScaler's 2^16) are ~1/(n d) and would underflow in float16.
    work = torch.float32 if za3.dtype == torch.float16 else za3.dtype
    inv = torch.sub(za3, zb3).to(work).mul_(c)
    grad_a = apply(inv, za3, G_a, mu_a)
    grad_b = apply(inv.neg_(), zb3, G_b, mu_b)
    del inv
    return grad_a.mul_(g).to(za3.dtype), grad_b.mul_(g).to(za3.dtype)
