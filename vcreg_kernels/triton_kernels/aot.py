"""Ahead-of-time compile cases (tools/triton_aot_check.py): what the host code launches.

``aot_cases_for(shape, dim, dtype, target, num_sms)``: exactly the launches of one backward of a
contiguous tensor of that shape (``dim`` the feature dimension; its (B, d, L) view as the
dispatcher hands it over) on ``target`` with ``num_sms`` SMs, under the current torch precision
setting, at the heuristic configurations. It runs the host code itself on meta tensors with the
launches recorded instead of made.

``aot_cases_for(..., vicreg=True)``: instead, the launches of one VICReg loss (SPEC section 9)
on two branches of that shape: the pair statistics (each branch's stats and finalize, the
invariance sum) and the pair apply (each branch's G operand, the one launch writing both
gradients).

``aot_cases(target)``: every configuration the host code can launch on ``target``: each dtype
and precision setting, both operand layouts, the block sizes by d, the autotuner's lists, and the
d, L and alignment variants Triton's JIT specialises; for the layer's backward and for the pair.
"""
from __future__ import annotations

import itertools
from typing import Iterator

import torch

from .. import _layout
from .._params import Params
from . import configs as C
from . import launch as Lh
from .launch import AOTCase
from .precision import SETTINGS, matmul_precision

AOT_TARGETS = (("cuda", 80), ("cuda", 90), ("hip", "gfx906"), ("hip", "gfx90a"), ("hip", "gfx942"))


def _canonical(shape, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """The canonical (B, d, L) tensor the dispatcher hands over for a contiguous tensor of
    ``shape`` with features along ``dim`` (``_layout``), on the meta device."""
    x = torch.empty(shape, dtype=dtype, device="meta")
    return _layout.canonical(x, _layout.choose(x, dim % len(shape)))


def _record(x3: torch.Tensor, target: tuple, num_sms: int) -> list[AOTCase]:
    gy3 = torch.empty_like(x3)
    with Lh.recording(target, num_sms) as cases:
        Lh.vcreg_backward_triton(gy3, x3, Params(0.5, 0.5))
    return cases


def _record_pair(z3: torch.Tensor, target: tuple, num_sms: int) -> list[AOTCase]:
    """The launches of the VICReg pair's statistics and apply on two branches like ``z3``."""
    acc = torch.float64 if z3.dtype == torch.float64 else torch.float32
    d = z3.shape[1]
    G = torch.empty((d, d), dtype=acc, device="meta")
    mu = torch.empty((d,), dtype=acc, device="meta")
    scalar = torch.empty((), dtype=acc, device="meta")
    zb3 = torch.empty_like(z3)
    with Lh.recording(target, num_sms) as cases:
        Lh.vicreg_pair_stats_triton(z3, zb3)
        Lh.vicreg_pair_apply_triton(scalar, z3, zb3, G, mu, G, mu, scalar)
    return cases


def aot_cases_for(shape, dim: int, dtype: torch.dtype, target: tuple, num_sms: int,
                  tuning: bool = False, vicreg: bool = False) -> list[AOTCase]:
    """The compile cases of one backward of a contiguous tensor of ``shape`` with features along
    ``dim``, on ``target`` ((backend, arch)) with ``num_sms`` SMs (labels: "stats ...",
    "finalize ...", "terms", "apply"); ``tuning``: and the autotuner's other configurations.
    ``vicreg``: those of one VICReg loss on two such branches instead (labels: "stats ...",
    "finalize M2", "pair_stats ...", "pair_apply ...")."""
    x3 = _canonical(shape, dim, dtype)
    record = _record_pair if vicreg else _record
    cases = record(x3, target, num_sms)
    return cases + list(_alternatives(cases, x3.shape[1], target, True)) if tuning else cases


def _variants(dtype: torch.dtype) -> Iterator[tuple]:
    """(shape, dim) inputs that reach every host-side choice: rows and bdl operands, the
    finalize's block sizes (d <= 256 and above), the rows copy (L not a multiple of 16) with its
    unaligned grad_x epilogue, and d = 1 (a constant to Triton's JIT)."""
    for d in (96, 320):
        yield (64, d), -1
        yield (4, d, 32), 1
    yield (64, 48, 7), 1
    if dtype in (torch.float32, torch.bfloat16):
        yield (64, 1, 1), 1


def aot_cases(target: tuple, tuning: bool = True) -> Iterator[AOTCase]:
    """Every kernel x configuration x dtype x precision x layout the host code can launch on
    ``target``, one case per distinct compilation; ``tuning``: with the autotuner's alternatives
    (the autotuner skips a configuration that fails to compile on the user's GPU)."""
    seen = set()

    def key(c: AOTCase):
        return (c.kernel, tuple(sorted(c.signature.items())), tuple(sorted((k, str(v)) for k, v in c.constexprs.items())),
                tuple(sorted(c.attrs)), c.num_warps, c.num_stages)

    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for setting in (SETTINGS if dtype == torch.float32 else SETTINGS[:1]):
            with matmul_precision(setting):
                for shape, dim in _variants(dtype):
                    for record in (_record, _record_pair):
                        recorded = record(_canonical(shape, dim, dtype), target, 132)
                        for case in itertools.chain(recorded, _alternatives(recorded, shape[dim], target, tuning)):
                            k = key(case)
                            if k not in seen:
                                seen.add(k)
                                yield case


def _alternatives(recorded: list, d: int, target: tuple, tuning: bool) -> Iterator[AOTCase]:
    """Other configurations of the recorded stats and apply (or pair apply) launches: the tiles
    the apply's heuristic chooses between (by n and the SM count), and with ``tuning`` the
    autotuner's lists."""
    for case in recorded:
        if case.label not in ("stats", "apply", "pair_apply"):
            continue
        mode = case.constexprs["PRECISION"]
        if case.label == "stats":
            others = C.stats_tuning(d, mode, target)[1:] if tuning else []
        else:
            gathered = recorded[0].label == "stats copy"
            pair = case.label == "pair_apply"
            others = (C.apply_tuning(d, mode, target, gathered=gathered, pair=pair) if tuning
                      else C.apply_choices(d, mode, target, gathered, pair))
        for cfg in others:
            launch = cfg.launch(target)
            yield AOTCase(f"{case.label} {_describe(cfg)}", case.kernel, case.signature,
                          dict(case.constexprs, **dict(cfg.blocks)), case.attrs, launch["num_warps"], launch["num_stages"],
                          case.grid)


def _describe(cfg: C.Config) -> str:
    return " ".join(f"{k}={v}" for k, v in cfg.blocks) + f" threads={cfg.threads} stages={cfg.num_stages}"
