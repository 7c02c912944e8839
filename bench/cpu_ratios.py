"""The `cpu` backend against its yardsticks, one layer's forward+backward, interleaved.

For each shape (SPEC section 7's activations at batch 4 and 16), in the same run and interleaved
round by round, the time of

* ours:  ``y = vcreg_kernels.vcreg(x, ...)`` then ``y.backward(grad_y)`` (the backend forced; the
  functional users call, as the report's layer level times it);
* eager: the same exact gradient written the obvious way in eager PyTorch, an identity
  ``torch.autograd.Function`` whose backward moves the feature axis last, flattens, demeans and
  forms ``C = Xc.T @ Xc / (n - 1)``, G (``reference.gradient_matrix``) and ``grad_y + Xc @ G``;
* naive: ``vcreg_loss(x, ...)`` added to the loss and backpropagated (x's gradient is then
  grad_y + d(loss)/dx, as ours);
* blas:  the two products the backward cannot avoid, ``X^T X`` and ``X @ G`` by ``torch.mm``
  on an already flattened contiguous copy X (n x d) of x: the floor;

and the ratios of the medians ours/eager (target <= 1), ours/blas (target <= 1.3) and ours/naive.
x's gradient from the previous round is dropped before each timed call, outside the timer.
bench/report.py prints them, in float32, with p20 and p80 beside each median; ``--dtype bfloat16``
runs every case in bfloat16 (the floor's products then take torch's bfloat16 path).

    .venv/bin/python -m bench.cpu_ratios [--reps 20] [--threads N] [--batch 4 16] [--dtype float32]
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Callable

import torch

import vcreg_kernels
from vcreg_kernels import dispatch
from vcreg_kernels._params import Params
from vcreg_kernels.reference import gradient_matrix

from .common import ALPHA, BETA, EPS, PAPER_SHAPES, LayerShape, spread

BATCHES = (4, 16)
SHAPES: tuple[LayerShape, ...] = tuple(s.with_batch(b) for b in BATCHES for s in PAPER_SHAPES)
SMOKE_SHAPES: tuple[LayerShape, ...] = (LayerShape("tokens", (2, 10, 48), -1), LayerShape("NCHW", (2, 16, 8, 8), 1))
CASES = ("ours", "eager", "naive", "blas")


class EagerVCReg(torch.autograd.Function):
    """Identity forward; the backward adds SPEC section 2's exact gradient, in plain eager ops."""

    @staticmethod
    def forward(ctx, x, dim):
        ctx.save_for_backward(x)
        ctx.dim = dim
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_y):
        (x,) = ctx.saved_tensors
        moved = x.movedim(ctx.dim, -1)
        X = moved.reshape(-1, moved.shape[-1])
        n = X.shape[0]
        Xc = X - X.mean(0)
        C = Xc.T @ Xc / (n - 1)
        G, _ = gradient_matrix(C, n, Params(ALPHA, BETA, EPS))
        return grad_y + (Xc @ G).view(moved.shape).movedim(-1, ctx.dim), None


def _timer(fn: Callable[[], None], before: Callable[[], None]) -> Callable[[], float]:
    """Seconds of one ``fn()``; ``before()`` runs first, untimed (dropping the previous round's
    gradient, whose free would otherwise be charged to whichever case runs next)."""
    def run() -> float:
        before()
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return run


def measure(shape: LayerShape, reps: int, warmup: int = 2, dtype: torch.dtype = torch.float32) -> dict[str, list[float]]:
    """Seconds of each of ``reps`` interleaved rounds of ``CASES`` at ``shape`` (CPU, in ``dtype``),
    on the backend currently chosen (``vcreg_kernels.set_backend``)."""
    dim = shape.dim
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape.shape, generator=g).to(dtype).requires_grad_()
    grad_y = torch.randn(shape.shape, generator=g).to(dtype)
    d = shape.shape[dim]
    X = x.detach().movedim(dim, -1).reshape(-1, d).contiguous()
    G = torch.randn(d, d, generator=g)
    G = (G + G.T).to(dtype)

    def ours():
        vcreg_kernels.vcreg(x, ALPHA, BETA, EPS, dim=dim).backward(grad_y)

    def eager():
        EagerVCReg.apply(x, dim % x.dim()).backward(grad_y)

    def naive():
        loss = vcreg_kernels.vcreg_loss(x, ALPHA, BETA, EPS, dim=dim)
        torch.autograd.backward([x.view_as(x), loss], [grad_y, None])

    def blas():
        torch.mm(X.T, X)
        torch.mm(X, G)

    def clear():
        x.grad = None

    cases = {k: _timer(f, clear) for k, f in (("ours", ours), ("eager", eager), ("naive", naive), ("blas", blas))}
    times: dict[str, list[float]] = {k: [] for k in cases}
    for run in cases.values():
        for _ in range(warmup):
            run()
    for _ in range(reps):
        for name, run in cases.items():
            times[name].append(run())
    return times


def summary(times: dict[str, list[float]]) -> dict:
    """Median, p20 and p80 of each case, and the ratios of the medians."""
    out: dict = {k: spread(v) for k, v in times.items()}
    med = {k: out[k]["median_s"] for k in times}
    out["ours_over_eager"] = med["ours"] / med["eager"]
    out["ours_over_naive"] = med["ours"] / med["naive"]
    out["ours_over_blas"] = med["ours"] / med["blas"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batch", type=int, nargs="+", default=list(BATCHES))
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    dispatch.set_backend("cpu")
    print(f"torch {torch.__version__}, {args.dtype}, {torch.get_num_threads()} threads, {args.reps} interleaved rounds, "
          f"load average {os.getloadavg()[0]:.2f} at the start; median [p20, p80] in ms")
    print(f"{'shape':>34} {'ours':>22} {'eager':>22} {'blas':>22} {'naive':>10} "
          f"{'ours/eager':>10} {'ours/blas':>9} {'ours/naive':>10}")
    for shape in (s.with_batch(b) for b in args.batch for s in PAPER_SHAPES):
        s = summary(measure(shape, args.reps, dtype=dtype))

        def cell(k: str) -> str:
            c = s[k]
            return f"{c['median_s'] * 1e3:.2f} [{c['p20_s'] * 1e3:.2f}, {c['p80_s'] * 1e3:.2f}]"

        print(f"{shape.name + ' ' + str(shape.shape):>34} {cell('ours'):>22} {cell('eager'):>22} {cell('blas'):>22} "
              f"{s['naive']['median_s'] * 1e3:10.2f} {s['ours_over_eager']:10.2f} {s['ours_over_blas']:9.2f} "
              f"{s['ours_over_naive']:10.2f}")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
