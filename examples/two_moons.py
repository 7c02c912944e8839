"""The paper's two-moons experiment (Zhu et al., Appendix E; after Pezeshki et al.'s gradient starvation).

Two moons far enough apart for a straight line to separate them: a network trained with
cross-entropy finds a boundary that separates the training points and then stops learning, so
the boundary passes close to the moons' tips. A three-layer network (2 -> 64 -> 64 -> 1, ReLU)
is trained with and without a VCReg layer after each hidden layer, over 10 seeds (data and
initialisation both drawn per seed); the figure shows the decision boundary of the mean
predicted probability over the seeds, and the points of one seed.

    python examples/two_moons.py            # writes examples/two_moons.png, about 30 s on a CPU

The moons are generated here (no scikit-learn). VCReg's alpha, beta are this package's (the exact
gradient of SPEC section 2): beta = 1 at n = 200 samples is the paper's Algorithm-1 beta of
1 / 199 (README: beta_ours = beta_paper * (n - 1)).
"""
from __future__ import annotations

import argparse
import math
import pathlib
import time

import torch
import torch.nn.functional as F
from torch import nn

import vcreg_kernels

HIDDEN, N_POINTS, NOISE, GAP = 64, 200, 0.1, 0.5
LIMITS = (-2.0, 2.0, -1.75, 1.75)  # x0, x1, y0, y1 of the plot and of the boundary search


def make_moons(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two interleaved half circles moved ``GAP`` apart vertically, so a line separates them; labels 0/1."""
    t = torch.rand(n, generator=generator) * math.pi
    label = torch.randint(0, 2, (n,), generator=generator)
    upper = torch.stack([torch.cos(t), torch.sin(t) + GAP / 2], 1)
    lower = torch.stack([1 - torch.cos(t), 0.5 - torch.sin(t) - GAP / 2], 1)
    x = torch.where(label[:, None] == 0, upper, lower) + NOISE * torch.randn(n, 2, generator=generator)
    return x - torch.tensor([0.5, 0.25]), label.float()  # centred on the origin


def make_net(reg: bool, alpha: float, beta: float) -> nn.Sequential:
    def hidden(d_in: int) -> list[nn.Module]:
        return [nn.Linear(d_in, HIDDEN), nn.ReLU()] + ([vcreg_kernels.VCReg(alpha, beta, dim=-1)] if reg else [])

    return nn.Sequential(*hidden(2), *hidden(HIDDEN), nn.Linear(HIDDEN, 1))


def train(seed: int, reg: bool, steps: int, alpha: float, beta: float):
    x, y = make_moons(N_POINTS, torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    net = make_net(reg, alpha, beta)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for _ in range(steps):  # full batch: every step's statistics are the whole training set's
        opt.zero_grad(set_to_none=True)
        F.binary_cross_entropy_with_logits(net(x).squeeze(1), y).backward()
        opt.step()
    return net.eval(), x, y


def margin(prob: torch.Tensor, grid: torch.Tensor, x: torch.Tensor) -> float:
    """Distance from the nearest training point to the 0.5 level set of ``prob`` (on the grid)."""
    above = prob > 0.5
    edge = (above[1:, :] != above[:-1, :])[:, :-1] | (above[:, 1:] != above[:, :-1])[:-1, :]
    points = grid[:-1, :-1][edge]
    return torch.cdist(x, points).min().item() if len(points) else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--beta", type=float, default=1.0)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).with_suffix(".png"))
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny matrices: threads cost more than they give

    x0, x1, y0, y1 = LIMITS
    gx, gy = torch.meshgrid(torch.linspace(x0, x1, 240), torch.linspace(y0, y1, 210), indexing="ij")
    grid = torch.stack([gx, gy], -1)
    results = {}
    start = time.time()
    for reg in (False, True):
        probs, margins = [], []
        for seed in range(args.seeds):
            net, x, y = train(seed, reg, args.steps, args.alpha, args.beta)
            with torch.no_grad():
                prob = torch.sigmoid(net(grid.view(-1, 2))).view(gx.shape)
                accuracy = ((net(x).squeeze(1) > 0).float() == y).float().mean().item()
            probs.append(prob)
            margins.append(margin(prob, grid, x))
            if seed == 0:
                points = (x, y)
        mean_prob = torch.stack(probs).mean(0)
        results[reg] = (mean_prob, points, margins)
        m = torch.tensor(margins)
        print(f"{'VCReg' if reg else 'plain'}: margin of each run's boundary {m.mean():.3f} +- {m.std():.3f} "
              f"(mean over {args.seeds} seeds), last run's training accuracy {accuracy:.3f}")
    print(f"trained {2 * args.seeds} networks in {time.time() - start:.1f} s")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), sharey=True)
    for ax, reg in zip(axes, (False, True)):
        mean_prob, (x, y), margins = results[reg]
        ax.contourf(gx, gy, mean_prob, levels=20, cmap="RdBu_r", alpha=0.55, vmin=0, vmax=1)
        ax.contour(gx, gy, mean_prob, levels=[0.5], colors="k", linewidths=2)
        ax.scatter(*x[y == 0].T, s=10, c="tab:blue", edgecolors="k", linewidths=0.3)
        ax.scatter(*x[y == 1].T, s=10, c="tab:red", edgecolors="k", linewidths=0.3)
        title = f"with VCReg (alpha={args.alpha:g}, beta={args.beta:g})" if reg else "without VCReg"
        ax.set_title(f"{title}\nmean margin {sum(margins) / len(margins):.3f}")
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
        ax.set_aspect("equal")
    fig.suptitle(f"Two moons: decision boundary of the mean prediction over {args.seeds} seeds "
                 f"(3-layer MLP, {HIDDEN} hidden units; points of seed 0)")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
