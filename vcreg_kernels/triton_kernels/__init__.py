"""The ``triton`` backend: VCReg's backward as a SYRK and a GEMM on the matrix units (SPEC sections 2, 4).

x: (B, d, L) canonical tensor (see ``_layout``), n = B*L samples, X (n x d) its rows. What the
passes compute, in the SPEC's notation (G and the terms by ``reference.gradient_matrix``'s formulas)::

    mu = mean of the rows of X,  M2 = Xc^T Xc,  C = M2 / (n - 1),  G (d x d, symmetric) and
    terms = [l_var, l_cov] from C,  grad_x = grad_y + Xc @ G

Passes (``launch``; no host synchronisation, no atomics: every reduction has a fixed order, so
results are bitwise repeatable at a fixed configuration, and CUDA graphs capture the whole
backward):

1. stats: M2 as a split-K SYRK, sum_s (x_s - K)(x_s - K)^T over 128 x 128 feature tiles of the
   upper triangle, 64 samples per step, in a stream-K schedule (every program the same number of
   steps, so the grid fills whole waves); each segment shifts by K, the column means of its first
   tile, subtracted in registers before any cast to a narrower operand type.
2. finalize: the segments merged per block with exact centring (mu, then M2 or G, terms' partials).
3. terms: the terms, and G as the apply's operand (transposed, in the operand type, float16 scaled
   by a power of two; for 16-bit X also v = mu^T G from the same rounded G).
4. apply: grad_x = grad_y + X @ G - 1 v^T (16-bit X, exact in its type: the operands stream from
   memory as stored) or grad_y + (X - mu) @ G (float32 X: centred in registers before the cast).

The VICReg loss's pair kernels (``vicreg_pair_stats_triton``, ``vicreg_pair_apply_triton``; the
math: ``reference.vicreg_pair_stats_reference`` / ``vicreg_pair_apply_reference``): each branch's
stats and finalize, the invariance sum sum (Z_a - Z_b)^2 as fixed partial sums added in order, and
one apply launch over both branches writing grad_a = g (c (Z_a - Z_b) + (Z_a - mu_a) @ G_a) and
grad_b = g (c (Z_b - Z_a) + (Z_b - mu_b) @ G_b), the invariance part formed in its epilogue.

Precision: ``precision.precision_mode`` (SPEC section 2's table, read from torch's float32 matmul
setting when the backward runs). Configurations: ``configs`` (a heuristic, and the autotuner's
lists). Kernels: ``kernels``. Ahead-of-time compile cases for the static checks: ``aot``.
"""
from .aot import AOT_TARGETS, aot_cases, aot_cases_for
from .launch import (AOTCase, vcreg_apply_triton, vcreg_backward_triton, vcreg_stats_triton, vicreg_pair_apply_triton,
                     vicreg_pair_stats_triton)
from .precision import float32_matmul_setting, precision_mode

__all__ = [
    "AOTCase", "AOT_TARGETS", "aot_cases", "aot_cases_for", "float32_matmul_setting", "precision_mode",
    "vcreg_apply_triton", "vcreg_backward_triton", "vcreg_stats_triton", "vicreg_pair_apply_triton",
    "vicreg_pair_stats_triton",
]
