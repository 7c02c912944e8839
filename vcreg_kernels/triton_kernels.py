"""The ``triton`` backend: VCReg's backward as three passes over memory (SPEC sections 2 and 4).

x: (B, d, L) canonical tensor (see ``_layout``), n = B*L samples, X (n x d) its rows::

    "rows": L == 1, strides (d, 1, 1)     X[r, j]        at r*d + j       (contiguous along j)
    "bdl":  strides (d*L, L, 1)           X[(b, l), j]   at b*d*L + j*L + l (contiguous along l)

Both are read in place. Every kernel works on feature-major tiles X^T[cols, samples]
(BLOCK_D x BLOCK_S): in "rows" a tile is BLOCK_S consecutive rows, in "bdl" BLOCK_S consecutive
l of one b, so the contiguous axis is the tile's axis 0 or 1 and loads coalesce in both layouts.

The math, in the SPEC's notation::

    mu  = mean of the rows of X                                   (d)
    M2  = Xc^T Xc,  Xc = X - mu,  C = M2 / (n - 1)                (d x d)
    s_j = sqrt(C_jj + eps)
    G_jj = -alpha / (d (n-1)) [s_j < gamma] / s_j                 (d x d, symmetric)
    G_ij = 4 beta / (d (d-1) (n-1)) clip(C_ij, -delta, delta)     (i != j)
    grad_x = grad_y + Xc @ G
    terms  = [l_var, l_cov] = [(1/d) sum_j relu(gamma - s_j), 1/(d(d-1)) sum_{i!=j} phi(C_ij)]

Passes (no host synchronisation, no atomics: every reduction has a fixed order, so results are
bitwise repeatable and CUDA graphs capture the whole backward):

1. ``_stats_kernel``, grid (chunks x upper-triangle block pairs): the samples are split into
   chunks of consecutive tiles; program (c, I <= J) shifts by K_c (the column means of chunk c's
   first tile, subtracted in the accumulate dtype before any cast to a dot operand) and sums
   P_c[I, J] = sum (X_I - K_c)^T (X_J - K_c) on the matrix units; diagonal programs also sum
   S_c = sum (X - K_c) and store K_c. Only block pairs I <= J are computed.
2. ``_finalize_kernel``, grid (upper-triangle blocks of BLOCK_F): merges the chunks in order
   c = 0, 1, ... with Chan's formula (per-chunk centred sums P_c - S_c S_c^T / n_c, plus
   n_a n_b / n (mean_a - mean_b)(mean_a - mean_b)^T), writes mu and either M2 or G (both
   triangles, bitwise symmetric) and per-block partial sums of the two terms;
   ``_terms_kernel`` (one program) adds those partials in order.
3. ``_apply_kernel``, grid (sample tiles x output column blocks): grad_x^T[J, s] =
   grad_y^T[J, s] + sum_K G[K, J]^T (X - mu)^T[K, s]; reads x and grad_y once (x again from L2
   per extra column block), writes grad_x once.

Precision policy (``precision()``, decided there and nowhere else; the interpreter computes in fp32/fp64):

* float32 input: tl.dot(input_precision="bf16x3") on every GPU target with matrix units
  (sm_80, sm_90, gfx90a, gfx942): each fp32 operand is split into two bfloat16 parts and three
  bf16 products are accumulated in fp32, about 2^-17 relative error per product, so the gradient
  meets the SPEC's plain float32 bound (1e-4) on NVIDIA and AMD alike. "tf32" is not used: it is
  absent on gfx90a and would need the 2e-3 bound; "ieee" on NVIDIA runs on FMA units. gfx906
  (MI50) has no matrix units, so there the dot is "ieee" (exact fp32 FMA; splitting would only
  triple the FMA work).
* float16 / bfloat16 input: loads are widened to fp32, shifted (stats) or centred (apply), and the
  dot operands are bfloat16 (bf16's exponent range holds G, whose entries ~alpha/(d n) underflow
  in float16), accumulated in fp32: relative error about 2^-9, inside the SPEC's 2e-2.
* float64 input: float64 operands and accumulator, exact IEEE products on the FMA units (a
  broadcast-and-sum product, ``_mm``: Triton 3.6 has no float64 tl.dot on NVIDIA, so no tl.dot).

Block configurations: ``CONFIGS`` (with ``ARCH_CONFIGS`` replacing it on gfx906) is the one table
the host code chooses from, by kernel, dtype and d; sizes are in threads, so a program has the same
number of threads on 32- and 64-lane targets. ``aot_cases()`` enumerates every choice the host code
can make, for tools/triton_aot_check.py, which compiles them for sm_80, sm_90, gfx906, gfx90a and
gfx942 and writes bench/results/triton_resources.md.
"""
from __future__ import annotations

import functools
import inspect
import struct
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import triton
import triton.language as tl

from ._layout import check_apply_operands, check_canonical
from ._params import Params
from .reference import accumulate_dtype

# --------------------------------------------------------------------------------------------
# Configurations: the one table.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """Compile-time block sizes of one kernel plus its launch shape. The launch shape is in
    threads, not warps: num_warps = threads / the target's warp size (32 on NVIDIA, 64 on AMD),
    so a program has as many threads, and each thread as much of a tile, on either vendor.
    Software pipelining depth: ``num_stages`` on NVIDIA; 1 on AMD, where Triton's stream
    pipeliner at 2 stages spills registers in these kernels (see the AOT report)."""

    blocks: tuple  # ((name, value), ...): the kernel's BLOCK_* constexprs
    threads: int
    num_stages: int

    def __getitem__(self, name: str) -> int:
        return dict(self.blocks)[name]

    def launch(self, target: Optional[tuple]) -> dict:
        """num_warps and num_stages for ``target`` ((backend, arch); None: the interpreter)."""
        amd = target is not None and target[0] == "hip"
        return {"num_warps": max(1, self.threads // (64 if amd else 32)), "num_stages": 1 if amd else self.num_stages}


def _cfg(threads: int, num_stages: int, **blocks: int) -> Config:
    return Config(tuple(sorted(blocks.items())), threads, num_stages)


# dtype class: "f32" (float32), "f16" (float16 and bfloat16), "f64" (float64).
# stats: BLOCK_D = the d-tile of X^T X (d <= BLOCK_D gives one block pair), BLOCK_S = samples per
#   tile (the dot's K). The largest BLOCK_D of a class serves every larger d, tiled.
# apply: BLOCK_J output columns per program (d <= BLOCK_J: one column block), BLOCK_K reduction
#   columns per step, BLOCK_S samples per tile; the largest BLOCK_J serves every larger d, tiled.
# finalize: BLOCK_F (divides every stats BLOCK_D). terms: one program.
# The small configurations (d <= 64) take BLOCK_S = 16 (stats) and BLOCK_K = 16 (float32 apply):
# with 32 there, ptxas spilled 8 to 88 bytes on sm_80/sm_90 under Triton 3.6 (the d = 1 and
# unaligned variants), and these compile without spills under 3.6 and 3.8 alike.
CONFIGS: dict = {
    "stats": {
        "f32": {32: _cfg(128, 2, BLOCK_D=32, BLOCK_S=16), 64: _cfg(128, 2, BLOCK_D=64, BLOCK_S=16),
                128: _cfg(256, 2, BLOCK_D=128, BLOCK_S=16)},
        "f16": {32: _cfg(128, 2, BLOCK_D=32, BLOCK_S=16), 64: _cfg(256, 2, BLOCK_D=64, BLOCK_S=32),
                128: _cfg(256, 2, BLOCK_D=128, BLOCK_S=32)},
        "f64": {32: _cfg(256, 1, BLOCK_D=32, BLOCK_S=8)},
    },
    "apply": {
        "f32": {32: _cfg(128, 2, BLOCK_J=32, BLOCK_K=16, BLOCK_S=64),
                64: _cfg(256, 1, BLOCK_J=64, BLOCK_K=32, BLOCK_S=64),
                128: _cfg(256, 1, BLOCK_J=128, BLOCK_K=16, BLOCK_S=64)},
        "f16": {32: _cfg(128, 2, BLOCK_J=32, BLOCK_K=32, BLOCK_S=64),
                64: _cfg(256, 1, BLOCK_J=64, BLOCK_K=32, BLOCK_S=64),
                128: _cfg(256, 1, BLOCK_J=128, BLOCK_K=16, BLOCK_S=64)},
        "f64": {32: _cfg(256, 1, BLOCK_J=32, BLOCK_K=8, BLOCK_S=32)},
    },
    "finalize": _cfg(128, 1, BLOCK_F=32),
    "terms": _cfg(128, 1, BLOCK=256),
}
# Per-architecture replacements. gfx906 (MI50) has no matrix units: tl.dot runs on FMA units
# with its operands in registers, so the tiles are small there.
ARCH_CONFIGS: dict = {
    "gfx906": {
        "stats": {c: {32: _cfg(256, 1, BLOCK_D=32, BLOCK_S=16)} for c in ("f32", "f16")},
        "apply": {c: {32: _cfg(256, 1, BLOCK_J=32, BLOCK_K=16, BLOCK_S=64)} for c in ("f32", "f16")},
    },
}

# Programs per SM that the sample-chunking of the stats pass aims for, and the fewest samples a
# chunk gets per column of d (each chunk writes a partial d x d block that the finalize re-reads).
STATS_PROGRAMS_PER_SM = 2
STATS_MIN_SAMPLES_PER_FEATURE = 2
# Programs per SM the apply pass aims for before it gives each program several sample tiles.
APPLY_PROGRAMS_PER_SM = 8

_TORCH_DTYPE_CLASS = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "f16", torch.float64: "f64"}
_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float64: tl.float64}


def _dclass(dtype: torch.dtype) -> str:
    try:
        return _TORCH_DTYPE_CLASS[dtype]
    except KeyError:
        raise TypeError(f"vcreg triton backend: unsupported dtype {dtype}") from None


def _table(kernel: str, dtype: torch.dtype, target: Optional[tuple]) -> dict:
    arch = ARCH_CONFIGS.get(str(target[1]) if target is not None else "", {})
    cls = _dclass(dtype)
    return arch.get(kernel, {}).get(cls, CONFIGS[kernel][cls])


def _by_block(table: dict, d: int) -> Config:
    """The smallest block that holds d; the largest serves every larger d (tiled)."""
    for block in sorted(table):
        if d <= block:
            return table[block]
    return table[max(table)]


def stats_config(d: int, dtype: torch.dtype, target: Optional[tuple] = None) -> Config:
    return _by_block(_table("stats", dtype, target), d)


def apply_config(d: int, dtype: torch.dtype, target: Optional[tuple] = None) -> Config:
    return _by_block(_table("apply", dtype, target), d)


# --------------------------------------------------------------------------------------------
# Precision policy (see the module docstring).
# --------------------------------------------------------------------------------------------


_NO_MATRIX_UNITS = ("gfx906",)  # AMD archs whose tl.dot lowers to FMA anyway


def precision(dtype: torch.dtype, target: Optional[tuple] = None) -> tuple:
    """(accumulate, dot operand, input_precision) for x of ``dtype`` on ``target``.

    ``target`` is (backend, arch) as in triton's GPUTarget, or None for the interpreter.
    """
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    if dtype == torch.float64:
        return acc, tl.float64, "fma"
    if target is None:  # the interpreter has no bfloat16 and ignores input_precision
        return acc, acc, "ieee"
    if dtype in (torch.float16, torch.bfloat16):
        return acc, tl.bfloat16, "ieee"
    backend, arch = target
    if backend == "hip" and str(arch) in _NO_MATRIX_UNITS:
        return acc, tl.float32, "ieee"
    return acc, tl.float32, "bf16x3"


@functools.lru_cache(maxsize=None)
def _device_target(index: int) -> tuple:
    target = triton.runtime.driver.active.get_current_target()
    return target.backend, target.arch


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _target_of(t: torch.Tensor) -> Optional[tuple]:
    if t.device.type == "cpu":
        return None
    return _device_target(t.device.index if t.device.index is not None else torch.cuda.current_device())


def _num_sms(t: torch.Tensor) -> int:
    if t.device.type == "cpu":
        return 2  # interpreter: a couple of "SMs" so small tests still split into chunks
    return _sm_count(t.device.index if t.device.index is not None else torch.cuda.current_device())


# --------------------------------------------------------------------------------------------
# Device helpers.
# --------------------------------------------------------------------------------------------


@triton.jit
def _pair(p):
    """Block pair (I, J), I <= J, of the p-th entry of the upper block triangle (column by column)."""
    pf = p.to(tl.float32)
    J = ((tl.sqrt(8.0 * pf + 1.0) - 1.0) * 0.5).to(tl.int32)
    J = tl.where(J * (J + 1) // 2 > p, J - 1, J)  # fp32 sqrt rounding, either way
    J = tl.where((J + 1) * (J + 2) // 2 <= p, J + 1, J)
    I = p - J * (J + 1) // 2
    return I, J


@triton.jit
def _tile(t, cols, n, d, L, n_lb, stride_s, stride_d, ROWS: tl.constexpr, BLOCK_S: tl.constexpr):
    """Where sample tile ``t`` lives, as the feature-major tile X^T[cols, samples of t].

    Returns (base, offs, mask, count): element (cols[a], sample b of the tile) is at
    ``base + offs[a, b]`` (base int64, offs int32), ``count`` is the tile's number of samples.
    "rows": tile t = rows t*BLOCK_S .. t*BLOCK_S + BLOCK_S - 1 (stride_s = d, features contiguous).
    "bdl":  tile t = (b, l-block) = divmod(t, n_lb) (stride_s = d*L, stride_d = L, l contiguous).
    """
    s = tl.arange(0, BLOCK_S)
    if ROWS:
        r0 = tl.cast(t, tl.int64) * BLOCK_S
        base = r0 * stride_s
        count = tl.minimum(n - r0, BLOCK_S).to(tl.int32)
        offs = s[None, :] * stride_s + cols[:, None]
    else:
        b = t // n_lb
        l0 = (t - b * n_lb) * BLOCK_S
        base = tl.cast(b, tl.int64) * stride_s + l0
        count = tl.minimum(L - l0, BLOCK_S)
        offs = cols[:, None] * stride_d + s[None, :]
    mask = (cols < d)[:, None] & (s < count)[None, :]
    return base, offs, mask, count


@triton.jit
def _mm(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b: tl.dot with ``PRECISION``, or for PRECISION "fma" (float64) a broadcast-and-sum
    product on the FMA units (Triton 3.6 has no float64 tl.dot on NVIDIA; this is exact IEEE
    float64 on every version and vendor)."""
    if PRECISION == "fma":
        return acc + tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _chunk(c, tiles_per_chunk, n_tiles, n, L, n_lb, ROWS: tl.constexpr, BLOCK_S: tl.constexpr):
    """(first tile, end tile, sample count as int64) of chunk ``c`` of the stats pass."""
    t0 = tl.cast(c, tl.int64) * tiles_per_chunk
    t1 = tl.minimum(t0 + tiles_per_chunk, n_tiles)
    if ROWS:
        count = tl.minimum(t1 * BLOCK_S, n) - t0 * BLOCK_S
    else:  # every b's last l-block is short by n_lb*BLOCK_S - L samples
        count = (t1 - t0) * BLOCK_S - (t1 // n_lb - t0 // n_lb) * (n_lb * BLOCK_S - L)
    return t0, t1, count


# --------------------------------------------------------------------------------------------
# Kernels.
# --------------------------------------------------------------------------------------------


# Counts that change with every batch are not specialised (no recompiles when one happens to be 1
# or a multiple of 16); d and the strides are, so that loads vectorise when they allow it.
@triton.jit(do_not_specialize=["n", "L", "n_lb", "n_tiles", "tiles_per_chunk", "n_pairs"])
def _stats_kernel(
    X_ptr, P_ptr, S_ptr, K_ptr, N_ptr,
    n, d, L, n_lb, n_tiles, tiles_per_chunk, n_pairs, stride_s, stride_d,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
):
    """P[c, I-block, J-block] = sum_{s in chunk c} (x_s - K_c)_I (x_s - K_c)_J^T  for I <= J;
    diagonal programs also write S[c] = sum (x_s - K_c) and K[c] (both (chunks, d)), and the
    first program of each chunk its sample count N[c]."""
    pid = tl.program_id(0)
    c = pid // n_pairs
    p = pid - c * n_pairs
    I, J = _pair(p)
    t0, t1, count_c = _chunk(c, tiles_per_chunk, n_tiles, n, L, n_lb, ROWS, BLOCK_S)
    if p == 0:
        tl.store(N_ptr + c, count_c.to(ACC))
    ci = I * BLOCK_D + tl.arange(0, BLOCK_D)
    cj = J * BLOCK_D + tl.arange(0, BLOCK_D)

    # Shift K_c: column means of the chunk's first tile (never empty). Subtracted in ACC before
    # the cast to the dot's operand type, so a mean large against the spread costs no accuracy.
    base, offs, mask, count = _tile(t0, ci, n, d, L, n_lb, stride_s, stride_d, ROWS, BLOCK_S)
    k_i = tl.sum(tl.load(X_ptr + base + offs, mask=mask, other=0.0).to(ACC), axis=1) / count
    base, offs, mask, count = _tile(t0, cj, n, d, L, n_lb, stride_s, stride_d, ROWS, BLOCK_S)
    k_j = tl.sum(tl.load(X_ptr + base + offs, mask=mask, other=0.0).to(ACC), axis=1) / count

    acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=ACC)
    if I == J:
        s_acc = tl.zeros((BLOCK_D,), dtype=ACC)
        for t in range(t0, t1):
            base, offs, mask, _ = _tile(t, ci, n, d, L, n_lb, stride_s, stride_d, ROWS, BLOCK_S)
            x = tl.load(X_ptr + base + offs, mask=mask, other=0.0).to(ACC)
            x = tl.where(mask, x - k_i[:, None], 0.0)
            s_acc += tl.sum(x, axis=1)
            xd = x.to(DOT)
            acc = _mm(xd, tl.trans(xd), acc, PRECISION)
        row = tl.cast(c, tl.int64) * d
        tl.store(S_ptr + row + ci, s_acc, mask=ci < d)
        tl.store(K_ptr + row + ci, k_i, mask=ci < d)
    else:
        for t in range(t0, t1):
            base, offs_i, mask_i, _ = _tile(t, ci, n, d, L, n_lb, stride_s, stride_d, ROWS, BLOCK_S)
            _, offs_j, mask_j, _ = _tile(t, cj, n, d, L, n_lb, stride_s, stride_d, ROWS, BLOCK_S)
            xi = tl.load(X_ptr + base + offs_i, mask=mask_i, other=0.0).to(ACC)
            xj = tl.load(X_ptr + base + offs_j, mask=mask_j, other=0.0).to(ACC)
            xi = tl.where(mask_i, xi - k_i[:, None], 0.0).to(DOT)
            xj = tl.where(mask_j, xj - k_j[:, None], 0.0).to(DOT)
            acc = _mm(xi, tl.trans(xj), acc, PRECISION)
    P_c = P_ptr + tl.cast(c, tl.int64) * d * d
    tl.store(P_c + ci.to(tl.int64)[:, None] * d + cj[None, :], acc,
             mask=(ci < d)[:, None] & (cj < d)[None, :])


@triton.jit(do_not_specialize=["n", "n_chunks"])
def _finalize_kernel(
    P_ptr, S_ptr, K_ptr, N_ptr, OUT_ptr, MU_ptr, PART_ptr, n, d, n_chunks,
    alpha: tl.float64, alpha_lo: tl.float64, beta: tl.float64, beta_lo: tl.float64,
    eps: tl.float64, eps_lo: tl.float64, gamma: tl.float64, gamma_lo: tl.float64,
    delta: tl.float64, delta_lo: tl.float64,
    BLOCK_F: tl.constexpr, ACC: tl.constexpr, WRITE_G: tl.constexpr, HAS_DELTA: tl.constexpr,
):
    """Block (I <= J) of BLOCK_F: Chan-merge the chunks in order, then write mu (diagonal
    blocks), and M2 (WRITE_G False) or G with the terms' partial sums (WRITE_G True), to both
    (I, J) and (J, I). Each float argument arrives as float64 in two parts (x = hi + lo, hi the
    float32 rounding of x), which the interpreter, passing Python floats as float32, also keeps
    exact; the coefficients of G are formed from n and d in ACC."""
    alpha = tl.cast(alpha, ACC) + tl.cast(alpha_lo, ACC)
    beta = tl.cast(beta, ACC) + tl.cast(beta_lo, ACC)
    eps = tl.cast(eps, ACC) + tl.cast(eps_lo, ACC)
    gamma = tl.cast(gamma, ACC) + tl.cast(gamma_lo, ACC)
    delta = tl.cast(delta, ACC) + tl.cast(delta_lo, ACC)
    nm1 = tl.cast(n - 1, ACC)
    dd = tl.cast(d, ACC)
    inv_nm1 = 1.0 / nm1
    coef_var = -alpha / (dd * nm1)
    coef_cov = tl.where(d > 1, 4.0 * beta / (dd * (dd - 1.0) * nm1), 0.0)
    p = tl.program_id(0)
    I, J = _pair(p)
    ci = I * BLOCK_F + tl.arange(0, BLOCK_F)
    cj = J * BLOCK_F + tl.arange(0, BLOCK_F)
    mi = ci < d
    mj = cj < d
    m2d = mi[:, None] & mj[None, :]
    poffs = ci.to(tl.int64)[:, None] * d + cj[None, :]

    # The running mean is kept relative to chunk 0's shift K_0 (mean = K_0 + m), and K_0 added
    # once at the end: m is of the order of the spread, so its rounding at each of the many
    # merges is that much smaller than the rounding of a mean of order |mu| would be.
    n_a = tl.load(N_ptr)
    k0_i = tl.load(K_ptr + ci, mask=mi, other=0.0)
    k0_j = tl.load(K_ptr + cj, mask=mj, other=0.0)
    mean_i = tl.load(S_ptr + ci, mask=mi, other=0.0) / n_a
    mean_j = tl.load(S_ptr + cj, mask=mj, other=0.0) / n_a
    M = tl.load(P_ptr + poffs, mask=m2d, other=0.0) - n_a * mean_i[:, None] * mean_j[None, :]
    for c in range(1, n_chunks):
        n_b = tl.load(N_ptr + c)
        row = tl.cast(c, tl.int64) * d
        sh_i = tl.load(S_ptr + row + ci, mask=mi, other=0.0) / n_b
        sh_j = tl.load(S_ptr + row + cj, mask=mj, other=0.0) / n_b
        Pb = tl.load(P_ptr + row * d + poffs, mask=m2d, other=0.0)
        n_ab = n_a + n_b
        # K_c - K_0: two means of the same column, exact where |mu| dominates the spread.
        del_i = ((tl.load(K_ptr + row + ci, mask=mi, other=0.0) - k0_i) + sh_i) - mean_i
        del_j = ((tl.load(K_ptr + row + cj, mask=mj, other=0.0) - k0_j) + sh_j) - mean_j
        M += (Pb - n_b * sh_i[:, None] * sh_j[None, :]) + (n_a * n_b / n_ab) * del_i[:, None] * del_j[None, :]
        mean_i += del_i * (n_b / n_ab)
        mean_j += del_j * (n_b / n_ab)
        n_a = n_ab

    on_diag = ci[:, None] == cj[None, :]
    upper = m2d & ((I < J) | (ci[:, None] <= cj[None, :]))
    if WRITE_G:
        C = M * inv_nm1
        s = tl.sqrt(C + eps)
        g_diag = tl.where(s < gamma, coef_var / s, 0.0)
        if HAS_DELTA:
            clipped = tl.where(C > delta, delta, tl.where(C < -delta, -delta, C))
            a = tl.abs(C)
            phi = tl.where(a <= delta, C * C, 2.0 * delta * a - delta * delta)
        else:
            clipped = C
            phi = C * C
        val = tl.where(on_diag, g_diag, coef_cov * clipped)
        hinge = gamma - s
        hinge = tl.where(hinge < 0.0, 0.0, hinge)  # relu that keeps NaN, as torch.relu
        part_var = tl.sum(tl.sum(tl.where(on_diag & m2d, hinge, 0.0), axis=1), axis=0)
        strict = m2d & ((I < J) | (ci[:, None] < cj[None, :]))
        part_cov = 2.0 * tl.sum(tl.sum(tl.where(strict, phi, 0.0), axis=1), axis=0)
        tl.store(PART_ptr + 2 * p, part_var)
        tl.store(PART_ptr + 2 * p + 1, part_cov)
    else:
        val = M
    tl.store(OUT_ptr + poffs, val, mask=upper)
    tl.store(OUT_ptr + cj.to(tl.int64)[None, :] * d + ci[:, None], val, mask=upper)  # mirror
    if I == J:
        tl.store(MU_ptr + ci, k0_i + mean_i, mask=mi)


@triton.jit(do_not_specialize=["n_parts"])
def _terms_kernel(PART_ptr, T_ptr, n_parts, d, BLOCK: tl.constexpr):
    """T = [sum of part_var / d, sum of part_cov / (d (d-1))] (0 for d = 1), added in a fixed order."""
    idx = tl.arange(0, BLOCK)
    acc_var = tl.load(PART_ptr + 2 * idx, mask=idx < n_parts, other=0.0)
    acc_cov = tl.load(PART_ptr + 2 * idx + 1, mask=idx < n_parts, other=0.0)
    for k in range(BLOCK, n_parts, BLOCK):
        m = k + idx < n_parts
        acc_var += tl.load(PART_ptr + 2 * (k + idx), mask=m, other=0.0)
        acc_cov += tl.load(PART_ptr + 2 * (k + idx) + 1, mask=m, other=0.0)
    dd = tl.cast(d, T_ptr.dtype.element_ty)
    tl.store(T_ptr, tl.sum(acc_var, axis=0) / dd)
    tl.store(T_ptr + 1, tl.where(d > 1, tl.sum(acc_cov, axis=0) / (dd * (dd - 1.0)), 0.0))


@triton.jit(do_not_specialize=["n", "L", "n_lb", "n_tiles", "tiles_per_prog", "n_jb"])
def _apply_kernel(
    X_ptr, GY_ptr, OUT_ptr, G_ptr, MU_ptr,
    n, d, L, n_lb, n_tiles, tiles_per_prog, n_jb, stride_s, stride_d,
    ROWS: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
):
    """grad_x^T[J, s] = grad_y^T[J, s] + sum_K G[K, J]^T (X - mu)^T[K, s] for the sample tiles
    of this program; J = the program's BLOCK_J output columns."""
    pid = tl.program_id(0)
    g = pid // n_jb
    cj = (pid - g * n_jb) * BLOCK_J + tl.arange(0, BLOCK_J)
    t_begin = g * tiles_per_prog
    t_end = tl.minimum(t_begin + tiles_per_prog, n_tiles)
    rk = tl.arange(0, BLOCK_K)
    for t in range(t_begin, t_end):
        acc = tl.zeros((BLOCK_J, BLOCK_S), dtype=ACC)
        for k0 in range(0, d, BLOCK_K):
            ck = k0 + rk
            base, offs, mask, _ = _tile(t, ck, n, d, L, n_lb, stride_s, stride_d, ROWS, BLOCK_S)
            # Samples past the tile's end give garbage columns that are never stored, and
            # features past d meet zero rows of G^T: no select needed.
            x = tl.load(X_ptr + base + offs, mask=mask, other=0.0).to(ACC)
            mu_k = tl.load(MU_ptr + ck, mask=ck < d, other=0.0)
            xc = (x - mu_k[:, None]).to(DOT)
            gtk = tl.load(G_ptr + ck.to(tl.int64)[None, :] * d + cj[:, None],
                          mask=(ck < d)[None, :] & (cj < d)[:, None], other=0.0).to(DOT)
            acc = _mm(gtk, xc, acc, PRECISION)
        base, offs, mask, _ = _tile(t, cj, n, d, L, n_lb, stride_s, stride_d, ROWS, BLOCK_S)
        gy = tl.load(GY_ptr + base + offs, mask=mask, other=0.0).to(ACC)
        tl.store(OUT_ptr + base + offs, (gy + acc).to(OUT_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Host side.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Geometry:
    """How the sample tiles of a canonical (B, d, L) tensor are laid out."""

    rows: bool
    n: int
    d: int
    L: int
    n_lb: int  # l-blocks per b ("bdl"); 1 for "rows"
    n_tiles: int
    stride_s: int
    stride_d: int

    def args(self) -> tuple:
        return (self.n, self.d, self.L, self.n_lb, self.n_tiles)


def _geometry(x3: torch.Tensor, rows: bool, block_s: int) -> _Geometry:
    B, d, L = x3.shape
    if rows:
        n = B * L
        return _Geometry(True, n, d, 1, 1, triton.cdiv(n, block_s), d, 1)
    n_lb = triton.cdiv(L, block_s)
    return _Geometry(False, B * L, d, L, n_lb, B * n_lb, d * L, L)


def _stats_plan(geo: _Geometry, n_pairs: int, num_sms: int) -> tuple[int, int]:
    """(chunks, tiles per chunk): enough programs to fill the device, chunks of >= a few samples
    per feature so the partial d x d blocks stay small against x."""
    want = max(1, triton.cdiv(STATS_PROGRAMS_PER_SM * num_sms, n_pairs))
    cap = max(1, geo.n // max(1, STATS_MIN_SAMPLES_PER_FEATURE * geo.d))
    chunks = max(1, min(want, cap, geo.n_tiles))
    per = triton.cdiv(geo.n_tiles, chunks)
    return triton.cdiv(geo.n_tiles, per), per


def _stats(x3: torch.Tensor):
    """Run the stats and return what the finalize needs."""
    dtype = x3.dtype
    target = _target_of(x3)
    acc_t, dot_t, prec = precision(dtype, target)
    torch_acc = accumulate_dtype(dtype)
    check_canonical(x3)
    rows = x3.shape[2] == 1
    cfg = stats_config(x3.shape[1], dtype, target)
    bd, bs = cfg["BLOCK_D"], cfg["BLOCK_S"]
    geo = _geometry(x3, rows, bs)
    nb = triton.cdiv(geo.d, bd)
    n_pairs = nb * (nb + 1) // 2
    chunks, per = _stats_plan(geo, n_pairs, _num_sms(x3))
    d = geo.d
    P = torch.empty((chunks, d, d), dtype=torch_acc, device=x3.device)
    S = torch.empty((chunks, d), dtype=torch_acc, device=x3.device)
    K = torch.empty((chunks, d), dtype=torch_acc, device=x3.device)
    N = torch.empty((chunks,), dtype=torch_acc, device=x3.device)
    _stats_kernel[(chunks * n_pairs,)](
        x3, P, S, K, N, *geo.args(), per, n_pairs, geo.stride_s, geo.stride_d,
        ROWS=rows, BLOCK_D=bd, BLOCK_S=bs, ACC=acc_t, DOT=dot_t, PRECISION=prec,
        **cfg.launch(target),
    )
    return P, S, K, N, geo.n, d, acc_t


def _split(x: float) -> tuple[float, float]:
    """(hi, lo) with hi the float32 value nearest x and hi + lo == x to ~2^-48."""
    x = float(x)
    try:
        hi = struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:  # beyond float32's range: the interpreter could not pass it anyway
        return x, 0.0
    return hi, x - hi


def _finalize(stats, params: Optional[Params] = None):
    """mu and, with ``params``, G (else M2) and the terms' per-block partial sums."""
    P, S, K, N, n, d, acc_t = stats
    write_g = params is not None
    alpha, beta, eps, gamma, delta = params.values() if write_g else (0.0, 0.0, 1.0, 0.0, None)
    cfg = CONFIGS["finalize"]
    bf = cfg["BLOCK_F"]
    nbf = triton.cdiv(d, bf)
    n_parts = nbf * (nbf + 1) // 2
    out = torch.empty((d, d), dtype=P.dtype, device=P.device)
    mu = torch.empty((d,), dtype=P.dtype, device=P.device)
    parts = torch.empty((n_parts, 2), dtype=P.dtype, device=P.device)
    _finalize_kernel[(n_parts,)](
        P, S, K, N, out, mu, parts, n, d, N.shape[0],
        *_split(alpha), *_split(beta), *_split(eps), *_split(gamma), *_split(1.0 if delta is None else delta),
        BLOCK_F=bf, ACC=acc_t, WRITE_G=write_g,
        HAS_DELTA=delta is not None, **cfg.launch(_target_of(P)),
    )
    return out, mu, parts


def vcreg_stats_triton(x3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu, M2): column means (d) and M2 = Xc^T Xc (d x d, symmetric) of x3: (B, d, L),
    in the accumulate dtype."""
    M2, mu, _ = _finalize(_stats(x3))
    return mu, M2


def vcreg_apply_triton(gy3: torch.Tensor, x3: torch.Tensor, G: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """grad_y + (X - mu) @ G on canonical (B, d, L) tensors, in grad_y's dtype."""
    check_canonical(x3, gy3, min_samples=0)
    check_apply_operands(x3, G, mu)
    B, d, L = x3.shape
    rows = L == 1
    dtype = x3.dtype
    acc_t, dot_t, prec = precision(dtype, _target_of(x3))
    torch_acc = accumulate_dtype(dtype)
    G = G.to(torch_acc).contiguous()
    mu = mu.to(torch_acc).contiguous()
    out = torch.empty_like(x3, dtype=gy3.dtype)
    target = _target_of(x3)
    cfg = apply_config(d, dtype, target)
    bj, bk, bs = cfg["BLOCK_J"], cfg["BLOCK_K"], cfg["BLOCK_S"]
    geo = _geometry(x3, rows, bs)
    n_jb = triton.cdiv(d, bj)
    groups = max(1, min(geo.n_tiles, triton.cdiv(APPLY_PROGRAMS_PER_SM * _num_sms(x3), n_jb)))
    per = triton.cdiv(geo.n_tiles, groups)
    groups = triton.cdiv(geo.n_tiles, per)
    _apply_kernel[(groups * n_jb,)](
        x3, gy3, out, G, mu, *geo.args(), per, n_jb, geo.stride_s, geo.stride_d,
        ROWS=rows, BLOCK_J=bj, BLOCK_K=bk, BLOCK_S=bs,
        ACC=acc_t, DOT=dot_t, PRECISION=prec, **cfg.launch(target),
    )
    return out


def vcreg_backward_triton(gy3: torch.Tensor, x3: torch.Tensor, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
    """grad_x = grad_y + Xc @ G and tensor([l_var, l_cov]) on canonical (B, d, L) tensors."""
    check_canonical(x3, gy3, min_samples=2)
    G, mu, parts = _finalize(_stats(x3), params)
    d = x3.shape[1]
    terms = torch.empty((2,), dtype=G.dtype, device=G.device)
    cfg = CONFIGS["terms"]
    _terms_kernel[(1,)](parts, terms, parts.shape[0], d, BLOCK=cfg["BLOCK"], **cfg.launch(_target_of(G)))
    return vcreg_apply_triton(gy3, x3, G, mu), terms


# --------------------------------------------------------------------------------------------
# Ahead-of-time compilation cases (tools/triton_aot_check.py).
# --------------------------------------------------------------------------------------------

AOT_TARGETS = (("cuda", 80), ("cuda", 90), ("hip", "gfx906"), ("hip", "gfx90a"), ("hip", "gfx942"))
_SIG_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


@dataclass(frozen=True)
class AOTCase:
    """One compilation the host code can ask for: kernel, triton signature, constexprs, launch."""

    label: str
    kernel: object
    signature: dict
    constexprs: dict
    attrs: dict
    num_warps: int
    num_stages: int


def _aot_case(label, kernel, pointers: dict, constexprs: dict, cfg: Config, aligned: bool, target: tuple) -> AOTCase:
    """Signature as the JIT would build it: pointers as given (16-byte aligned), fp64-annotated
    floats as fp64, other ints i32; ``aligned`` marks d and the strides divisible by 16, as the JIT
    does when they are (so both vectorised and scalar loads are covered)."""
    signature, attrs = {}, {}
    for i, prm in enumerate(inspect.signature(kernel.fn).parameters.values()):
        name, annotation = prm.name, str(prm.annotation)
        if "constexpr" in annotation or name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = "*" + pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif "float64" in annotation:
            signature[name] = "fp64"
        else:
            signature[name] = "i32"
            if aligned and name in ("d", "stride_s", "stride_d"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    launch = cfg.launch(target)
    return AOTCase(label, kernel, signature, dict(constexprs), attrs, launch["num_warps"], launch["num_stages"])


def aot_cases(target: tuple) -> Iterator[AOTCase]:
    """Every kernel x configuration x dtype x layout that the host code can launch on ``target``
    ((backend, arch), as in triton's GPUTarget), read from ``CONFIGS``, with the precision of
    ``precision()``. d = 1 (which the JIT turns into a constant) is covered at the smallest config."""
    case = functools.partial(_aot_case, target=target)
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        acc_t, dot_t, prec = precision(dtype, target)
        xs, accs = _SIG_DTYPE[dtype], _SIG_DTYPE[accumulate_dtype(dtype)]
        for rows in (True, False):
            layout = "rows" if rows else "bdl"
            for key, cfg in sorted(_table("stats", dtype, target).items()):
                for aligned in (True, False):
                    yield case(
                        f"stats {xs} {layout} BLOCK_D={cfg['BLOCK_D']} BLOCK_S={cfg['BLOCK_S']}"
                        + ("" if aligned else " unaligned"), _stats_kernel,
                        dict(X_ptr=xs, P_ptr=accs, S_ptr=accs, K_ptr=accs, N_ptr=accs),
                        dict(cfg.blocks, ROWS=rows, ACC=acc_t, DOT=dot_t, PRECISION=prec), cfg, aligned)
            for key, cfg in sorted(_table("apply", dtype, target).items()):
                for aligned in (True, False):
                    yield case(
                        f"apply {xs} {layout} BLOCK_J={cfg['BLOCK_J']} BLOCK_K={cfg['BLOCK_K']} "
                        f"BLOCK_S={cfg['BLOCK_S']}" + ("" if aligned else " unaligned"), _apply_kernel,
                        dict(X_ptr=xs, GY_ptr=xs, OUT_ptr=xs, G_ptr=accs, MU_ptr=accs),
                        dict(cfg.blocks, ROWS=rows, ACC=acc_t, DOT=dot_t,
                             PRECISION=prec), cfg, aligned)
            small_stats = stats_config(1, dtype, target)
            yield case(f"stats {xs} {layout} d=1", _stats_kernel,
                            dict(X_ptr=xs, P_ptr=accs, S_ptr=accs, K_ptr=accs, N_ptr=accs),
                            dict(small_stats.blocks, d=1, ROWS=rows, ACC=acc_t, DOT=dot_t, PRECISION=prec),
                            small_stats, True)
            small_apply = apply_config(1, dtype, target)
            yield case(f"apply {xs} {layout} d=1", _apply_kernel,
                            dict(X_ptr=xs, GY_ptr=xs, OUT_ptr=xs, G_ptr=accs, MU_ptr=accs),
                            dict(small_apply.blocks, d=1, ROWS=rows, ACC=acc_t, DOT=dot_t,
                                 PRECISION=prec), small_apply, True)
    for acc in (torch.float32, torch.float64):
        accs = _SIG_DTYPE[acc]
        cfg = CONFIGS["finalize"]
        for write_g, has_delta in ((False, False), (True, False), (True, True)):
            for d_one in (False, True):
                yield case(
                    f"finalize {accs} {'G' if write_g else 'M2'}{' delta' if has_delta else ''}"
                    + (" d=1" if d_one else ""), _finalize_kernel,
                    dict(P_ptr=accs, S_ptr=accs, K_ptr=accs, N_ptr=accs, OUT_ptr=accs, MU_ptr=accs,
                         PART_ptr=accs),
                    dict(cfg.blocks, ACC=_TL[acc], WRITE_G=write_g, HAS_DELTA=has_delta,
                         **({"d": 1} if d_one else {})), cfg, True)
        cfg = CONFIGS["terms"]
        for d_one in (False, True):
            yield case(f"terms {accs}" + (" d=1" if d_one else ""), _terms_kernel,
                            dict(PART_ptr=accs, T_ptr=accs), dict(cfg.blocks, **({"d": 1} if d_one else {})),
                            cfg, True)
