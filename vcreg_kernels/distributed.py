"""The cross-rank mode (SPEC sections 8 and 9): statistics of the batch of a whole process group.

Like SyncBatchNorm, but only in the backward, and the rows never leave their rank. On canonical
tensors ``x3``, ``gy3``: (B, d, L) of this rank's n_r rows (n_r may be 0 or 1), with a backend's
halves (``dispatch.Backend``)::

    each rank:    (mu_r, M2_r) = stats(x3)                          the backend's first half
    all-reduce 1: [n_r, n_r mu_r]  (float64, d + 1 numbers)         -> n = sum n_r, mu = sum n_r mu_r / n
    all-reduce 2: M2_r + n_r (mu_r - mu)(mu_r - mu)^T  (d x d)      -> M2 = Xc^T Xc of the whole batch
    each rank:    C = M2 / (n - 1),  G = gradient_matrix(C, n),  grad_x3 = gy3 + W (X_r - mu) @ G

The merge is exact, and accurate at any mean: all-reduce 2 sums the ranks' X^T X about a shift
identical on every rank, the global mean itself (K-way Chan merge), so every term is positive
semi-definite and nothing cancels. Summing raw column sums and X^T X (one round) loses C to
cancellation when |mu| is 100x the spread (SPEC section 2); a shift shared by every rank must be
agreed on first, and all-reduce 1 is that round: for d + 1 numbers it gives the best shift there
is, the global mean. It is float64 so that n stays exact past 2^24 samples (a ResNet stage-1 output
at 128 images a rank on 64 ranks has 25.7M) and the mean loses nothing to the sum. What is left
is the apply half's mu in the accumulate dtype: its rounding, half an ulp of |mu|, shifts every
row's Xc by the same amount, a relative error of about 2^-24 |mu| / std in float32 (5e-6 at a
mean 100x the spread, 5e-5 at 1000x; a naive float32 merge of raw sums is off by 1e-3 at 100x).

Scaling for DDP: each rank's rows get W times the gradient of the whole group's regulariser,
W = the group's size (G scaled by W). DDP averages parameter gradients over ranks; the
regulariser's gradient with respect to the parameters is the *sum* over ranks of each rank's
rows' share, so the average of W times each share is exactly the single-process gradient on the
concatenated batch. Supervised losses keep DDP's usual meaning (the average of the ranks' losses;
with unequal local batches, scale each rank's summed loss by W / n_global for the global mean).
When the group is smaller than DDP's (sync within groups of ranks), the objective is the mean
over groups of each group's regulariser, as the unsynchronised mode's is the mean over ranks of
each rank's.

Too few samples: a rank's own batch may hold 0 or 1 rows; the global n must reach 2. Every rank
reads n on the host only if its own n_r < 2 (any rank with n_r >= 2 knows n >= 2 without a
device sync), so the check gives the same answer on every rank: if n < 2 every n_r is < 2 and
every rank raises the same ValueError after the same collective, and none waits on another.
Ranks with n_r < 2 use the reference halves (a row or none: nothing to speed up, and no
backend need handle such shapes).

Without an initialised process group, or with a group of one rank, it runs on the local batch
with no collective, like SyncBatchNorm.

The merge itself, ``merge_statistics``, takes several blocks of statistics of the same rows and
extra numbers to sum in the first round: the VICReg loss (``vicreg.py``) merges its two branches
and its invariance sum with it, in its forward.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
import torch.distributed as dist

from ._params import Params
from .reference import accumulate_dtype, gradient_matrix, vcreg_apply_reference, vcreg_stats_reference

WORLD = "world"  # the key of the default group, resolved when the backward runs
_GROUPS: dict[str, "dist.ProcessGroup"] = {}


def group_key(process_group: Optional["dist.ProcessGroup"]) -> str:
    """A string naming ``process_group`` (None: the default group) that ops can carry in their schema."""
    if process_group is None:
        return WORLD
    key = f"pg:{process_group.group_name}"
    _GROUPS[key] = process_group
    return key


def _resolve(key: str) -> Optional["dist.ProcessGroup"]:
    """The group of ``key``, or None when no process group is initialised here."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return dist.group.WORLD if key == WORLD else _GROUPS[key]


def process_group(key: str) -> tuple[Optional["dist.ProcessGroup"], int]:
    """(the group of ``key``, or None where no collective is needed, and the group's size W)."""
    pg = _resolve(key)
    world = 1 if pg is None else dist.get_world_size(pg)
    return (None if world == 1 else pg), world


def merge_statistics(
    pg: Optional["dist.ProcessGroup"],
    n_local: int,
    blocks: list[tuple[torch.Tensor, torch.Tensor]],
    too_few: Callable[[int], str],
    extra: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]], Optional[torch.Tensor]]:
    """The two all-reduces of the module docstring, for one or more blocks of statistics of this rank's rows.

    ``blocks``: [(mu_r, M2_r)] of the same n_local rows (one per feature block: a layer has one,
    the VICReg loss one per branch), in the accumulate dtype; each M2_r is overwritten in place with
    the whole group's M2 (no other d x d tensor). ``extra``: numbers summed over the group in the
    first round (float64). ``pg`` None: this rank's batch alone, no collective. Raises ValueError
    with ``too_few(n)`` when the group holds fewer than 2 rows, on every rank alike (module docstring).

    Returns (n: 0-dim float64 device tensor, [(mu, M2)] of the group's batch, the summed extra).
    """
    mu0 = blocks[0][0]
    parts = [mu0.new_full((1,), n_local, dtype=torch.float64)]
    parts += [mu_r.double() * n_local for mu_r, _ in blocks]
    if extra is not None:
        parts.append(extra.double().reshape(-1))
    head = torch.cat(parts)
    if pg is not None:
        dist.all_reduce(head, group=pg)
    if n_local < 2:  # only here may the group's n be < 2: read it (a host sync) and check
        n_global = int(head[0].item())
        if n_global < 2:
            raise ValueError(too_few(n_global))
    n = head[0]
    merged = []
    offset = 1
    for mu_r, m2_r in blocks:
        d = mu_r.numel()
        mu = (head[offset:offset + d] / n).to(mu_r.dtype)
        offset += d
        dev = mu_r - mu
        m2_r.addr_(dev, dev, alpha=n_local)  # about the global mean: every rank's share is PSD
        merged.append((mu, m2_r))
    if pg is not None:
        works = [dist.all_reduce(m2, group=pg, async_op=True) for _, m2 in merged]
        for w in works:
            w.wait()
    return n, merged, (head[offset:] if extra is not None else None)


def vcreg_backward_sync(
    gy3: torch.Tensor,
    x3: torch.Tensor,
    params: Params,
    *,
    group: str,
    stats: Callable,
    apply: Callable,
    paper: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x3, tensor([l_var, l_cov])) with the statistics of the group's whole batch; see the module docstring.

    ``stats`` and ``apply`` are the backend's halves (``dispatch``); ``group`` a ``group_key``;
    ``paper``: the covariance coefficient is beta * (n - 1), n the group's sample count.
    """
    pg, world = process_group(group)
    B, d, L = x3.shape
    n_local = B * L
    tiny = n_local < 2
    acc = accumulate_dtype(x3.dtype)
    if n_local == 0:
        mu_r = torch.zeros(d, dtype=acc, device=x3.device)
        m2_r = torch.zeros(d, d, dtype=acc, device=x3.device)
    else:
        mu_r, m2_r = (vcreg_stats_reference if tiny else stats)(x3)

    def too_few(n_global: int) -> str:
        return (f"vcreg: needs at least 2 samples over the process group, got n = {n_global} in all "
                f"(this rank's x: shape {tuple(x3.shape)} as (B, d, L), n = {n_local}, on {world} ranks)")

    n, [(mu, m2)], _ = merge_statistics(pg, n_local, [(mu_r, m2_r)], too_few)
    n_acc = n.to(acc)  # a 0-dim device tensor: gradient_matrix takes it like an int, no host sync
    if paper:  # beta becomes a 0-dim device tensor too: known only after the merge
        params = dataclasses.replace(params, beta=params.beta * (n_acc - 1))
    G, terms = gradient_matrix(m2 / (n_acc - 1), n_acc, params)
    if world != 1:
        G = G * world
    return (vcreg_apply_reference if tiny else apply)(gy3, x3, G, mu), terms
