"""The VICReg loss on the VCReg kernels (SPEC section 9): ``vicreg_loss``, ``VICRegLoss``, ``vicreg_terms``.

z_a, z_b: (..., d), every leading dimension a sample dimension; za3, zb3 their canonical (B, d, L)
tensors (``_layout``, both in z_a's layout), Z_a, Z_b (n x d) their rows. Per branch mu, M2 = Xc^T Xc
(the backend's statistics) and G of SPEC section 2 at alpha = std_coeff / 2, beta = cov_coeff (d - 1);
then, with the formula of ``reference.vicreg_terms_of``,

    forward:   loss = sim_coeff inv + std_coeff var + cov_coeff cov,  terms = [inv, var, cov]
    backward:  grad_z_a = g (c (Z_a - Z_b) + (Z_a - mu_a) @ G_a),  c = 2 sim_coeff / (n d)
               grad_z_b = g (c (Z_b - Z_a) + (Z_b - mu_b) @ G_b),  g the loss's incoming gradient

The forward computes the value (users log and step on it) and forms G over M2 in place
(``reference.gradient_matrix_``); G_a, G_b are kept for the backward. d x d memory: those two,
nothing else.

Ops, custom ops with fake implementations, so that torch.compile(fullgraph=True) traces through
``_VICRegFunction`` without a graph break:

* ``vcreg::vicreg_forward(z_a, z_b, sim_coeff, std_coeff, cov_coeff, eps, gamma, group)
  -> (loss, terms, G_a, G_b, mu_a, mu_b, c)``, all in the accumulate dtype (loss, c: 0-dim);
* ``vcreg::vicreg_backward(g, z_a, z_b, G_a, G_b, mu_a, mu_b, c) -> (grad_z_a, grad_z_b)``, in z's dtype.

What each backend runs: its record's ``run_pair_stats`` and ``run_pair_apply`` (``dispatch.Backend``):
its own pair kernels (cpu, cuda, triton: the statistics and the invariance sum with no n x d
temporary, one pass writing both gradients with g and c read on the device; reference: the formula
in torch ops). ``reference.pair_stats_of_halves`` and ``pair_apply_of_halves`` compose a backend's
halves where it has none.

Cross-rank mode (``group``, a ``distributed.group_key``): n, n mu and the invariance sum of each
rank (one all-reduce, float64), then each branch's M2 about the global mean (``distributed.
merge_statistics``): the loss and G are the group's batch's, the embeddings never leave their rank.
Each rank's rows get W = the group's size times the gradient of the group's loss (G and c scaled by
W), so that DDP's average of parameter gradients is one process's on the concatenated batch
(``distributed``'s docstring). A rank's batch may be empty or one sample (reference kernels there).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from . import _layout, dispatch
from ._params import Params, check_vicreg_args
from .distributed import group_key, merge_statistics, process_group
from .reference import (accumulate_dtype, gradient_matrix_, vicreg_pair_apply_reference,
                        vicreg_pair_stats_reference)

# ---------------------------------------------------------------------------------------------
# The ops.


def _canonical(z_a: torch.Tensor, z_b: torch.Tensor) -> tuple[_layout.Layout, torch.Tensor, torch.Tensor]:
    """The layout of z_a along its last dimension, and both branches canonical in it."""
    layout = _layout.choose(z_a, z_a.dim() - 1)
    return layout, _layout.canonical(z_a, layout), _layout.canonical(z_b, layout)


def _too_few(z_a: torch.Tensor, world: int) -> Callable[[int], str]:
    n_local = z_a.numel() // z_a.shape[-1]
    return lambda n: (f"vicreg_loss: needs at least 2 samples over the process group, got n = {n} in all "
                      f"(this rank's z_a: shape {tuple(z_a.shape)}, n = {n_local}, on {world} ranks)")


def _forward(z_a, z_b, sim_coeff, std_coeff, cov_coeff, eps, gamma, group):
    check_vicreg_args(z_a, z_b, sim_coeff, std_coeff, cov_coeff, eps, gamma, min_samples=2 if group is None else 0)
    _, za3, zb3 = _canonical(z_a, z_b)
    B, d, L = za3.shape
    n_local = B * L
    acc = accumulate_dtype(z_a.dtype)
    if n_local >= 2:
        record = dispatch.backend(dispatch.resolve_backend(z_a))
        mu_a, m2_a, mu_b, m2_b, inv_sum = record.run_pair_stats(za3, zb3)
    elif n_local == 1:  # the cross-rank mode only: one row, nothing for a backend to speed up
        mu_a, m2_a, mu_b, m2_b, inv_sum = vicreg_pair_stats_reference(za3, zb3)
    else:
        mu_a, mu_b = (za3.new_zeros(d, dtype=acc) for _ in range(2))
        m2_a, m2_b = (za3.new_zeros(d, d, dtype=acc) for _ in range(2))
        inv_sum = za3.new_zeros((), dtype=acc)
    world = 1
    n = n_local
    if group is not None:
        pg, world = process_group(group)
        n64, [(mu_a, m2_a), (mu_b, m2_b)], inv64 = merge_statistics(
            pg, n_local, [(mu_a, m2_a), (mu_b, m2_b)], _too_few(z_a, world), extra=inv_sum)
        n, inv_sum = n64.to(acc), inv64[0].to(acc)  # 0-dim device tensors: no host sync
    # W scales the gradient (G and c), never the value or the terms.
    params = Params(world * std_coeff / 2, world * cov_coeff * (d - 1), eps, gamma)
    G_a, var_a, cov_a = gradient_matrix_(m2_a, n, params)
    G_b, var_b, cov_b = gradient_matrix_(m2_b, n, params)
    inv = inv_sum / (n * d)
    var = (var_a + var_b) / 2
    cov = (cov_a + cov_b) * (d - 1)
    loss = sim_coeff * inv + std_coeff * var + cov_coeff * cov
    c = inv.new_full((), 2 * sim_coeff * world / d) / n  # a fill, not a host-to-device copy
    return loss, torch.stack([inv, var, cov]), G_a, G_b, mu_a, mu_b, c


@torch.library.custom_op("vcreg::vicreg_forward", mutates_args=())
def vicreg_forward(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    sim_coeff: float,
    std_coeff: float,
    cov_coeff: float,
    eps: float,
    gamma: float,
    group: Optional[str],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, terms, G_a, G_b, mu_a, mu_b, c): see the module docstring."""
    # Under autocast the reference's matmuls would run in bf16/fp16: the statistics accumulate in
    # float32 (SPEC section 2's precision policy is the backends' own).
    with torch.autocast(z_a.device.type, enabled=False):
        return _forward(z_a, z_b, sim_coeff, std_coeff, cov_coeff, eps, gamma, group)


@vicreg_forward.register_fake
def _vicreg_forward_fake(z_a, z_b, sim_coeff, std_coeff, cov_coeff, eps, gamma, group):
    acc = accumulate_dtype(z_a.dtype)
    d = z_a.shape[-1]
    scalar = z_a.new_empty((), dtype=acc)
    return (scalar, z_a.new_empty(3, dtype=acc), z_a.new_empty(d, d, dtype=acc), z_a.new_empty(d, d, dtype=acc),
            z_a.new_empty(d, dtype=acc), z_a.new_empty(d, dtype=acc), torch.empty_like(scalar))


def _restore(g3: torch.Tensor, layout: _layout.Layout, z: torch.Tensor) -> torch.Tensor:
    """``_layout.restore``, and z_b's own strides where they differ from z_a's (the layout's)."""
    grad = _layout.restore(g3, layout, z)
    like = torch.empty_like(z, device="meta")  # the fake implementation's promise; allocates nothing
    return grad if grad.stride() == like.stride() else torch.empty_like(z).copy_(grad)


@torch.library.custom_op("vcreg::vicreg_backward", mutates_args=())
def vicreg_backward(
    g: torch.Tensor,
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    G_a: torch.Tensor,
    G_b: torch.Tensor,
    mu_a: torch.Tensor,
    mu_b: torch.Tensor,
    c: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_z_a, grad_z_b) for the loss's incoming gradient g: see the module docstring."""
    n_local = z_a.numel() // z_a.shape[-1]
    if n_local == 0:  # a rank with an empty batch in the cross-rank mode
        return torch.empty_like(z_a), torch.empty_like(z_b)
    with torch.autocast(z_a.device.type, enabled=False):
        layout, za3, zb3 = _canonical(z_a, z_b)
        apply = (dispatch.backend(dispatch.resolve_backend(z_a)).run_pair_apply if n_local >= 2
                 else vicreg_pair_apply_reference)
        ga3, gb3 = apply(g.to(G_a.dtype), za3, zb3, G_a, mu_a, G_b, mu_b, c)
        return _restore(ga3, layout, z_a), _restore(gb3, layout, z_b)


@vicreg_backward.register_fake
def _vicreg_backward_fake(g, z_a, z_b, G_a, G_b, mu_a, mu_b, c):
    return torch.empty_like(z_a), torch.empty_like(z_b)


class _VICRegFunction(torch.autograd.Function):
    """loss = vicreg_forward(...); its backward is vicreg_backward. The other outputs are not
    differentiable: terms for logging, and what the backward needs (setup_context saves only
    inputs and outputs)."""

    @staticmethod
    def forward(z_a, z_b, sim_coeff, std_coeff, cov_coeff, eps, gamma, group):
        return torch.ops.vcreg.vicreg_forward(z_a, z_b, sim_coeff, std_coeff, cov_coeff, eps, gamma, group)

    @staticmethod
    def setup_context(ctx, inputs, output):
        z_a, z_b = inputs[:2]
        _loss, terms, G_a, G_b, mu_a, mu_b, c = output
        ctx.save_for_backward(z_a, z_b, G_a, G_b, mu_a, mu_b, c)
        ctx.mark_non_differentiable(terms, G_a, G_b, mu_a, mu_b, c)
        # No zero "gradients" of the non-differentiable outputs: two of them are d x d.
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, g, *_unused):
        if g is None:  # the loss's gradient undefined (materialize_grads is off): so are z's
            return (None,) * 8
        z_a, z_b, G_a, G_b, mu_a, mu_b, c = ctx.saved_tensors
        grad_a, grad_b = torch.ops.vcreg.vicreg_backward(g, z_a, z_b, G_a, G_b, mu_a, mu_b, c)
        return (grad_a, grad_b) + (None,) * 6


def vicreg_function(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    sim_coeff: float,
    std_coeff: float,
    cov_coeff: float,
    eps: float,
    gamma: float,
    group: Optional[str],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, terms): what ``vicreg_loss`` and ``VICRegLoss`` call; ``group`` a ``distributed.group_key`` or None."""
    check_vicreg_args(z_a, z_b, sim_coeff, std_coeff, cov_coeff, eps, gamma, min_samples=2 if group is None else 0)
    loss, terms, *_ = _VICRegFunction.apply(z_a, z_b, float(sim_coeff), float(std_coeff), float(cov_coeff),
                                            float(eps), float(gamma), group)
    return loss, terms


# ---------------------------------------------------------------------------------------------
# The public API.


def vicreg_loss(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    sim_coeff: float = 25.0,
    std_coeff: float = 25.0,
    cov_coeff: float = 1.0,
    eps: float = 1e-4,
    gamma: float = 1.0,
    sync: bool = False,
    process_group=None,
) -> torch.Tensor:
    """The VICReg loss of two branches' embeddings z_a, z_b: (..., d) (SPEC section 9), a 0-dim tensor.

    As facebookresearch/vicreg defines it (its defaults 25, 25, 1), computed from each branch's
    statistics: the covariances are never formed apart from the d x d matrix each branch keeps for
    the backward. Float32 statistics for 16-bit input (the loss is float32 then); gradients in z's dtype.

    ``sync=True``: the loss and gradients of the whole batch over ``process_group`` (None: the
    default group), for DDP (which averages gradients): the parameter gradients are then those of
    one process on the concatenated batch. Each rank's batch may be empty as long as the group's
    holds 2 samples. Without an initialised process group it is the local batch's.
    """
    group = group_key(process_group) if sync else None
    return vicreg_function(z_a, z_b, sim_coeff, std_coeff, cov_coeff, eps, gamma, group)[0]


def vicreg_terms(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    eps: float = 1e-4,
    gamma: float = 1.0,
    sync: bool = False,
    process_group=None,
) -> torch.Tensor:
    """tensor([inv, var, cov]) of z_a, z_b, unweighted, on their device, without a graph: e.g. on
    held-out data. (During training ``VICRegLoss.terms`` holds them at no extra cost.)"""
    group = group_key(process_group) if sync else None
    check_vicreg_args(z_a, z_b, 1.0, 1.0, 1.0, eps, gamma, min_samples=2 if group is None else 0)
    return torch.ops.vcreg.vicreg_forward(z_a.detach(), z_b.detach(), 1.0, 1.0, 1.0, float(eps), float(gamma),
                                          group)[1]


class VICRegLoss(nn.Module):
    """``VICRegLoss(sim_coeff, std_coeff, cov_coeff)(z_a, z_b)``: ``vicreg_loss`` as a module.

    ``terms`` (a non-persistent float32 buffer): tensor([inv, var, cov]), unweighted, of the last
    call, on the embeddings' device (NaN before the first), written by the forward from what it
    computes anyway: no extra pass, no host sync. Multiply by the coefficients for each term's
    share of the loss.
    """

    def __init__(
        self,
        sim_coeff: float = 25.0,
        std_coeff: float = 25.0,
        cov_coeff: float = 1.0,
        eps: float = 1e-4,
        gamma: float = 1.0,
        sync: bool = False,
        process_group=None,
    ) -> None:
        super().__init__()
        self.sim_coeff, self.std_coeff, self.cov_coeff, self.eps, self.gamma = (
            sim_coeff, std_coeff, cov_coeff, eps, gamma)
        self.sync, self.process_group = sync, process_group
        self._group = group_key(process_group) if sync else None  # a string, for the op's schema
        self.register_buffer("terms", torch.full((3,), float("nan")), persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.terms.dtype != torch.float32:  # model.half() / .to(bfloat16): the logged terms stay float32
            self.terms = self.terms.float()
        return self

    def forward(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        loss, terms = vicreg_function(z_a, z_b, self.sim_coeff, self.std_coeff, self.cov_coeff, self.eps,
                                      self.gamma, self._group)
        with torch.no_grad():
            if self.terms.device != terms.device:
                # A loss module not moved with the model follows the embeddings once, rather than
                # copying its terms to the host (a sync) at every call.
                self.terms = torch.empty(3, device=terms.device)
            self.terms.copy_(terms)
        return loss

    def extra_repr(self) -> str:
        sync = f", sync=True, process_group={self.process_group}" if self.sync else ""
        return (f"sim_coeff={self.sim_coeff}, std_coeff={self.std_coeff}, cov_coeff={self.cov_coeff}, "
                f"eps={self.eps}, gamma={self.gamma}{sync}")
