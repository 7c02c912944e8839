"""Sweep the triton backend's block configurations and launch plans on a GPU, and print, per SPEC
section 7 layer shape and dtype, how the fastest candidate compares with what the table
(``vcreg_kernels.triton_kernels.CONFIGS``) picks today. It changes nothing: a winner is a proposal,
to be copied into ``CONFIGS`` and then checked by ``tools/triton_aot_check.py`` (whose cases follow
the table: registers, spills) and by the test suite on the GPU.

    python -m bench.triton_tune [--shapes ViT,ResNet-50 s4,...] [--dtypes float32,bfloat16]
                                [--rounds 20] [--out results.md]
    python -m bench.triton_tune --smoke     # plumbing only: tiny shapes, two candidates per kernel

Two passes are timed separately, each with the other at the table's choice:

* stats (``_stats``: the shifted X^T X over sample chunks): the block configurations of
  ``STATS_CANDIDATES``, then, for the fastest, the chunking targets of ``STATS_PLANS``;
* apply (``vcreg_apply_triton``: grad_y + (X - mu) @ G): ``APPLY_CANDIDATES``, then ``APPLY_PLANS``.

Every candidate's output is first compared with the table's (a candidate that computes something
else is reported as wrong, not timed). Times are device times (``bench.common.time_rounds``: CUDA
events, rounds queued behind a sleep). Compilation happens in the warm-up, outside the timing.
The candidates are for d > 64, the table entry that serves every SPEC shape; on a CPU the
kernels run in Triton's interpreter and the times mean nothing. A full sweep compiles a few
hundred kernels (each candidate per dtype and layout): within one 10-minute GPU call, sweep one
network at a time (``--shapes ResNet-50``).
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import statistics
import sys
from typing import Callable, Iterator, Optional

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported

from vcreg_kernels import _layout  # noqa: E402
from vcreg_kernels import triton_kernels as tk  # noqa: E402
from vcreg_kernels.reference import accumulate_dtype  # noqa: E402

from .common import PAPER_SHAPES, LayerShape, make_inputs, time_rounds, warm_up  # noqa: E402

_cfg = tk._cfg
STATS_CANDIDATES = [_cfg(threads, stages, BLOCK_D=bd, BLOCK_S=bs)
                    for bd, bs, threads, stages in itertools.product((64, 128), (16, 32, 64), (128, 256), (2, 3))]
APPLY_CANDIDATES = [_cfg(threads, stages, BLOCK_J=bj, BLOCK_K=bk, BLOCK_S=bs)
                    for bj, bk, bs, threads, stages in itertools.product((64, 128), (16, 32), (32, 64, 128), (256,), (1, 2))]
# Launch plans: (STATS_PROGRAMS_PER_SM, STATS_MIN_SAMPLES_PER_FEATURE) and APPLY_PROGRAMS_PER_SM.
STATS_PLANS = [(1, 2), (2, 2), (4, 2), (2, 1), (4, 1), (8, 1)]
APPLY_PLANS = [2, 4, 8, 16]

SMOKE_SHAPES = (LayerShape("tokens", (2, 40, 72), -1), LayerShape("NCHW", (2, 72, 4, 4), 1))


def _largest_key(kernel: str, dtype: torch.dtype) -> tuple[dict, int]:
    table = tk.CONFIGS[kernel][tk._dclass(dtype)]
    return table, max(table)


@contextlib.contextmanager
def patched(kernel: str, dtype: torch.dtype, cfg: Optional[tk.Config] = None, **plan) -> Iterator[None]:
    """The table with ``cfg`` in the entry that serves d > 64 of ``kernel`` and ``dtype``'s class,
    and the module-level plan constants in ``plan`` set; restored afterwards."""
    table, key = _largest_key(kernel, dtype)
    saved_cfg, saved_plan = table[key], {name: getattr(tk, name) for name in plan}
    if cfg is not None:
        table[key] = cfg
    for name, value in plan.items():
        setattr(tk, name, value)
    try:
        yield
    finally:
        table[key] = saved_cfg
        for name, value in saved_plan.items():
            setattr(tk, name, value)


def _describe(cfg: tk.Config) -> str:
    return " ".join(f"{k}={v}" for k, v in cfg.blocks) + f" threads={cfg.threads} stages={cfg.num_stages}"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


class Sweep:
    """The candidates of one pass at one shape and dtype."""

    def __init__(self, shape: LayerShape, dtype: torch.dtype, device: torch.device, rounds: int):
        x, grad = make_inputs(shape, dtype, device)
        layout = _layout.choose(x.detach(), shape.dim % x.dim())
        self.x3 = _layout.canonical(x.detach(), layout)
        self.gy3 = _layout.canonical(grad, layout)
        self.dtype, self.device, self.rounds = dtype, device, rounds
        d = self.x3.shape[1]
        acc = accumulate_dtype(dtype)
        self.G = (torch.randn(d, d, device=device, dtype=acc) * 1e-4).contiguous()
        self.mu = self.x3.to(acc).mean((0, 2))
        # The table's own outputs: what every candidate must reproduce.
        self.want_stats = self.stats_out()
        self.want_apply = self.apply_out()

    def stats_out(self) -> torch.Tensor:
        return tk._finalize(tk._stats(self.x3))[0]  # M2

    def apply_out(self) -> torch.Tensor:
        return tk.vcreg_apply_triton(self.gy3, self.x3, self.G, self.mu)

    def time(self, fn: Callable[[], object]) -> float:
        warm_up(fn, self.device, 2)
        return statistics.median(time_rounds(fn, self.device, self.rounds))

    def candidate(self, kernel: str, cfg: Optional[tk.Config], **plan) -> tuple[Optional[float], str]:
        """(median seconds or None, note) of one candidate."""
        out_fn, want = (self.stats_out, self.want_stats) if kernel == "stats" else (self.apply_out, self.want_apply)
        tol = 1e-4 if self.dtype == torch.float32 else 2e-2
        with patched(kernel, self.dtype, cfg, **plan):
            try:
                err = _rel(out_fn(), want)
            except Exception as exc:  # a configuration this Triton cannot compile, or resources
                return None, f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
            if not err <= tol:
                return None, f"wrong: relative difference {err:.2g} from the table's result"
            run = (lambda: tk._stats(self.x3)) if kernel == "stats" else self.apply_out
            return self.time(run), ""


def sweep(shape: LayerShape, dtype: torch.dtype, device: torch.device, rounds: int, smoke: bool) -> list[str]:
    """Markdown rows: per pass, the table's choice and the fastest candidate (config, then plan)."""
    s = Sweep(shape, dtype, device, rounds)
    rows = []
    for kernel, candidates, plans, plan_names in (
        ("stats", STATS_CANDIDATES, STATS_PLANS, ("STATS_PROGRAMS_PER_SM", "STATS_MIN_SAMPLES_PER_FEATURE")),
        ("apply", APPLY_CANDIDATES, APPLY_PLANS, ("APPLY_PROGRAMS_PER_SM",)),
    ):
        table, key = _largest_key(kernel, dtype)
        current = table[key]
        current_plan = tuple(getattr(tk, name) for name in plan_names)
        base, _ = s.candidate(kernel, None)
        results = [(base, current, current_plan)]
        problems = []
        for cfg in (candidates[:2] if smoke else candidates):
            t, note = s.candidate(kernel, cfg)
            if t is None:
                problems.append(f"{_describe(cfg)}: {note}")
            else:
                results.append((t, cfg, current_plan))
        _, best_cfg, _ = min(results, key=lambda r: r[0])
        for plan in (plans[:2] if smoke else plans):
            values = plan if isinstance(plan, tuple) else (plan,)
            t, note = s.candidate(kernel, best_cfg, **dict(zip(plan_names, values)))
            if t is not None:
                results.append((t, best_cfg, values))
        best_t, best_cfg, best_plan = min(results, key=lambda r: r[0])
        rows.append(
            f"| {shape.name} {tuple(shape.shape)} | {str(dtype).removeprefix('torch.')} | {kernel} | "
            f"{base * 1e6:.1f} | {_describe(current)} {current_plan} | {best_t * 1e6:.1f} | "
            f"{_describe(best_cfg)} {best_plan} | {base / best_t:.2f} |"
        )
        rows.extend(f"|  |  | {kernel} |  | not timed: {p} |  |  |  |" for p in problems)
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="", help="comma-separated prefixes of shape names (default: all)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, two candidates per kernel (CI)")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = SMOKE_SHAPES if args.smoke else PAPER_SHAPES
    if args.shapes:
        wanted = [w.strip() for w in args.shapes.split(",")]
        shapes = tuple(s for s in shapes if any(s.name.startswith(w) for w in wanted))
    dtypes = [getattr(torch, name.strip()) for name in args.dtypes.split(",")]
    if device.type == "cpu":  # the interpreter has no bfloat16
        dtypes = [t for t in dtypes if t != torch.bfloat16] or [torch.float32]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter: times mean nothing)"
    rounds = 1 if args.smoke else args.rounds
    lines = [f"# Triton configuration sweep: {name}", "",
             f"torch {torch.__version__}, triton {tk.triton.__version__}; medians of {rounds} rounds; "
             "plan = (STATS_PROGRAMS_PER_SM, STATS_MIN_SAMPLES_PER_FEATURE) or (APPLY_PROGRAMS_PER_SM,)", "",
             "| shape | dtype | pass | table us | table's choice | best us | best | speed-up |",
             "| --- | --- | --- | ---: | --- | ---: | --- | ---: |"]
    print("\n".join(lines), flush=True)
    for shape in shapes:
        for dtype in dtypes:
            rows = sweep(shape, dtype, device, rounds, args.smoke)
            print("\n".join(rows), flush=True)
            lines += rows
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
