"""The @triton.jit kernels of the triton backend (the math: this package's docstring).

Layouts the kernels read X in (the "operand"; ``launch._operand_layout`` decides which):

    rows: X[s, j] at s*stride + j      (features contiguous; stride % 16 == 0)
    bdl:  X[s, j] at b*stride + j*L + l, s = b*L + l   (samples contiguous within an image;
          stride = d*L, L % 16 == 0, so every run of 16 samples lies in one image)

Tiles of X are addressed feature-major, X^T[cols, samples], in both: their contiguous axis is 0
(rows) or 1 (bdl), and with the divisibility above Triton turns them into 16-byte cp.async copies.

Matrix products follow the precision mode ``PRECISION`` (``precision.py``): "ieee" (float32
operands), "tf32" (rounded to nearest, then TF32 products), "bf16x3" (y = hi + lo, three bfloat16
products on one float32 accumulator: hi*hi + hi*lo + lo*hi), "bf16" and "fp16" (16-bit operands),
"fp64" (exact float64 products on the FMA units: a broadcast-and-sum, as Triton 3.6 has no float64
tl.dot on NVIDIA). ``EMULATE`` (the interpreter, which has no bfloat16 dot) keeps bfloat16 and
TF32 values in float32 containers, rounded exactly as the hardware conversion rounds them, so the
interpreter computes the products the GPU computes. ``ASM`` rounds to TF32 with ``cvt.rna`` (NVIDIA).
"""
from __future__ import annotations

import triton
import triton.language as tl

# --------------------------------------------------------------------------------------------
# Helpers.
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
def _round_bf16(y):
    """float32 y rounded to the nearest bfloat16 (ties to even), as a float32 value."""
    bits = y.to(tl.int32, bitcast=True)
    r = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return tl.where(y == y, r.to(tl.float32, bitcast=True), y)


@triton.jit
def _round_tf32(y, ASM: tl.constexpr):
    """float32 y rounded to the nearest TF32 value (ties away from zero, as cvt.rna.tf32.f32)."""
    if ASM:
        r = tl.inline_asm_elementwise("cvt.rna.tf32.f32 $0, $1;", "=r,r", [y], dtype=tl.float32,
                                      is_pure=True, pack=1)
    else:
        bits = y.to(tl.int32, bitcast=True)
        r = tl.where(y == y, ((bits + 0x1000) & -8192).to(tl.float32, bitcast=True), y)
    return r


@triton.jit
def _to_bf16(y, EMULATE: tl.constexpr):
    if EMULATE:
        r = _round_bf16(y)
    else:
        r = y.to(tl.bfloat16)
    return r


@triton.jit
def _split(y, PRECISION: tl.constexpr, EMULATE: tl.constexpr, ASM: tl.constexpr):
    """float32 (or float64) y as dot operands (hi, lo); lo is used by "bf16x3" only."""
    if PRECISION == "bf16x3":
        hi = _to_bf16(y, EMULATE)
        lo = _to_bf16(y - hi.to(tl.float32), EMULATE)
    elif PRECISION == "bf16":
        hi = _to_bf16(y, EMULATE)
        lo = hi
    elif PRECISION == "fp16":
        hi = y.to(tl.float16)
        lo = hi
    elif PRECISION == "tf32":
        hi = _round_tf32(y, ASM)
        lo = hi
    else:
        hi = y
        lo = y
    return hi, lo


@triton.jit
def _mma(a_hi, a_lo, b_hi, b_lo, acc, PRECISION: tl.constexpr):
    """acc + a @ b in ``PRECISION`` (a = a_hi + a_lo, b = b_hi + b_lo for "bf16x3")."""
    if PRECISION == "fp64":
        acc = acc + tl.sum(a_hi[:, :, None] * b_hi[None, :, :], axis=1)
    elif PRECISION == "bf16x3":
        acc = tl.dot(a_lo, b_hi, acc, input_precision="ieee")
        acc = tl.dot(a_hi, b_lo, acc, input_precision="ieee")
        acc = tl.dot(a_hi, b_hi, acc, input_precision="ieee")
    elif PRECISION == "tf32":
        acc = tl.dot(a_hi, b_hi, acc, input_precision="tf32")
    else:
        acc = tl.dot(a_hi, b_hi, acc, input_precision="ieee")
    return acc


@triton.jit
def _rowsum(y_hi, y_lo, acc, PRECISION: tl.constexpr, BLOCK_S: tl.constexpr):
    """acc[:, 0] + the row sums of y = y_hi (+ y_lo), on the matrix units: y @ e_0 with e_0 the
    (BLOCK_S x 16) matrix whose first column is ones (the other 15 columns of acc stay 0)."""
    col0 = tl.arange(0, 16)[None, :] == 0
    if PRECISION == "fp64":
        acc = acc + tl.where(col0, tl.sum(y_hi, axis=1)[:, None], 0.0)
    else:
        e0 = tl.where(col0 & (tl.arange(0, BLOCK_S)[:, None] >= 0), 1.0, 0.0).to(y_hi.dtype)
        if PRECISION == "tf32":  # y is TF32 already, e_0 exact: the TF32 product is exact
            acc = tl.dot(y_hi, e0, acc, input_precision="tf32")
        else:
            acc = tl.dot(y_hi, e0, acc, input_precision="ieee")
        if PRECISION == "bf16x3":
            acc = tl.dot(y_lo, e0, acc, input_precision="ieee")
    return acc


@triton.jit
def _tile_ptrs(X_ptr, t, cols, L, stride, ROWS: tl.constexpr, BLOCK_S: tl.constexpr):
    """Pointers to the feature-major tile X^T[cols, samples t*BLOCK_S ... t*BLOCK_S + BLOCK_S - 1]."""
    r = tl.arange(0, BLOCK_S)
    if ROWS:
        ptrs = X_ptr + tl.cast(t, tl.int64) * (BLOCK_S * stride) + (r * stride)[None, :] + cols[:, None]
    else:
        s = t * BLOCK_S + r
        b = s // L
        ptrs = X_ptr + (b.to(tl.int64) * stride + (s - b * L))[None, :] + (cols * L)[:, None]
    return ptrs


@triton.jit
def _shift(X_ptr, t, cols, n, d, L, stride, ROWS: tl.constexpr, BLOCK_S: tl.constexpr,
           ACC: tl.constexpr, EMULATE: tl.constexpr):
    """K: the column means of sample tile t (never empty), rounded to X's dtype where X is 16-bit
    (so that X - K is one correctly rounded 16-bit subtraction), in ACC."""
    s_ok = t * BLOCK_S + tl.arange(0, BLOCK_S) < n
    x = tl.load(_tile_ptrs(X_ptr, t, cols, L, stride, ROWS, BLOCK_S),
                mask=(cols < d)[:, None] & s_ok[None, :], other=0.0).to(ACC)
    k = tl.sum(x, axis=1) / tl.sum(s_ok.to(ACC), axis=0)
    if X_ptr.dtype.element_ty == tl.bfloat16:
        if EMULATE:
            k = _round_bf16(k)
        else:
            k = k.to(tl.bfloat16).to(ACC)
    elif X_ptr.dtype.element_ty == tl.float16:
        k = k.to(tl.float16).to(ACC)
    return k


@triton.jit
def _shifted(x, k, PRECISION: tl.constexpr, EMULATE: tl.constexpr, ASM: tl.constexpr, ACC: tl.constexpr):
    """(X - K) of a loaded tile as dot operands (hi, lo): the shift is subtracted before any cast to
    a narrower operand type; for 16-bit X in its own type, one correctly rounded subtraction."""
    if (PRECISION == "bf16" or PRECISION == "fp16") and x.dtype != tl.float32 and not EMULATE:
        y = x - k.to(x.dtype)[:, None]
        hi = y
        lo = y
    else:
        hi, lo = _split(x.to(ACC) - k[:, None], PRECISION, EMULATE, ASM)
    return hi, lo


@triton.jit
def _syrk_step(X_ptr, t, ci, cj, k_i, k_j, acc, s_i, s_j, n, d, L, stride,
               ROWS: tl.constexpr, BLOCK_S: tl.constexpr, PRECISION: tl.constexpr, EMULATE: tl.constexpr,
               ASM: tl.constexpr, ACC: tl.constexpr, DIAG: tl.constexpr, TAIL: tl.constexpr):
    """One step of 64 (BLOCK_S) samples: acc += Y_I Y_J^T, s_i += Y_I 1, s_j += Y_J 1, Y = X - K.
    Full tiles (TAIL False) carry no sample mask; the last, partial tile zeroes its missing samples."""
    if TAIL:
        s_ok = (t * BLOCK_S + tl.arange(0, BLOCK_S) < n)[None, :]
        xi = tl.load(_tile_ptrs(X_ptr, t, ci, L, stride, ROWS, BLOCK_S), mask=(ci < d)[:, None] & s_ok, other=0.0)
        yi_hi, yi_lo = _shifted(xi, k_i, PRECISION, EMULATE, ASM, ACC)
        yi_hi = tl.where(s_ok, yi_hi, 0.0).to(yi_hi.dtype)
        yi_lo = tl.where(s_ok, yi_lo, 0.0).to(yi_lo.dtype)
    else:
        # Columns past d load 0 with a shift of 0: zero rows of Y, no select needed.
        xi = tl.load(_tile_ptrs(X_ptr, t, ci, L, stride, ROWS, BLOCK_S), mask=(ci < d)[:, None], other=0.0)
        yi_hi, yi_lo = _shifted(xi, k_i, PRECISION, EMULATE, ASM, ACC)
    if DIAG:
        acc = _mma(yi_hi, yi_lo, tl.trans(yi_hi), tl.trans(yi_lo), acc, PRECISION)
        s_i = _rowsum(yi_hi, yi_lo, s_i, PRECISION, BLOCK_S)
    else:
        if TAIL:
            s_ok = (t * BLOCK_S + tl.arange(0, BLOCK_S) < n)[None, :]
            xj = tl.load(_tile_ptrs(X_ptr, t, cj, L, stride, ROWS, BLOCK_S), mask=(cj < d)[:, None] & s_ok,
                         other=0.0)
            yj_hi, yj_lo = _shifted(xj, k_j, PRECISION, EMULATE, ASM, ACC)
            yj_hi = tl.where(s_ok, yj_hi, 0.0).to(yj_hi.dtype)
            yj_lo = tl.where(s_ok, yj_lo, 0.0).to(yj_lo.dtype)
        else:
            xj = tl.load(_tile_ptrs(X_ptr, t, cj, L, stride, ROWS, BLOCK_S), mask=(cj < d)[:, None], other=0.0)
            yj_hi, yj_lo = _shifted(xj, k_j, PRECISION, EMULATE, ASM, ACC)
        acc = _mma(yi_hi, yi_lo, tl.trans(yj_hi), tl.trans(yj_lo), acc, PRECISION)
        s_i = _rowsum(yi_hi, yi_lo, s_i, PRECISION, BLOCK_S)
        s_j = _rowsum(yj_hi, yj_lo, s_j, PRECISION, BLOCK_S)
    return acc, s_i, s_j


@triton.jit
def _syrk_segment(X_ptr, Q_ptr, SK_ptr, SS_ptr, SN_ptr, seg, a, b, T, I, J, n, d, L, stride,
                  ROWS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, PRECISION: tl.constexpr,
                  EMULATE: tl.constexpr, ASM: tl.constexpr, ACC: tl.constexpr, DIAG: tl.constexpr):
    """Sample tiles [a, b) of block pair (I, J): the shifted sums of one segment, stored at ``seg``."""
    ci = I * BLOCK_D + tl.arange(0, BLOCK_D)
    cj = J * BLOCK_D + tl.arange(0, BLOCK_D)
    k_i = _shift(X_ptr, a, ci, n, d, L, stride, ROWS, BLOCK_S, ACC, EMULATE)
    if DIAG:
        k_j = k_i
    else:
        k_j = _shift(X_ptr, a, cj, n, d, L, stride, ROWS, BLOCK_S, ACC, EMULATE)
    acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=ACC)
    s_i = tl.zeros((BLOCK_D, 16), dtype=ACC)
    s_j = tl.zeros((BLOCK_D, 16), dtype=ACC)
    full_end = tl.minimum(b, n // BLOCK_S)
    for t in range(a, full_end):
        acc, s_i, s_j = _syrk_step(X_ptr, t, ci, cj, k_i, k_j, acc, s_i, s_j, n, d, L, stride,
                                   ROWS, BLOCK_S, PRECISION, EMULATE, ASM, ACC, DIAG, False)
    if full_end < b:
        acc, s_i, s_j = _syrk_step(X_ptr, full_end, ci, cj, k_i, k_j, acc, s_i, s_j, n, d, L, stride,
                                   ROWS, BLOCK_S, PRECISION, EMULATE, ASM, ACC, DIAG, True)
    r = tl.arange(0, BLOCK_D)
    tl.store(Q_ptr + tl.cast(seg, tl.int64) * (BLOCK_D * BLOCK_D) + r[:, None] * BLOCK_D + r[None, :], acc)
    row = tl.cast(seg, tl.int64) * (2 * BLOCK_D)
    tl.store(SK_ptr + row + r, k_i)
    tl.store(SK_ptr + row + BLOCK_D + r, k_j)
    s_i = tl.sum(s_i, axis=1)  # the other 15 columns are 0: exact
    tl.store(SS_ptr + row + r, s_i)
    if DIAG:
        tl.store(SS_ptr + row + BLOCK_D + r, s_i)
    else:
        tl.store(SS_ptr + row + BLOCK_D + r, tl.sum(s_j, axis=1))
    count = tl.minimum(b * BLOCK_S, n) - a * BLOCK_S
    tl.store(SN_ptr + seg, tl.cast(count, ACC))


# --------------------------------------------------------------------------------------------
# Kernels.
# --------------------------------------------------------------------------------------------


# Counts that change with every batch are not specialised (no recompiles when one happens to be a
# multiple of 16); d, L and the strides are, so that loads vectorise where the layout allows.
@triton.jit(do_not_specialize=["n", "programs", "d_key", "n_key"])
def _stats_kernel(
    X_ptr, Q_ptr, SK_ptr, SS_ptr, SN_ptr,
    n, d, L, stride, programs, d_key, n_key,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, PRECISION: tl.constexpr,
    ACC: tl.constexpr, EMULATE: tl.constexpr, ASM: tl.constexpr,
):
    """Split-K SYRK in a stream-K schedule. The work is T = cdiv(n, BLOCK_S) sample tiles for each
    of the n_pairs block pairs (I <= J) of the upper triangle, units u = pair * T + tile; program g
    takes units [g W / programs, (g + 1) W / programs). Each maximal run of one pair's tiles is a
    segment, stored at index g + pair (distinct for every segment), with

        K  = the column means of its first tile (the shift; rounded to X's dtype if 16-bit)
        Q  = sum (x_s - K)_I (x_s - K)_J^T       (BLOCK_D x BLOCK_D, float32 or float64)
        S  = sum (x_s - K)_I and sum (x_s - K)_J,  and the sample count N.

    ``d_key``/``n_key``: the autotuner's buckets, unused here."""
    g = tl.program_id(0)
    nb = tl.cdiv(d, BLOCK_D)
    T = tl.cdiv(n, BLOCK_S)
    W = tl.cast(nb * (nb + 1) // 2, tl.int64) * T
    u = tl.cast(g, tl.int64) * W // programs
    u_end = tl.cast((g + 1), tl.int64) * W // programs
    while u < u_end:
        p = tl.cast(u // T, tl.int32)
        a = tl.cast(u - tl.cast(p, tl.int64) * T, tl.int32)
        b = tl.cast(tl.minimum(u_end - tl.cast(p, tl.int64) * T, T), tl.int32)
        I, J = _pair(p)
        if I == J:
            _syrk_segment(X_ptr, Q_ptr, SK_ptr, SS_ptr, SN_ptr, g + p, a, b, T, I, J, n, d, L, stride,
                          ROWS, BLOCK_D, BLOCK_S, PRECISION, EMULATE, ASM, ACC, True)
        else:
            _syrk_segment(X_ptr, Q_ptr, SK_ptr, SS_ptr, SN_ptr, g + p, a, b, T, I, J, n, d, L, stride,
                          ROWS, BLOCK_D, BLOCK_S, PRECISION, EMULATE, ASM, ACC, False)
        u = tl.cast((p + 1), tl.int64) * T


@triton.jit
def _program_of(u, W, programs):
    """The stats program whose units include unit u (the last g with g W // programs <= u)."""
    return tl.cast(((u + 1) * programs - 1) // W, tl.int32)


@triton.jit(do_not_specialize=["n", "programs"])
def _finalize_kernel(
    Q_ptr, SK_ptr, SS_ptr, SN_ptr, OUT_ptr, MU_ptr, PART_ptr, AMAX_ptr,
    n, d, programs,
    alpha: tl.float64, alpha_lo: tl.float64, beta: tl.float64, beta_lo: tl.float64,
    eps: tl.float64, eps_lo: tl.float64, gamma: tl.float64, gamma_lo: tl.float64,
    delta: tl.float64, delta_lo: tl.float64,
    BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_C: tl.constexpr,
    ACC: tl.constexpr, WRITE_G: tl.constexpr, HAS_DELTA: tl.constexpr,
):
    """Block (bi <= bj) of BLOCK_F of the d x d result: merge the stats segments of the block pair
    that holds it, write mu (diagonal blocks), and M2 (WRITE_G False) or G with the terms' partial
    sums and max |G| (WRITE_G True), to both (bi, bj) and (bj, bi).

    The merge is exact centring in two passes over the segments c, BLOCK_C at a time (a fixed
    tree within each group, groups in order: bitwise repeatable). With R = the first segment's
    shift, m = sum_c (N_c (K_c - R) + S_c) / n (the mean relative to R) and e_c = (K_c - R) - m:

        M2 = sum_c [Q_c + S_c^I e_c^J^T + e_c^I S_c^J^T + N_c e_c^I e_c^J^T]

    (sum over the samples of chunk c of (x - mu)(x - mu)^T, x - mu = (x - K_c) + e_c): no
    cancellation beyond that of each e_c, which is of the order of the spread, not of |mu|.
    Each float argument arrives as float64 in two parts (x = hi + lo, hi the float32 rounding of
    x), which the interpreter, passing Python floats as float32, also keeps exact."""
    alpha = tl.cast(alpha, ACC) + tl.cast(alpha_lo, ACC)
    beta = tl.cast(beta, ACC) + tl.cast(beta_lo, ACC)
    eps = tl.cast(eps, ACC) + tl.cast(eps_lo, ACC)
    gamma = tl.cast(gamma, ACC) + tl.cast(gamma_lo, ACC)
    delta = tl.cast(delta, ACC) + tl.cast(delta_lo, ACC)
    q = tl.program_id(0)
    bi, bj = _pair(q)
    ci = bi * BLOCK_F + tl.arange(0, BLOCK_F)
    cj = bj * BLOCK_F + tl.arange(0, BLOCK_F)
    mi = ci < d
    mj = cj < d
    m2d = mi[:, None] & mj[None, :]

    # The stats block pair holding this block, and its segments: programs g_lo .. g_hi.
    I = bi * BLOCK_F // BLOCK_D
    J = bj * BLOCK_F // BLOCK_D
    p = J * (J + 1) // 2 + I
    li = ci - I * BLOCK_D  # columns within the stats tile
    lj = cj - J * BLOCK_D
    nb = tl.cdiv(d, BLOCK_D)
    T = tl.cdiv(n, BLOCK_S)
    W = tl.cast(nb * (nb + 1) // 2, tl.int64) * T
    g_lo = _program_of(tl.cast(p, tl.int64) * T, W, programs)
    g_hi = _program_of(tl.cast((p + 1), tl.int64) * T - 1, W, programs)
    seg0 = tl.cast(g_lo + p, tl.int64)
    r_i = tl.load(SK_ptr + seg0 * (2 * BLOCK_D) + li, mask=mi, other=0.0)
    r_j = tl.load(SK_ptr + seg0 * (2 * BLOCK_D) + BLOCK_D + lj, mask=mj, other=0.0)
    nn = tl.cast(n, ACC)

    # Pass 1: the mean relative to R.
    c_off = tl.arange(0, BLOCK_C)
    sum_i = tl.zeros((BLOCK_F,), dtype=ACC)
    sum_j = tl.zeros((BLOCK_F,), dtype=ACC)
    for g0 in range(g_lo, g_hi + 1, BLOCK_C):
        gs = g0 + c_off
        ok = gs <= g_hi
        rows = tl.cast(gs + p, tl.int64) * (2 * BLOCK_D)
        n_c = tl.load(SN_ptr + gs + p, mask=ok, other=0.0)
        k_ci = tl.load(SK_ptr + rows[:, None] + li[None, :], mask=ok[:, None] & mi[None, :], other=0.0)
        k_cj = tl.load(SK_ptr + rows[:, None] + BLOCK_D + lj[None, :], mask=ok[:, None] & mj[None, :], other=0.0)
        s_ci = tl.load(SS_ptr + rows[:, None] + li[None, :], mask=ok[:, None] & mi[None, :], other=0.0)
        s_cj = tl.load(SS_ptr + rows[:, None] + BLOCK_D + lj[None, :], mask=ok[:, None] & mj[None, :], other=0.0)
        sum_i += tl.sum(n_c[:, None] * (k_ci - r_i[None, :]) + s_ci, axis=0)
        sum_j += tl.sum(n_c[:, None] * (k_cj - r_j[None, :]) + s_cj, axis=0)
    m_i = sum_i / nn
    m_j = sum_j / nn

    # Pass 2: the centred sums.
    M = tl.zeros((BLOCK_F, BLOCK_F), dtype=ACC)
    for g0 in range(g_lo, g_hi + 1, BLOCK_C):
        gs = g0 + c_off
        ok = gs <= g_hi
        segs = tl.cast(gs + p, tl.int64)
        rows = segs * (2 * BLOCK_D)
        n_c = tl.load(SN_ptr + segs, mask=ok, other=0.0)
        e_i = tl.load(SK_ptr + rows[:, None] + li[None, :], mask=ok[:, None] & mi[None, :], other=0.0) \
            - r_i[None, :] - m_i[None, :]
        e_j = tl.load(SK_ptr + rows[:, None] + BLOCK_D + lj[None, :], mask=ok[:, None] & mj[None, :], other=0.0) \
            - r_j[None, :] - m_j[None, :]
        s_ci = tl.load(SS_ptr + rows[:, None] + li[None, :], mask=ok[:, None] & mi[None, :], other=0.0)
        s_cj = tl.load(SS_ptr + rows[:, None] + BLOCK_D + lj[None, :], mask=ok[:, None] & mj[None, :], other=0.0)
        ok3 = ok[:, None, None] & m2d[None, :, :]
        Q_c = tl.load(Q_ptr + segs[:, None, None] * (BLOCK_D * BLOCK_D) + li[None, :, None] * BLOCK_D
                      + lj[None, None, :], mask=ok3, other=0.0)
        term = Q_c + s_ci[:, :, None] * e_j[:, None, :] + e_i[:, :, None] * (s_cj + n_c[:, None] * e_j)[:, None, :]
        M += tl.sum(tl.where(ok3, term, 0.0), axis=0)

    poffs = ci.to(tl.int64)[:, None] * d + cj[None, :]
    on_diag = ci[:, None] == cj[None, :]
    upper = m2d & ((bi < bj) | (ci[:, None] <= cj[None, :]))
    if WRITE_G:
        nm1 = tl.cast(n - 1, ACC)
        dd = tl.cast(d, ACC)
        coef_var = -alpha / (dd * nm1)
        coef_cov = tl.where(d > 1, 4.0 * beta / (dd * (dd - 1.0) * nm1), 0.0)
        C = M / nm1
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
        strict = m2d & ((bi < bj) | (ci[:, None] < cj[None, :]))
        part_cov = 2.0 * tl.sum(tl.sum(tl.where(strict, phi, 0.0), axis=1), axis=0)
        tl.store(PART_ptr + 2 * q, part_var)
        tl.store(PART_ptr + 2 * q + 1, part_cov)
        finite = (val - val) == 0.0  # max |G| over finite entries (the float16 scale)
        tl.store(AMAX_ptr + q, tl.max(tl.max(tl.where(finite & m2d, tl.abs(val), 0.0), axis=1), axis=0))
    else:
        val = M
    tl.store(OUT_ptr + poffs, val, mask=upper)
    tl.store(OUT_ptr + cj.to(tl.int64)[None, :] * d + ci[:, None], val, mask=upper)  # mirror
    if bi == bj:
        tl.store(MU_ptr + ci, r_i + m_i, mask=mi)


@triton.jit(do_not_specialize=["n_parts", "n_amax"])
def _operand_kernel(
    G_ptr, MU_ptr, AMAX_ptr, PART_ptr, T_ptr, GH_ptr, GL_ptr, V_ptr, SCALE_ptr,
    d, ld, n_amax, n_parts,
    BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    EMULATE: tl.constexpr, ASM: tl.constexpr, SCALED: tl.constexpr, ALGEBRAIC: tl.constexpr,
):
    """G (d x d) as the apply's operand, transposed: GH^T[j, k] (+ GL^T for "bf16x3") in the
    operand type, zero for k >= d up to the row length ``ld``; SCALED (float16): times 2^k with
    2^k max|G| in [2^13, 2^14) (max over finite entries: ``AMAX_ptr``'s ``n_amax`` partial maxima),
    so that it neither underflows nor overflows, and SCALE = 2^-k; ALGEBRAIC (16-bit X):
    v = mu^T GH, formed from the same rounded GH. Where there are ``n_parts`` partial sums of the
    terms, program 0 also adds them in order: T = [sum part_var / d, sum part_cov / (d (d-1))]
    (0 for d = 1)."""
    pid = tl.program_id(0)
    cj = pid * BLOCK_J + tl.arange(0, BLOCK_J)
    rk = tl.arange(0, BLOCK_K)
    scale = 1.0
    if SCALED:
        am = tl.zeros((BLOCK_K,), dtype=ACC)
        for a0 in range(0, n_amax, BLOCK_K):
            am = tl.maximum(am, tl.load(AMAX_ptr + a0 + rk, mask=a0 + rk < n_amax, other=0.0))
        amax = tl.max(am, axis=0).to(tl.float32)
        e = ((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127  # floor(log2 amax) for normal amax
        e = tl.where(amax > 0.0, e, 0)
        k = tl.minimum(tl.maximum(13 - e, -126), 126)
        scale = ((k + 127) << 23).to(tl.float32, bitcast=True)
        if pid == 0:
            tl.store(SCALE_ptr, ((127 - k) << 23).to(tl.float32, bitcast=True))
    elif pid == 0:
        tl.store(SCALE_ptr, 1.0)
    v = tl.zeros((BLOCK_J,), dtype=ACC)
    for k0 in range(0, ld, BLOCK_K):
        ck = k0 + rk
        g = tl.load(G_ptr + ck.to(tl.int64)[:, None] * d + cj[None, :], mask=(ck < d)[:, None] & (cj < d)[None, :],
                    other=0.0)  # G[k, j]
        hi, lo = _split(g * scale, PRECISION, EMULATE, ASM)
        dst = cj.to(tl.int64)[None, :] * ld + ck[:, None]
        in_ld = (ck < ld)[:, None] & (cj < d)[None, :]
        tl.store(GH_ptr + dst, hi, mask=in_ld)
        if PRECISION == "bf16x3":
            tl.store(GL_ptr + dst, lo, mask=in_ld)
        if ALGEBRAIC:
            mu_k = tl.load(MU_ptr + ck, mask=ck < d, other=0.0)
            v += tl.sum(mu_k[:, None] * hi.to(ACC), axis=0)
    if ALGEBRAIC:
        tl.store(V_ptr + cj, v, mask=cj < d)
    if pid == 0:
        if n_parts > 0:
            acc_var = tl.zeros((BLOCK_K,), dtype=ACC)
            acc_cov = tl.zeros((BLOCK_K,), dtype=ACC)
            for k0 in range(0, n_parts, BLOCK_K):
                m = k0 + rk < n_parts
                acc_var += tl.load(PART_ptr + 2 * (k0 + rk), mask=m, other=0.0)
                acc_cov += tl.load(PART_ptr + 2 * (k0 + rk) + 1, mask=m, other=0.0)
            dd = tl.cast(d, ACC)
            tl.store(T_ptr, tl.sum(acc_var, axis=0) / dd)
            tl.store(T_ptr + 1, tl.where(d > 1, tl.sum(acc_cov, axis=0) / (dd * (dd - 1.0)), 0.0))


@triton.jit
def _apply_product(X_ptr, GH_ptr, GL_ptr, MU_ptr, V_ptr, SCALE_ptr, pid_m, pid_n, n, B, d, dk, ld, x_L, x_stride,
                   ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   PRECISION: tl.constexpr, ACC: tl.constexpr, ALGEBRAIC: tl.constexpr, EMULATE: tl.constexpr,
                   ASM: tl.constexpr):
    """(X - mu) @ G for sample tile pid_m and column block pid_n, (BLOCK_M x BLOCK_N) in ACC: a GEMM
    over the dk operand columns k in steps of BLOCK_K.

    16-bit X (exact in its own type): the algebraic form (X @ GH - 1 v^T) * SCALE with GH, v from
    ``_operand_kernel``: both operands stream from memory as stored. float32 X: X - mu in
    registers before the cast."""
    sm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    if ROWS:
        x_base = X_ptr + tl.cast(pid_m, tl.int64) * (BLOCK_M * x_stride) + (tl.arange(0, BLOCK_M) * x_stride)[:, None]
        s_ok = sm < n
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    else:
        b = sm // x_L
        x_base = X_ptr + (b.to(tl.int64) * x_stride + (sm - b * x_L))[None, :]
        s_ok = sm < B * x_L  # B*L, a multiple of 16: the mask keeps the loads 16 bytes wide
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=ACC)
    g_rows = cn.to(tl.int64)[:, None] * ld
    for k0 in range(0, dk, BLOCK_K):
        ck = k0 + rk
        g_hi = tl.load(GH_ptr + g_rows + ck[None, :], mask=(cn < d)[:, None], other=0.0)  # G^T[j, k]
        if PRECISION == "bf16x3":
            g_lo = tl.load(GL_ptr + g_rows + ck[None, :], mask=(cn < d)[:, None], other=0.0)
        else:
            g_lo = g_hi
        if ROWS:
            x = tl.load(x_base + ck[None, :], mask=s_ok[:, None] & (ck < dk)[None, :], other=0.0)  # X[s, k]
            if ALGEBRAIC:
                x = x.to(g_hi.dtype)  # exact: a no-op, or to float32 containers ("ieee", EMULATE)
                acc = _mma(x, x, tl.trans(g_hi), tl.trans(g_lo), acc, PRECISION)
            else:
                mu_k = tl.load(MU_ptr + ck, mask=ck < d, other=0.0)
                x_hi, x_lo = _split(x.to(ACC) - mu_k[None, :], PRECISION, EMULATE, ASM)
                acc = _mma(x_hi, x_lo, tl.trans(g_hi), tl.trans(g_lo), acc, PRECISION)
        else:
            x = tl.load(x_base + (ck * x_L)[:, None], mask=(ck < dk)[:, None] & s_ok[None, :], other=0.0)  # X^T[k, s]
            if ALGEBRAIC:
                x = x.to(g_hi.dtype)
                acc = _mma(g_hi, g_lo, x, x, acc, PRECISION)
            else:
                mu_k = tl.load(MU_ptr + ck, mask=ck < d, other=0.0)
                x_hi, x_lo = _split(x.to(ACC) - mu_k[:, None], PRECISION, EMULATE, ASM)
                acc = _mma(g_hi, g_lo, x_hi, x_lo, acc, PRECISION)
    if not ROWS:
        acc = tl.trans(acc)
    if ALGEBRAIC:
        v = tl.load(V_ptr + cn, mask=cn < d, other=0.0)
        acc = (acc - v[None, :]) * tl.load(SCALE_ptr)
    return acc


@triton.jit
def _tile_offsets(pid_m, pid_n, n, d, L, sb, sd, sl, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The epilogue's addresses of tile (pid_m, pid_n) in the (B, d, L) strides (sb, sd, sl) of
    grad_x (sample s = b*L + l): the tile's first element (int64), int32 offsets from it (the
    host keeps them in range), and the mask of the tile's samples and columns in range."""
    sm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    s0 = pid_m * BLOCK_M
    b0 = s0 // L
    l0 = s0 - b0 * L
    bo = sm // L
    offs = ((bo - b0) * sb + (sm - bo * L - l0) * sl)[:, None] + (cn * sd)[None, :]
    base = tl.cast(b0, tl.int64) * sb + tl.cast(l0, tl.int64) * sl
    m = (sm < n)[:, None] & (cn < d)[None, :]
    return base, offs, m


@triton.jit(do_not_specialize=["n", "B", "d_key", "n_key"])
def _apply_kernel(
    X_ptr, GH_ptr, GL_ptr, MU_ptr, V_ptr, SCALE_ptr, GY_ptr, OUT_ptr,
    n, B, d, dk, ld, x_L, x_stride, L, sb, sd, sl, d_key, n_key,
    ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, ACC: tl.constexpr, ALGEBRAIC: tl.constexpr, EMULATE: tl.constexpr,
    ASM: tl.constexpr,
):
    """grad_x[s, j] = grad_y[s, j] + sum_k (X - mu)[s, k] G[k, j] for BLOCK_M samples s and BLOCK_N
    output columns j (``_apply_product``). grad_y is read and grad_x written once, in x's (B, d, L)
    strides (sample s = b*L + l). Programs take the column blocks of one sample tile in a row, so
    that tile of X is read from memory once and from L2 after."""
    pid = tl.program_id(0)
    n_nb = tl.cdiv(d, BLOCK_N)
    pid_m = pid // n_nb
    pid_n = pid - pid_m * n_nb
    acc = _apply_product(X_ptr, GH_ptr, GL_ptr, MU_ptr, V_ptr, SCALE_ptr, pid_m, pid_n, n, B, d, dk, ld, x_L,
                         x_stride, ROWS, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, ACC, ALGEBRAIC, EMULATE, ASM)
    base, offs, m = _tile_offsets(pid_m, pid_n, n, d, L, sb, sd, sl, BLOCK_M, BLOCK_N)
    gy = tl.load(GY_ptr + base + offs, mask=m, other=0.0)
    tl.store(OUT_ptr + base + offs, (gy.to(ACC) + acc).to(OUT_ptr.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["n", "B", "d_key", "n_key"])
def _pair_apply_kernel(
    XA_ptr, XB_ptr, GHA_ptr, GLA_ptr, GHB_ptr, GLB_ptr, MUA_ptr, MUB_ptr, VA_ptr, VB_ptr, SCALEA_ptr, SCALEB_ptr,
    ZA_ptr, ZB_ptr, G_ptr, C_ptr, OUTA_ptr, OUTB_ptr,
    n, B, d, dk, ld, x_L, x_stride, L, sb, sd, sl, d_key, n_key,
    ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, ACC: tl.constexpr, ALGEBRAIC: tl.constexpr, EMULATE: tl.constexpr,
    ASM: tl.constexpr,
):
    """Both gradients of the VICReg pair, each tile of each written once:

        grad_a = g (c (Z_a - Z_b) + (Z_a - mu_a) @ G_a),   grad_b = g (c (Z_b - Z_a) + (Z_b - mu_b) @ G_b)

    g, c: 0-dim tensors (G_ptr, C_ptr). A program computes one tile of one branch's product
    (``_apply_product`` on that branch's operand XA/XB and G operand), then reads the tile of
    both z_a and z_b (ZA, ZB, in the gradients' (B, d, L) strides), forms the difference in ACC
    and multiplies by g before the one rounding to z's dtype. Programs go sample tile by sample
    tile, within one the branch a columns then branch b's, so both branches' rows of a tile are
    read from memory once and from L2 after."""
    pid = tl.program_id(0)
    n_nb = tl.cdiv(d, BLOCK_N)
    pid_m = pid // (2 * n_nb)
    r = pid - pid_m * (2 * n_nb)
    if r < n_nb:
        pid_n = r
        X_ptr, GH_ptr, GL_ptr, MU_ptr, V_ptr, SCALE_ptr = XA_ptr, GHA_ptr, GLA_ptr, MUA_ptr, VA_ptr, SCALEA_ptr
        OUT_ptr = OUTA_ptr
        sign = 1.0
    else:
        pid_n = r - n_nb
        X_ptr, GH_ptr, GL_ptr, MU_ptr, V_ptr, SCALE_ptr = XB_ptr, GHB_ptr, GLB_ptr, MUB_ptr, VB_ptr, SCALEB_ptr
        OUT_ptr = OUTB_ptr
        sign = -1.0
    acc = _apply_product(X_ptr, GH_ptr, GL_ptr, MU_ptr, V_ptr, SCALE_ptr, pid_m, pid_n, n, B, d, dk, ld, x_L,
                         x_stride, ROWS, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, ACC, ALGEBRAIC, EMULATE, ASM)
    base, offs, m = _tile_offsets(pid_m, pid_n, n, d, L, sb, sd, sl, BLOCK_M, BLOCK_N)
    za = tl.load(ZA_ptr + base + offs, mask=m, other=0.0).to(ACC)
    zb = tl.load(ZB_ptr + base + offs, mask=m, other=0.0).to(ACC)
    gc = tl.load(C_ptr).to(ACC) * sign
    out = (acc + (za - zb) * gc) * tl.load(G_ptr).to(ACC)
    tl.store(OUT_ptr + base + offs, out.to(OUT_ptr.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["count", "programs"])
def _invariance_kernel(
    ZA_ptr, ZB_ptr, PART_ptr, count, programs,
    BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    """PART[g] = sum (z_a - z_b)^2 over the elements of program g's tiles, two tensors of one
    shape and strides read as flat arrays of ``count`` elements: tiles of BLOCK elements, program
    g takes tiles [g T / programs, (g + 1) T / programs) in order, the squares added elementwise
    in ACC and the block summed (a fixed tree) at the end, stored in float64. Full tiles carry no
    mask (16-byte loads); the last, partial tile does."""
    g = tl.program_id(0)
    T = tl.cdiv(count, BLOCK)
    full = count // BLOCK
    t0 = tl.cast(g, tl.int64) * T // programs
    t1 = tl.cast(g + 1, tl.int64) * T // programs
    r = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=ACC)
    for t in range(t0, tl.minimum(t1, full)):
        offs = t * BLOCK + r
        diff = tl.load(ZA_ptr + offs).to(ACC) - tl.load(ZB_ptr + offs).to(ACC)
        acc += diff * diff
    if t1 > full:
        offs = full * BLOCK + r
        ok = offs < count
        diff = tl.load(ZA_ptr + offs, mask=ok, other=0.0).to(ACC) - tl.load(ZB_ptr + offs, mask=ok, other=0.0).to(ACC)
        acc += diff * diff
    tl.store(PART_ptr + g, tl.sum(acc, axis=0).to(tl.float64))


@triton.jit(do_not_specialize=["programs"])
def _sum_kernel(PART_ptr, OUT_ptr, programs, BLOCK: tl.constexpr):
    """OUT[0] = the sum of the ``programs`` float64 partial sums PART, BLOCK at a time in order
    then a fixed tree, rounded once to OUT's dtype (one program)."""
    r = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=tl.float64)
    for p0 in range(0, programs, BLOCK):
        acc += tl.load(PART_ptr + p0 + r, mask=p0 + r < programs, other=0.0)
    tl.store(OUT_ptr, tl.sum(acc, axis=0).to(OUT_ptr.dtype.element_ty))


@triton.jit(do_not_specialize=["n"])
def _copy_kernel(
    X_ptr, OUT_ptr, n, d, dk, L, sb, sd, sl,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """OUT[s, j] = X[b, j, l] (s = b*L + l) for j < d, 0 for d <= j < dk: the rows-layout copy of
    an x3 whose own layout cannot give 16-byte loads (L or d not a multiple of 16, other strides)."""
    pid_s = tl.program_id(0)
    pid_d = tl.program_id(1)
    s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    c = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    b = s // L
    l = s - b * L
    x = tl.load(X_ptr + (b.to(tl.int64) * sb + l.to(tl.int64) * sl)[:, None] + (c.to(tl.int64) * sd)[None, :],
                mask=(s < n)[:, None] & (c < d)[None, :], other=0.0)
    tl.store(OUT_ptr + s.to(tl.int64)[:, None] * dk + c[None, :], x, mask=(s < n)[:, None] & (c < dk)[None, :])
