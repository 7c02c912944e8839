"""Host side of the triton backend: the operand layout, workspaces, and every kernel launch.

A backward is at most five launches, none of which waits for the host:

    copy      only where x3's own layout cannot give 16-byte loads: X to rows (n x dk), dk = d
              rounded up to 16, zero-padded
    stats     split-K SYRK, stream-K schedule: the shifted partial sums of every segment
    finalize  the segments merged per BLOCK_F block (exact centring), mu, G, the terms' partials
    terms     the terms, and G in the apply's operand form (transposed, rounded, scaled), v = mu^T G
    apply     the GEMM grad_y + (X - mu) @ G with its epilogue

The VICReg loss's pair (SPEC section 9) on two branches of one shape:

    pair_stats   each branch's copy (where needed), stats and finalize (M2), then the invariance
                 sum: fixed programs' partial sums over both branches as flat arrays, and one
                 program adding them in order in float64
    pair_apply   each branch's G operand, then one launch over both branches' tiles writing both
                 gradients, the invariance part formed in its epilogue from the tile of each branch

One launch rather than one per branch: both branches' tiles of a sample tile run together, so the
epilogue's read of the other branch's tile comes from L2, and at the loss's small batches (n = 256,
d = 2048: 64 tiles per branch on 132 SMs) one grid fills the wave that each branch alone would
half fill. Its price: both branches' G operands exist at once (d x ld each, in the operand type).

Every launch goes through ``_launch``, which ``recording()`` turns into a list of the compile
cases it would have launched (``aot.aot_cases_for``): what the static checks compile is what a
call launches.

Odd L (49, and 196 in 16-bit): the rows copy, not gathered loads. Read in place, the stats loop
gets 32-64 scalar 2-byte loads per thread per step, which cp.async cannot take: nothing in
flight, 336-592 instructions per 1M MACs and 168 bytes spilled (bfloat16, ResNet-50 s4, sm_90,
Triton 3.8), against 4-8 16-byte cp.async with 2-3 in flight and 104-141 instructions from the
copy; the apply's loop likewise (253 against 160). The copy costs one more read and write of X
(*model*: 2 x 25.7 MB at ResNet-50 s4 in bfloat16, about 17 us at 3 TB/s where it leaves L2).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import os
import struct
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import triton

from .._layout import INT32_MAX, check_apply_operands, check_canonical
from .._params import Params
from ..reference import _check_pair, accumulate_dtype
from . import configs as C
from . import kernels as K
from .precision import precision_mode

AUTOTUNE = os.environ.get("VCREG_TRITON_AUTOTUNE", "1") != "0"  # "0": the heuristic configuration always
# The stats schedule gives each program at least this many sample tiles (BLOCK_S samples each).
STATS_MIN_STEPS = 4
APPLY_MAX_BLOCK_M = 128  # the largest BLOCK_M of configs.apply_tuning


@dataclass(frozen=True)
class AOTCase:
    """One compilation a call launches: kernel, triton signature, constexprs, attrs, launch shape."""

    label: str
    kernel: object
    signature: dict
    constexprs: dict
    attrs: dict
    num_warps: int
    num_stages: int
    grid: tuple = ()


@dataclass(frozen=True)
class _Recorder:
    target: tuple
    num_sms: int
    cases: list


_RECORDER: contextvars.ContextVar[Optional[_Recorder]] = contextvars.ContextVar("vcreg_triton_recorder", default=None)


@contextlib.contextmanager
def recording(target: tuple, num_sms: int) -> Iterator[list]:
    """Within: calls on meta tensors launch nothing and append their AOTCases to the list yielded,
    as on ``target`` ((backend, arch)) with ``num_sms`` SMs, at the heuristic configurations."""
    rec = _Recorder(target, num_sms, [])
    token = _RECORDER.set(rec)
    try:
        yield rec.cases
    finally:
        _RECORDER.reset(token)


# --------------------------------------------------------------------------------------------
# Where and how a call runs.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Run:
    target: Optional[tuple]  # (backend, arch); None: the interpreter
    num_sms: int
    mode: str  # precision.precision_mode
    tune: bool  # autotune (else the heuristic configuration)

    @property
    def emulate(self) -> bool:
        return self.target is None

    @property
    def asm(self) -> bool:
        return self.target is not None and self.target[0] == "cuda"


@functools.lru_cache(maxsize=None)
def _device_target(index: int) -> tuple:
    target = triton.runtime.driver.active.get_current_target()
    return target.backend, target.arch


@functools.lru_cache(maxsize=None)
def _device_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms_cpu() -> int:
    return 2  # the interpreter: a couple of "SMs", so small tests still split into segments


def autotune_allowed() -> bool:
    """Whether a call on a GPU may time configurations (else it runs the heuristic one): not under
    ``torch.use_deterministic_algorithms(True)`` (a tuned choice, and so the summation order, could
    differ between processes), not while a CUDA graph is captured (the timing runs would be
    captured too), not with VCREG_TRITON_AUTOTUNE=0."""
    return AUTOTUNE and not torch.are_deterministic_algorithms_enabled() and not torch.cuda.is_current_stream_capturing()


def _run_for(t: torch.Tensor) -> _Run:
    rec = _RECORDER.get()
    if rec is not None:
        return _Run(rec.target, rec.num_sms, precision_mode(t.dtype, rec.target), False)
    if t.device.type == "cpu":
        return _Run(None, _num_sms_cpu(), precision_mode(t.dtype, None), False)
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    target = _device_target(index)
    return _Run(target, _device_sms(index), precision_mode(t.dtype, target), autotune_allowed())


def _acc_tl(t_dtype: torch.dtype):
    return triton.language.float64 if t_dtype == torch.float64 else triton.language.float32


# --------------------------------------------------------------------------------------------
# Launching (or recording).
# --------------------------------------------------------------------------------------------


def _params(kernel) -> list[tuple[str, bool, bool, str]]:
    """(name, is constexpr, do_not_specialize, annotation) of a @triton.jit kernel's parameters,
    compiled or interpreted."""
    dns = getattr(kernel, "do_not_specialize", None)
    if dns is None:  # the interpreter's function keeps the decorator's arguments
        dns = getattr(kernel, "kwargs", {}).get("do_not_specialize") or []
    out = []
    for i, prm in enumerate(inspect.signature(kernel.fn).parameters.values()):
        annotation = "" if prm.annotation is inspect.Parameter.empty else str(prm.annotation)
        out.append((prm.name, "constexpr" in annotation, i in dns or prm.name in dns, annotation))
    return out


def _signature(kernel, args: tuple, constexprs: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) as Triton's JIT specialises ``args``: pointers "*dtype"
    (16-byte aligned: divisibility 16), ints "i32"/"i64" with divisibility 16 where a multiple of
    16 and the constant 1 where 1 (unless do_not_specialize), floats "fp32" unless annotated."""
    signature, consts, attrs = {}, dict(constexprs), {}
    for i, (name, is_constexpr, no_spec, annotation) in enumerate(_params(kernel)):
        if is_constexpr:
            signature[name] = "constexpr"
            continue
        value = args[i]
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + {torch.float32: "fp32", torch.float64: "fp64", torch.float16: "fp16",
                                     torch.bfloat16: "bf16"}[value.dtype]
            if value.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp64" if "fp64" in annotation else "fp32"
        elif isinstance(value, bool):
            signature[name] = "u1"
        else:
            big = not -(2**31) <= value <= INT32_MAX
            if no_spec:
                signature[name] = "i64" if big else "i32"
            elif value == 1:
                signature[name] = "constexpr"
                consts[name] = 1
            else:
                signature[name] = "i64" if big else "i32"
                if value % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, consts, attrs


def _launch(label: str, kernel, grid: tuple, args: tuple, constexprs: dict, cfg: C.Config, run: _Run) -> None:
    rec = _RECORDER.get()
    launch = cfg.launch(run.target)
    full = dict(cfg.blocks, **constexprs)
    if rec is not None:
        signature, consts, attrs = _signature(kernel, args, full)
        rec.cases.append(AOTCase(label, kernel, signature, consts, attrs, launch["num_warps"], launch["num_stages"],
                                 tuple(grid)))
        return
    kernel[grid](*args, **full, **launch)


_CACHE_RESULTS = "cache_results" in inspect.signature(triton.autotune).parameters


@functools.lru_cache(maxsize=None)
def _tuner(kernel, configs: tuple, target: tuple):
    """A triton.autotune of ``kernel`` over ``configs``, keyed on the size buckets, the layout and
    the precision mode (the dtypes are part of every autotune key); results kept on disk where
    this Triton can (``cache_results``, Triton >= 3.3), else for the process."""
    tconfigs = [triton.Config(dict(c.blocks), **c.launch(target)) for c in configs]
    extra = {"cache_results": True} if _CACHE_RESULTS else {}
    return triton.autotune(configs=tconfigs, key=["d_key", "n_key", "ROWS", "PRECISION"], **extra)(kernel)


def _launch_tuned(label: str, kernel, grid, args: tuple, constexprs: dict, configs: list, run: _Run) -> C.Config:
    """Launch with the autotuner where ``run.tune``, else with ``configs[0]`` (the heuristic);
    returns the configuration that ran."""
    if not run.tune or len(configs) == 1 or _RECORDER.get() is not None:
        first = configs[0]
        _launch(label, kernel, grid(dict(first.blocks)) if callable(grid) else grid, args, constexprs, first, run)
        return first
    tuner = _tuner(kernel, tuple(configs), run.target)
    tuner[grid](*args, **constexprs)
    best = tuner.best_config
    return next(c for c in configs if dict(c.blocks) == best.kwargs and c.launch(run.target)["num_stages"] == best.num_stages
                and c.launch(run.target)["num_warps"] == best.num_warps)


# --------------------------------------------------------------------------------------------
# The operand: how the stats and apply read X.
# --------------------------------------------------------------------------------------------


def _operand_layout(x3: torch.Tensor) -> Optional[str]:
    """"rows" or "bdl" where the kernels read x3 in place with 16-byte loads (SPEC's fast layouts
    with d, resp. L, a multiple of 16), None where it is first copied to rows. The one place that
    looks at x3's strides."""
    B, d, L = x3.shape
    if x3.data_ptr() % 16 != 0:
        return None
    if L == 1 and (d == 1 or x3.stride(1) == 1) and (B == 1 or x3.stride(0) == d) and d % 16 == 0:
        return "rows"
    if x3.is_contiguous() and L % 16 == 0 and d * L <= INT32_MAX and _tile_offsets_fit(x3):
        return "bdl"
    return None


@dataclass(frozen=True)
class _Operand:
    x: torch.Tensor  # x3 itself, or its rows copy
    rows: bool
    n: int
    d: int  # features
    dk: int  # operand columns: d, or the copy's row length (d rounded up to 16)
    L: int  # samples per image in the operand (1 for rows)
    stride: int  # row stride (rows) or d*L (bdl)


def _operand(x3: torch.Tensor, run: _Run, layout: Optional[str] = "auto") -> _Operand:
    """x3 as the stats and apply read it: in place in ``layout`` ("auto": ``_operand_layout``'s
    choice), or (None) its rows copy."""
    B, d, L = x3.shape
    n = B * L
    if n > INT32_MAX:
        raise ValueError(f"vcreg triton backend: {n} samples; at most 2^31 - 1 are supported")
    if layout == "auto":
        layout = _operand_layout(x3)
    if layout == "rows":
        return _Operand(x3, True, n, d, d, 1, d)
    if layout == "bdl":
        return _Operand(x3, False, n, d, d, L, d * L)
    dk = triton.cdiv(d, 16) * 16
    xr = torch.empty((n, dk), dtype=x3.dtype, device=x3.device)
    cfg = C.copy_config(run.target)
    grid = (triton.cdiv(n, cfg["BLOCK_S"]), triton.cdiv(dk, cfg["BLOCK_D"]))
    _launch("stats copy", K._copy_kernel, grid, (x3, xr, n, d, dk, L, *x3.stride()), {}, cfg, run)
    return _Operand(xr, True, n, d, dk, 1, dk)


# --------------------------------------------------------------------------------------------
# The passes.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Segments:
    """The stats pass's output: per segment a BLOCK_D^2 tile Q (shifted Gram), shifts K and sums S (2 x BLOCK_D), count N."""

    Q: torch.Tensor
    SK: torch.Tensor
    SS: torch.Tensor
    SN: torch.Tensor
    n: int
    d: int
    programs: int
    block_d: int
    block_s: int


def _stats(op: _Operand, run: _Run) -> _Segments:
    acc = accumulate_dtype(op.x.dtype)
    tuning = C.stats_tuning(op.d, run.mode, run.target)
    first = tuning[0]
    bd = first["BLOCK_D"]
    nb = triton.cdiv(op.d, bd)
    n_pairs = nb * (nb + 1) // 2
    work = n_pairs * triton.cdiv(op.n, first["BLOCK_S"])
    programs = max(1, min(run.num_sms * first.per_sm, work // STATS_MIN_STEPS))
    slots = programs + n_pairs  # segment g + pair: distinct for every segment
    dev = op.x.device
    Q = torch.empty((slots, bd, bd), dtype=acc, device=dev)
    SK = torch.empty((slots, 2, bd), dtype=acc, device=dev)
    SS = torch.empty((slots, 2, bd), dtype=acc, device=dev)
    SN = torch.empty((slots,), dtype=acc, device=dev)
    args = (op.x, Q, SK, SS, SN, op.n, op.dk, op.L, op.stride, programs, C.bucket(op.d), C.bucket(op.n))
    constexprs = dict(ROWS=op.rows, PRECISION=run.mode, ACC=_acc_tl(acc), EMULATE=run.emulate, ASM=run.asm)
    chosen = _launch_tuned("stats", K._stats_kernel, (programs,), args, constexprs, tuning, run)
    return _Segments(Q, SK, SS, SN, op.n, op.d, programs, bd, chosen["BLOCK_S"])


def _split64(x: float) -> tuple[float, float]:
    """(hi, lo) with hi the float32 value nearest x and hi + lo == x to ~2^-48."""
    x = float(x)
    try:
        hi = struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:  # beyond float32's range: the interpreter could not pass it anyway
        return x, 0.0
    return hi, x - hi


def _finalize(seg: _Segments, run: _Run, write_g: bool, alpha=0.0, beta=0.0, eps=1.0, gamma=0.0, delta=None):
    d, dev, acc = seg.d, seg.Q.device, seg.Q.dtype
    cfg = C.finalize_config(d, run.mode, run.target)
    nbf = triton.cdiv(d, cfg["BLOCK_F"])
    blocks = nbf * (nbf + 1) // 2
    out = torch.empty((d, d), dtype=acc, device=dev)
    mu = torch.empty((d,), dtype=acc, device=dev)
    parts = torch.empty((blocks, 2), dtype=acc, device=dev)
    amax = torch.empty((blocks,), dtype=acc, device=dev)
    args = (seg.Q, seg.SK, seg.SS, seg.SN, out, mu, parts, amax, seg.n, d, seg.programs,
            *_split64(alpha), *_split64(beta), *_split64(eps), *_split64(gamma), *_split64(1.0 if delta is None else delta))
    constexprs = dict(BLOCK_D=seg.block_d, BLOCK_S=seg.block_s, ACC=_acc_tl(acc), WRITE_G=write_g,
                      HAS_DELTA=delta is not None)
    _launch("finalize" + (" G" if write_g else " M2"), K._finalize_kernel, (blocks,), args, constexprs, cfg, run)
    return out, mu, parts, amax


@dataclass(frozen=True)
class _GOperand:
    GH: torch.Tensor  # (d, ld): G^T in the operand type
    GL: torch.Tensor  # the low parts for "bf16x3" (else GH)
    V: torch.Tensor  # mu^T GH (16-bit X)
    SCALE: torch.Tensor  # 2^-k of the float16 scale, else 1
    ld: int


_OPERAND_DTYPE = {"bf16x3": torch.bfloat16, "bf16": torch.bfloat16, "fp16": torch.float16,
                  "tf32": torch.float32, "ieee": torch.float32, "fp64": torch.float64}


def _g_operand(G: torch.Tensor, mu: torch.Tensor, x_dtype: torch.dtype, dk: int, run: _Run,
               amax: Optional[torch.Tensor] = None, parts: Optional[torch.Tensor] = None, label: str = "apply operand"):
    """Launch the terms kernel: G as the apply's operand (and the terms, where ``parts`` is given)."""
    d, dev = G.shape[0], G.device
    acc = accumulate_dtype(x_dtype)
    mode = run.mode
    ld = triton.cdiv(dk, 64) * 64
    op_dtype = torch.float32 if run.emulate and _OPERAND_DTYPE[mode] == torch.bfloat16 else _OPERAND_DTYPE[mode]
    GH = torch.empty((d, ld), dtype=op_dtype, device=dev)
    GL = torch.empty((d, ld), dtype=op_dtype, device=dev) if mode == "bf16x3" else GH
    algebraic = x_dtype in (torch.float16, torch.bfloat16)
    V = torch.empty((d,), dtype=acc, device=dev)
    SCALE = torch.empty((1,), dtype=acc, device=dev)
    terms = torch.empty((2,), dtype=acc, device=dev)
    scaled = mode == "fp16"
    if scaled and amax is None:  # the caller's G: max |G| over its finite entries
        amax = torch.where(G.isfinite(), G.abs(), 0.0).amax().reshape(1)
    if amax is None:
        amax = SCALE  # unread
    with_terms = parts is not None
    cfg = C.operand_config(d, mode, run.target)
    args = (G, mu, amax, parts if with_terms else terms, terms, GH, GL, V, SCALE, d, ld, amax.numel(),
            parts.shape[0] if with_terms else 0)
    constexprs = dict(PRECISION=mode, ACC=_acc_tl(acc), EMULATE=run.emulate, ASM=run.asm, SCALED=scaled,
                      ALGEBRAIC=algebraic)
    _launch("terms" if with_terms else label, K._operand_kernel, (triton.cdiv(d, cfg["BLOCK_J"]),), args,
            constexprs, cfg, run)
    return _GOperand(GH, GL, V, SCALE, ld), terms


def _tile_offsets_fit(t: torch.Tensor) -> bool:
    """Whether the apply epilogue's int32 offsets, from a tile's first sample over its
    ``APPLY_MAX_BLOCK_M`` samples and every column, fit t's (B, d, L) strides."""
    B, d, L = t.shape
    sb, sd, sl = (abs(v) for v in t.stride())
    if B == 1 or sb == L * sl:  # sample s at s * sl
        span = (APPLY_MAX_BLOCK_M - 1) * sl
    else:
        span = ((APPLY_MAX_BLOCK_M - 1) // L + 1) * sb + (L - 1) * sl
    return span + (d - 1) * sd <= INT32_MAX


def _apply(gy3: torch.Tensor, x3: torch.Tensor, op: _Operand, gop: _GOperand, mu: torch.Tensor, run: _Run):
    B, d, L = x3.shape
    acc = accumulate_dtype(x3.dtype)
    tuning = C.apply_tuning(d, run.mode, run.target, op.n, run.num_sms, gathered=op.x is not x3)
    out = torch.empty_like(x3, dtype=gy3.dtype)  # x3's strides where x3 is dense
    if not _tile_offsets_fit(out):  # written with samples in rows instead, then put in x3's strides
        out = torch.empty((B, L, d), dtype=gy3.dtype, device=x3.device).transpose(1, 2)
        if not _tile_offsets_fit(out):
            raise ValueError(f"vcreg triton backend: {d} features are more than a tile's int32 offsets reach")
    if gy3.stride() != out.stride():  # grad_y is read in grad_x's strides
        gy3 = torch.empty_like(out).copy_(gy3)
    n = op.n
    args = (op.x, gop.GH, gop.GL, mu, gop.V, gop.SCALE, gy3, out, n, n // op.L, d, op.dk, gop.ld, op.L, op.stride,
            L, *out.stride(), C.bucket(d), C.bucket(n))
    constexprs = dict(ROWS=op.rows, PRECISION=run.mode, ACC=_acc_tl(acc),
                      ALGEBRAIC=x3.dtype in (torch.float16, torch.bfloat16), EMULATE=run.emulate, ASM=run.asm)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_M"]) * triton.cdiv(d, meta["BLOCK_N"]),)

    _launch_tuned("apply", K._apply_kernel, grid, args, constexprs, tuning, run)
    if out.stride() != torch.empty_like(x3, device="meta").stride():
        out = torch.empty_like(x3, dtype=gy3.dtype).copy_(out)
    return out


# --------------------------------------------------------------------------------------------
# The VICReg pair's own passes.
# --------------------------------------------------------------------------------------------


def _invariance(za3: torch.Tensor, zb3: torch.Tensor, run: _Run) -> torch.Tensor:
    """sum (Z_a - Z_b)^2 (0-dim, accumulate dtype) of two contiguous tensors of one shape: fixed
    programs' float64 partial sums, then their fixed-order sum (two launches, no atomics)."""
    acc = accumulate_dtype(za3.dtype)
    count = za3.numel()
    cfg = C.invariance_config(run.target)
    tiles = triton.cdiv(count, cfg["BLOCK"])
    programs = max(1, min(tiles, run.num_sms * cfg.per_sm))
    parts = torch.empty((programs,), dtype=torch.float64, device=za3.device)
    out = torch.empty((), dtype=acc, device=za3.device)
    _launch("pair_stats invariance", K._invariance_kernel, (programs,), (za3, zb3, parts, count, programs),
            dict(ACC=_acc_tl(acc)), cfg, run)
    _launch("pair_stats invariance sum", K._sum_kernel, (1,), (parts, out, programs), {}, C.sum_config(run.target), run)
    return out


def _pair_operands(za3: torch.Tensor, zb3: torch.Tensor, run: _Run) -> tuple[_Operand, _Operand]:
    """Both branches as the pair apply reads them, in one form (the kernel's layout arguments are
    shared): in place where both allow the same layout, else both rows copies."""
    layout = _operand_layout(za3)
    if _operand_layout(zb3) != layout:  # the branches' alignments differ
        layout = None
    return _operand(za3, run, layout), _operand(zb3, run, layout)


def _pair_apply(g: torch.Tensor, za3: torch.Tensor, zb3: torch.Tensor, op_a: _Operand, op_b: _Operand,
                gop_a: _GOperand, gop_b: _GOperand, mu_a: torch.Tensor, mu_b: torch.Tensor, c: torch.Tensor, run: _Run):
    B, d, L = za3.shape
    acc = accumulate_dtype(za3.dtype)
    gathered = op_a.x is not za3
    # The product's tiles are those of one apply with twice the samples.
    tuning = C.apply_tuning(d, run.mode, run.target, 2 * op_a.n, run.num_sms, gathered=gathered, pair=True)
    out_a = torch.empty_like(za3)
    if not _tile_offsets_fit(out_a):  # written with samples in rows instead, then put in z's strides
        out_a = torch.empty((B, L, d), dtype=za3.dtype, device=za3.device).transpose(1, 2)
        if not _tile_offsets_fit(out_a):
            raise ValueError(f"vcreg triton backend: {d} features are more than a tile's int32 offsets reach")
    out_b = torch.empty_like(out_a)
    za_e, zb_e = za3, zb3  # z as the epilogue reads it: in the gradients' strides
    if za3.stride() != out_a.stride():
        za_e, zb_e = torch.empty_like(out_a).copy_(za3), torch.empty_like(out_a).copy_(zb3)
    n = op_a.n
    args = (op_a.x, op_b.x, gop_a.GH, gop_a.GL, gop_b.GH, gop_b.GL, mu_a, mu_b, gop_a.V, gop_b.V, gop_a.SCALE,
            gop_b.SCALE, za_e, zb_e, g, c, out_a, out_b, n, n // op_a.L, d, op_a.dk, gop_a.ld, op_a.L, op_a.stride,
            L, *out_a.stride(), C.bucket(d), C.bucket(n))
    constexprs = dict(ROWS=op_a.rows, PRECISION=run.mode, ACC=_acc_tl(acc),
                      ALGEBRAIC=za3.dtype in (torch.float16, torch.bfloat16), EMULATE=run.emulate, ASM=run.asm)

    def grid(meta):
        return (2 * triton.cdiv(n, meta["BLOCK_M"]) * triton.cdiv(d, meta["BLOCK_N"]),)

    _launch_tuned("pair_apply", K._pair_apply_kernel, grid, args, constexprs, tuning, run)
    if out_a.stride() != za3.stride():
        out_a, out_b = torch.empty_like(za3).copy_(out_a), torch.empty_like(zb3).copy_(out_b)
    return out_a, out_b


# --------------------------------------------------------------------------------------------
# Entry points (vcreg_kernels.dispatch).
# --------------------------------------------------------------------------------------------


def vcreg_stats_triton(x3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu, M2): column means (d) and M2 = Xc^T Xc (d x d, symmetric) of the canonical x3: (B, d, L),
    in the accumulate dtype."""
    check_canonical(x3)
    run = _run_for(x3)
    op = _operand(x3, run)
    M2, mu, _, _ = _finalize(_stats(op, run), run, write_g=False)
    return mu, M2


def vcreg_apply_triton(gy3: torch.Tensor, x3: torch.Tensor, G: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """grad_y + (X - mu) @ G on canonical (B, d, L) tensors, in grad_y's dtype."""
    check_canonical(x3, gy3, min_samples=0)
    check_apply_operands(x3, G, mu)
    run = _run_for(x3)
    acc = accumulate_dtype(x3.dtype)
    G = G.to(acc).contiguous()
    mu = mu.to(acc).contiguous()
    op = _operand(x3, run)
    gop, _ = _g_operand(G, mu, x3.dtype, op.dk, run)
    return _apply(gy3, x3, op, gop, mu, run)


def vcreg_backward_triton(gy3: torch.Tensor, x3: torch.Tensor, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
    """grad_x = grad_y + Xc @ G and tensor([l_var, l_cov]) on canonical (B, d, L) tensors."""
    check_canonical(x3, gy3, min_samples=2)
    run = _run_for(x3)
    op = _operand(x3, run)
    G, mu, parts, amax = _finalize(_stats(op, run), run, True, *params.values())
    gop, terms = _g_operand(G, mu, x3.dtype, op.dk, run, amax=amax, parts=parts)
    return _apply(gy3, x3, op, gop, mu, run), terms


def vicreg_pair_stats_triton(za3: torch.Tensor, zb3: torch.Tensor):
    """(mu_a, M2_a, mu_b, M2_b, sum (Z_a - Z_b)^2) of two canonical (B, d, L) tensors of one shape
    and dtype, in the accumulate dtype: each branch's stats pass (as ``vcreg_stats_triton``) and
    the invariance sum from one more read of both."""
    _check_pair(za3, zb3)
    run = _run_for(za3)
    mu_a, M2_a = vcreg_stats_triton(za3)
    mu_b, M2_b = vcreg_stats_triton(zb3)
    return mu_a, M2_a, mu_b, M2_b, _invariance(za3, zb3, run)


def vicreg_pair_apply_triton(g: torch.Tensor, za3: torch.Tensor, zb3: torch.Tensor, G_a: torch.Tensor,
                             mu_a: torch.Tensor, G_b: torch.Tensor, mu_b: torch.Tensor, c: torch.Tensor):
    """(grad_a, grad_b), canonical in z's dtype: grad_a = g (c (Z_a - Z_b) + (Z_a - mu_a) @ G_a), and
    likewise b with c (Z_b - Z_a); g, c 0-dim tensors. One launch writes both (``_pair_apply_kernel``),
    after G_a and G_b are put in the operand form: no n x d temporary beyond the gradients where
    both branches are read in place."""
    _check_pair(za3, zb3, min_samples=0)
    check_apply_operands(za3, G_a, mu_a)
    check_apply_operands(zb3, G_b, mu_b)
    for name, t in (("g", g), ("c", c)):
        if t.numel() != 1 or not t.is_floating_point():
            raise RuntimeError(f"vcreg: {name} must be a one-element floating point tensor, got {tuple(t.shape)} {t.dtype}")
    if za3.shape[0] * za3.shape[2] == 0:
        return torch.empty_like(za3), torch.empty_like(zb3)
    run = _run_for(za3)
    acc = accumulate_dtype(za3.dtype)
    G_a, G_b, mu_a, mu_b = (t.to(acc).contiguous() for t in (G_a, G_b, mu_a, mu_b))
    g, c = g.to(acc).reshape(()), c.to(acc).reshape(())
    op_a, op_b = _pair_operands(za3, zb3, run)
    gop_a, _ = _g_operand(G_a, mu_a, za3.dtype, op_a.dk, run, label="pair_apply operand")
    gop_b, _ = _g_operand(G_b, mu_b, zb3.dtype, op_b.dk, run, label="pair_apply operand")
    return _pair_apply(g, za3, zb3, op_a, op_b, gop_a, gop_b, mu_a, mu_b, c, run)
