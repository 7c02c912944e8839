"""Self-supervised learning with ``vcreg_kernels.VICRegLoss`` on scikit-learn's digits (no download).

A small encoder (an MLP, 8x8 pixels -> 64 features) is trained without labels on two augmented
views of each digit (pixel dropout and noise), with the VICReg loss on its output. Its
representation is then frozen and a linear classifier (logistic regression on the standardised
features) is trained on it with the labels of the training split, all of them or 10 per class:
its accuracy on the held-out split measures what the representation keeps. Two runs from the
same initialisation:

* VICReg: the invariance, variance and covariance terms (facebookresearch/vicreg's 25, 25, 1);
* invariance only (std_coeff = cov_coeff = 0): the views agree trivially when every image maps to
  the same point, and the representation collapses (the VICReg paper's Table 4a).

The loss sits on the encoder's output itself. facebookresearch/vicreg puts an expander (a wider
MLP) between the two and probes the encoder's output; in a model this small the expander alone
then absorbs the collapse, and the probe would not show it.

    pip install scikit-learn matplotlib     # or: pip install -e .[examples]
    python examples/vicreg_digits.py        # under a minute on a CPU; writes examples/vicreg_digits.png
"""
from __future__ import annotations

import argparse
import pathlib
import time

import torch
from torch import nn

import vcreg_kernels

FEW = 10  # labels per class of the few-label probe


def load_digits(seed: int):
    """(x_train, y_train, x_test, y_test): 1797 images (1, 8, 8) in [0, 1], a stratified 2:1 split."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    data = sk_load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    i_train, i_test = train_test_split(torch.arange(len(y)).numpy(), test_size=1 / 3, stratify=y.numpy(),
                                       random_state=seed)
    return x[i_train], y[i_train], x[i_test], y[i_test]


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One random view of each image of x (N, 1, 8, 8): 10% of the pixels dropped, noise of 0.05."""
    keep = torch.rand(x.shape, generator=g) > 0.1
    return (x * keep + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1)


class Encoder(nn.Module):
    """8x8 digit -> 64-dimensional representation: a small MLP, no normalisation layer (a BatchNorm
    would keep the features spread by itself and hide the collapse)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                                 nn.Linear(512, 64))

    def forward(self, x):
        return self.net(x)


def few_labels(y: torch.Tensor) -> torch.Tensor:
    """The indices of the first ``FEW`` training images of each class."""
    return torch.cat([torch.nonzero(y == c).flatten()[:FEW] for c in range(10)])


def linear_probe(features, y_train, y_test, labelled=None) -> float:
    """Test accuracy of a logistic regression on frozen, standardised features (train, test), trained
    on the ``labelled`` training images (None: all)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    f_train, f_test = (f.flatten(1).numpy() for f in features)
    y = y_train.numpy()
    if labelled is not None:
        f_train, y = f_train[labelled.numpy()], y[labelled.numpy()]
    scaler = StandardScaler().fit(f_train)
    probe = LogisticRegression(max_iter=3000).fit(scaler.transform(f_train), y)
    return float(probe.score(scaler.transform(f_test), y_test.numpy()))


@torch.no_grad()
def evaluate(encoder: nn.Module, data) -> dict:
    """The linear probes with all and with few labels, and the representation's mean feature std."""
    x_train, y_train, x_test, y_test = data
    features = encoder(x_train), encoder(x_test)
    return dict(all=linear_probe(features, y_train, y_test),
                few=linear_probe(features, y_train, y_test, few_labels(y_train)),
                std=features[1].std(0).mean().item())


def train(data, std_coeff: float, cov_coeff: float, epochs: int, batch: int, seed: int, every: int) -> dict:
    """Self-supervised training; the probes and the loss's terms every ``every`` epochs."""
    x_train = data[0]
    torch.manual_seed(seed)
    encoder = Encoder()
    criterion = vcreg_kernels.VICRegLoss(sim_coeff=25.0, std_coeff=std_coeff, cov_coeff=cov_coeff)
    opt = torch.optim.AdamW(encoder.parameters(), lr=1e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    history = dict(epoch=[0], terms=[None], **{k: [v] for k, v in evaluate(encoder, data).items()})
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(x_train), generator=g)
        for start in range(0, len(order) - batch + 1, batch):  # full batches: the statistics are the batch's
            x = x_train[order[start:start + batch]]
            loss = criterion(encoder(augment(x, g)), encoder(augment(x, g)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if epoch % every == 0 or epoch == epochs:
            history["epoch"].append(epoch)
            history["terms"].append(criterion.terms.tolist())  # the host sync only here, for logging
            for k, v in evaluate(encoder, data).items():
                history[k].append(v)
    history["encoder"] = encoder
    return history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--every", type=int, default=5, help="epochs between linear probes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).with_suffix(".png"))
    args = parser.parse_args()
    torch.set_num_threads(1)  # a small MLP: threads cost more than they give

    data = load_digits(args.seed)
    x_train, y_train, x_test, y_test = data
    print(f"digits: {len(x_train)} training and {len(x_test)} test images, 8x8, 10 classes")
    pixels = (x_train, x_test)
    baseline = dict(all=linear_probe(pixels, y_train, y_test), few=linear_probe(pixels, y_train, y_test,
                                                                                few_labels(y_train)))
    print(f"linear probe on the raw pixels: test accuracy {baseline['all']:.3f} with all labels, "
          f"{baseline['few']:.3f} with {FEW} per class")
    runs = {}
    for name, std_coeff, cov_coeff in (("VICReg (25, 25, 1)", 25.0, 1.0), ("invariance only (25, 0, 0)", 0.0, 0.0)):
        start = time.time()
        runs[name] = h = train(data, std_coeff, cov_coeff, args.epochs, args.batch, args.seed, args.every)
        inv, var, cov = h["terms"][-1]
        print(f"{name}: linear probe at initialisation {h['all'][0]:.3f} (all labels) / {h['few'][0]:.3f} "
              f"({FEW} per class), after {args.epochs} epochs {h['all'][-1]:.3f} / {h['few'][-1]:.3f}; "
              f"feature std {h['std'][0]:.3g} -> {h['std'][-1]:.3g}; last terms inv {inv:.3g}, var {var:.3g}, "
              f"cov {cov:.3g} ({time.time() - start:.0f} s)")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    colours = dict(zip(runs, ("tab:blue", "tab:red")))
    for name, h in runs.items():
        axes[0].plot(h["epoch"], h["all"], "o-", color=colours[name], label=f"{name}, all labels", markersize=3)
        axes[0].plot(h["epoch"], h["few"], "s--", color=colours[name], label=f"{name}, {FEW} per class",
                     markersize=3)
        axes[1].semilogy(h["epoch"], [max(v, 1e-12) for v in h["std"]], "o-", color=colours[name], label=name,
                         markersize=3)
    axes[0].axhline(baseline["all"], color="gray", ls="-", lw=0.8, label="raw pixels, all labels")
    axes[0].axhline(baseline["few"], color="gray", ls="--", lw=0.8, label=f"raw pixels, {FEW} per class")
    axes[0].axhline(0.1, color="gray", ls=":", label="chance")
    axes[0].set(xlabel="epoch", ylabel="test accuracy", ylim=(0, 1),
                title="linear probe on the frozen 64-d representation")
    axes[1].set(xlabel="epoch", ylabel="mean std of the features (test images)",
                title="without var/cov: every digit maps to one point")
    for ax in axes[:2]:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    with torch.no_grad():
        rep = runs["VICReg (25, 25, 1)"]["encoder"](x_test)
    rep = rep - rep.mean(0)
    _, _, v = torch.pca_lowrank(rep, q=2, center=False)
    scatter = axes[2].scatter(*(rep @ v[:, :2]).T, c=y_test, cmap="tab10", s=6)
    axes[2].legend(*scatter.legend_elements(), fontsize=7, ncol=2, loc="best", title="digit")
    axes[2].set(title="VICReg: test representations, first two principal axes", xticks=[], yticks=[])
    fig.suptitle(f"VICReg on scikit-learn's digits without labels (vcreg_kernels.VICRegLoss): {args.epochs} "
                 f"epochs, batch {args.batch}, views with 10% of the pixels dropped and noise")
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
