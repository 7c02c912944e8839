"""The `cpu` backend against its two yardsticks (issue #2), float32, one layer, forward+backward.

For each shape, in the same run and interleaved round by round, the median time of

* ours:  ``y = torch.ops.vcreg.fused(x, ...)`` then ``y.backward(grad_y)`` on the cpu backend;
* naive: ``vcreg_loss(x, ...)`` added to the loss and backpropagated (x's gradient is then
  grad_y + d(loss)/dx, as ours);
* blas:  the two products the backward cannot avoid, ``X^T X`` and ``X @ G`` by ``torch.mm``
  on an already flattened contiguous copy X (n x d) of x;

and the ratios ours/naive (target <= 0.6) and ours/blas (target <= 1.3). On a shared machine,
where other processes steal cores now and then, the ratios of the minimum times (also printed)
are the steadier estimate of the uncontended ones.

    .venv/bin/python bench/cpu_ratios.py [--reps 30] [--threads N]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import vcreg_kernels
from vcreg_kernels import dispatch

SHAPES = [((8, 96, 56, 56), 1), ((32, 50, 768), -1), ((16, 384, 14, 14), 1)]
ALPHA, BETA = 0.16, 0.01


def _timer(fn):
    def run() -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return run


def measure(shape, dim, reps: int) -> dict[str, list[float]]:
    x = torch.randn(shape).requires_grad_()
    grad_y = torch.randn(shape)
    d = shape[dim]
    X = x.detach().movedim(dim, -1).reshape(-1, d).contiguous()
    G = torch.randn(d, d)
    G = G + G.T

    def ours():
        x.grad = None
        torch.ops.vcreg.fused(x, ALPHA, BETA, dim=dim).backward(grad_y)

    def naive():
        x.grad = None
        loss = vcreg_kernels.vcreg_loss(x, ALPHA, BETA, dim=dim)
        torch.autograd.backward([x.view_as(x), loss], [grad_y, None])

    def blas():
        torch.mm(X.T, X)
        torch.mm(X, G)

    cases = {"ours": _timer(ours), "naive": _timer(naive), "blas": _timer(blas)}
    times: dict[str, list[float]] = {k: [] for k in cases}
    for run in cases.values():  # warm-up
        run()
        run()
    for _ in range(reps):
        for name, run in cases.items():
            times[name].append(run())
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dispatch.set_backend("cpu")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.reps} interleaved rounds")
    print(f"{'shape':>20} {'dim':>4} {'stat':>6} {'ours ms':>8} {'naive ms':>9} {'blas ms':>8} "
          f"{'ours/naive':>10} {'ours/blas':>9}")
    for shape, dim in SHAPES:
        times = measure(shape, dim, args.reps)
        for stat, fn in (("median", statistics.median), ("min", min)):
            t = {k: fn(v) for k, v in times.items()}
            print(f"{str(shape):>20} {dim:>4} {stat:>6} {t['ours'] * 1e3:8.2f} {t['naive'] * 1e3:9.2f} "
                  f"{t['blas'] * 1e3:8.2f} {t['ours'] / t['naive']:10.2f} {t['ours'] / t['blas']:9.2f}")


if __name__ == "__main__":
    main()
