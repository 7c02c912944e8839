"""Per-pass times of the triton backend on a GPU, for every configuration its autotuner would time,
against cuBLAS (torch.matmul) computing the same product at the same shape.

    python -m bench.triton_tune [--shapes "ResNet-50 s1,ResNet-50 s4"] [--dtypes bfloat16]
                                [--settings highest,high] [--rounds 20] [--out passes.md]
    python -m bench.triton_tune --smoke     # plumbing only (CI): tiny shapes, Triton's interpreter

Per SPEC section-7 shape (prefixes of bench/common.py's names), dtype and torch float32 precision
setting, rows for:

* copy: the rows copy of X, where the layout needs one (L not a multiple of 16);
* stats: the SYRK, each configuration of ``configs.stats_tuning`` (the heuristic first), against
  ``X^T @ X`` in cuBLAS (the full product; the SYRK computes the upper block triangle);
* apply: the GEMM with its epilogue, each configuration of ``configs.apply_tuning``, against
  ``X @ G + grad_y`` in cuBLAS with X in rows;
* backward: the whole backward at the heuristic configurations, and with the autotuner.

TFLOP/s count the floating-point operations each pass needs: the SYRK's n d (d + 1), the GEMM's
2 n d^2. Times are device times (``bench.common.time_rounds``: CUDA events, rounds queued
behind a sleep), medians; compilation and autotuning happen in the warm-up. It changes nothing:
a better configuration is a proposal for ``configs``, then checked by tools/triton_aot_check.py.
On a CPU the kernels run in the interpreter and the times mean nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
from typing import Callable, Iterator, Optional

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported

from vcreg_kernels import _layout  # noqa: E402
from vcreg_kernels._params import Params  # noqa: E402
from vcreg_kernels import triton_kernels as tk  # noqa: E402
from vcreg_kernels.reference import accumulate_dtype  # noqa: E402
from vcreg_kernels.triton_kernels import configs, launch  # noqa: E402
from vcreg_kernels.triton_kernels.precision import matmul_precision  # noqa: E402

from .common import PAPER_SHAPES, LayerShape, make_inputs, time_rounds, warm_up  # noqa: E402

SMOKE_SHAPES = (LayerShape("tokens", (2, 40, 64), -1), LayerShape("NCHW", (2, 72, 4, 7), 1))
DEFAULT_SHAPES = "ResNet-50 s1,ResNet-50 s4"


@contextlib.contextmanager
def forced(kind: str, cfg: Optional[configs.Config]) -> Iterator[None]:
    """The ``kind`` pass ("stats" or "apply") at ``cfg`` alone (no autotuning) within."""
    name = f"{kind}_tuning"
    saved = getattr(configs, name)
    if cfg is not None:
        setattr(configs, name, lambda *args, **kwargs: [cfg])
    try:
        yield
    finally:
        setattr(configs, name, saved)


@contextlib.contextmanager
def autotune(on: bool) -> Iterator[None]:
    saved = launch.AUTOTUNE
    launch.AUTOTUNE = on
    try:
        yield
    finally:
        launch.AUTOTUNE = saved


def describe(cfg: configs.Config) -> str:
    return " ".join(f"{k}={v}" for k, v in cfg.blocks) + f" threads={cfg.threads} stages={cfg.num_stages}"


class Passes:
    """One shape and dtype: its inputs, and a timer."""

    def __init__(self, shape: LayerShape, dtype: torch.dtype, device: torch.device, rounds: int):
        x, grad = make_inputs(shape, dtype, device)
        layout = _layout.choose(x.detach(), shape.dim % x.dim())
        self.x3 = _layout.canonical(x.detach(), layout)
        self.gy3 = _layout.canonical(grad, layout)
        self.dtype, self.device, self.rounds = dtype, device, rounds
        B, d, L = self.x3.shape
        self.n, self.d = B * L, d
        acc = accumulate_dtype(dtype)
        self.G = (torch.randn(d, d, device=device, dtype=acc) * 1e-4).contiguous()
        self.mu = self.x3.to(acc).mean((0, 2))
        self.X = self.x3.permute(0, 2, 1).reshape(self.n, d).contiguous()  # rows, for cuBLAS
        self.Gx = self.G.to(dtype)
        self.gyr = self.gy3.permute(0, 2, 1).reshape(self.n, d).contiguous()

    def time(self, fn: Callable[[], object]) -> float:
        warm_up(fn, self.device, 2)
        return statistics.median(time_rounds(fn, self.device, self.rounds))

    def rows(self, label: str, setting: str) -> list[list]:
        """[pass, configuration, seconds, flops, cuBLAS seconds or None] of every row."""
        out = []
        run = launch._run_for(self.x3)
        op = launch._operand(self.x3, run)
        if op.x is not self.x3:
            out.append(["copy", "-", self.time(lambda: launch._operand(self.x3, run)), 0, None])
        syrk = self.n * self.d * (self.d + 1)
        gemm = 2 * self.n * self.d * self.d
        blas_stats = self.time(lambda: self.X.T @ self.X)
        for cfg in configs.stats_tuning(self.d, run.mode, run.target):
            with forced("stats", cfg):
                out.append(["stats", describe(cfg), self.time(lambda: launch._stats(op, run)), syrk, blas_stats])
        gop, _ = launch._g_operand(self.G, self.mu, self.dtype, op.dk, run)
        blas_apply = self.time(lambda: torch.addmm(self.gyr, self.X, self.Gx))
        for cfg in configs.apply_tuning(self.d, run.mode, run.target):
            with forced("apply", cfg):
                out.append(["apply", describe(cfg),
                            self.time(lambda: launch._apply(self.gy3, self.x3, op, gop, self.mu, run)), gemm, blas_apply])

        def backward():
            return tk.vcreg_backward_triton(self.gy3, self.x3, Params(0.16, 0.01))

        with autotune(False):
            out.append(["backward", "heuristic", self.time(backward), syrk + gemm, None])
        if self.device.type == "cuda":
            with autotune(True):
                out.append(["backward", "autotuned", self.time(backward), syrk + gemm, None])
        return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated prefixes of shape names ('' = all)")
    parser.add_argument("--dtypes", default="bfloat16")
    parser.add_argument("--settings", default="highest", help="torch float32 matmul precision(s), for float32")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one round (CI)")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = SMOKE_SHAPES if args.smoke else PAPER_SHAPES
    if args.shapes and not args.smoke:
        wanted = [w.strip() for w in args.shapes.split(",")]
        shapes = tuple(s for s in shapes if any(s.name.startswith(w) for w in wanted))
    dtypes = [getattr(torch, name.strip()) for name in args.dtypes.split(",")]
    settings = [s.strip() for s in args.settings.split(",")]
    rounds = 1 if args.smoke else args.rounds
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter: times mean nothing)"
    lines = [f"# Triton passes: {name}", "",
             f"torch {torch.__version__}, triton {tk.launch.triton.__version__}; medians of {rounds} rounds; "
             "cuBLAS: torch.matmul at the same shape (stats: X^T X in full; apply: addmm(grad_y, X, G), X in rows)", "",
             "| shape | dtype | pass | configuration | us | TFLOP/s | cuBLAS us | ours / cuBLAS |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: |"]
    print("\n".join(lines), flush=True)
    for shape in shapes:
        for dtype in dtypes:
            for setting in (settings if dtype == torch.float32 else settings[:1]):
                with matmul_precision(setting):
                    passes = Passes(shape, dtype, device, rounds)
                    label = str(dtype).removeprefix("torch.") + (f" {setting}" if dtype == torch.float32 else "")
                    for kind, cfg, t, flops, blas in passes.rows(shape.name, setting):
                        row = (f"| {shape.name} {tuple(shape.shape)} | {label} | {kind} | {cfg} | {t * 1e6:.1f} | "
                               f"{flops / t / 1e12 if flops else 0:.1f} | "
                               + (f"{blas * 1e6:.1f} | {t / blas:.2f} |" if blas else " |  |"))
                        print(row, flush=True)
                        lines.append(row)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
