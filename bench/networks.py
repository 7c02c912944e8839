"""Network level of the latency report (the paper's Table 8): a layer after every block.

torchvision ViT-B/32 (after each of its 12 EncoderBlocks, tokens, dim=-1), ConvNeXt-T (after each
of its 18 CNBlocks, NCHW, dim=1) and ResNet-50 (after each of its 16 Bottlenecks, NCHW, dim=1),
randomly initialised, in training mode; one step is forward + cross-entropy on random labels +
backward. The inserted layer is identity, naive (``vcreg_loss`` of each inserted activation
added to the loss), the paper's Algorithm 1, each backend of ours, or BN (BatchNorm2d, LayerNorm
for tokens). The insertion here is the benchmark's own small wrapper (``Tap``), independent of
the package's ``insert_vcreg``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

import vcreg_kernels

from .algorithm1 import paper_vcreg
from .common import ALPHA, BETA, EPS, Case, benchmarked_backends, forced_backend, ours_key


@dataclass(frozen=True)
class NetworkSpec:
    name: str
    build: Callable[[int], nn.Module]  # image size -> the torchvision model
    build_tiny: Callable[[int], nn.Module]  # image size -> the same classes and blocks, narrow (smoke)
    block_type: Callable[[], type]
    dim: int
    paper: Optional[dict] = None  # the paper's Table 8 row (A100, batch 128), seconds


def _vit(image: int) -> nn.Module:
    from torchvision.models import vit_b_32

    return vit_b_32(weights=None, image_size=image)


def _vit_tiny(image: int) -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=image, patch_size=32, num_layers=12, num_heads=2, hidden_dim=32, mlp_dim=64)


def _convnext(image: int) -> nn.Module:
    from torchvision.models import convnext_tiny

    return convnext_tiny(weights=None)


def _convnext_tiny(image: int) -> nn.Module:
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    return ConvNeXt([CNBlockConfig(8, 16, 3), CNBlockConfig(16, 32, 3), CNBlockConfig(32, 64, 9),
                     CNBlockConfig(64, None, 3)])


def _resnet(image: int) -> nn.Module:
    from torchvision.models import resnet50

    return resnet50(weights=None)


def _resnet_tiny(image: int) -> nn.Module:
    from torchvision.models.resnet import Bottleneck, ResNet

    return ResNet(Bottleneck, [3, 4, 6, 3], width_per_group=8)


def _encoder_block() -> type:
    from torchvision.models.vision_transformer import EncoderBlock

    return EncoderBlock


def _cnblock() -> type:
    from torchvision.models.convnext import CNBlock

    return CNBlock


def _bottleneck() -> type:
    from torchvision.models.resnet import Bottleneck

    return Bottleneck


# The paper's Table 8 (one NVIDIA A100, batch 128, ImageNet; seconds per forward+backward).
NETWORKS = (
    NetworkSpec("ViT-B/32", _vit, _vit_tiny, _encoder_block, -1,
                paper={"identity": 0.223, "naive": 1.427, "fast": 0.245, "bn": 0.247}),
    NetworkSpec("ConvNeXt-T", _convnext, _convnext_tiny, _cnblock, 1,
                paper={"identity": 0.442, "naive": 2.951, "fast": 0.471, "bn": 0.468}),
    NetworkSpec("ResNet-50", _resnet, _resnet_tiny, _bottleneck, 1),
)


class Tap(nn.Module):
    """``block`` followed by a swappable layer ``after`` (identity until set)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.after: nn.Module = nn.Identity()
        self.out_shape: Optional[torch.Size] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        self.out_shape = y.shape
        return self.after(y)


def insert_taps(model: nn.Module, block_type: type) -> list[Tap]:
    """Wrap every ``block_type`` module of ``model`` in a ``Tap``, in place; the taps in order."""
    targets = [name for name, m in model.named_modules() if isinstance(m, block_type)]
    taps = []
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        tap = Tap(getattr(parent, child))
        setattr(parent, child, tap)
        taps.append(tap)
    return taps


class NaiveLayer(nn.Module):
    """Identity that records ``vcreg_loss`` of its input in ``sink`` (summed into the loss)."""

    def __init__(self, sink: list, dim: int) -> None:
        super().__init__()
        self.sink, self.dim = sink, dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sink.append(vcreg_kernels.vcreg_loss(x, ALPHA, BETA, EPS, dim=self.dim))
        return x


class PaperLayer(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return paper_vcreg(x, ALPHA, BETA, EPS, self.dim)


def network_impl_keys(device: torch.device) -> list[str]:
    return ["identity", "norm", "naive", "paper_alg1"] + [ours_key(b) for b in benchmarked_backends(device)]


class NetworkBench:
    """One torchvision network with a ``Tap`` after each block, its inputs, and its cases."""

    def __init__(self, spec: NetworkSpec, batch: int, image: int, device: torch.device, tiny: bool = False,
                 seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.spec, self.batch, self.image, self.device = spec, batch, image, device
        self.model = (spec.build_tiny if tiny else spec.build)(image)
        self.taps = insert_taps(self.model, spec.block_type())
        self.model.to(device).train()
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.images = torch.randn(batch, 3, image, image, generator=g).to(device)
        self.labels = torch.randint(0, 1000, (batch,), generator=g).to(device)
        self.sink: list[torch.Tensor] = []
        with torch.no_grad():  # records each tap's output shape, for the BN/LN layers
            self.model(self.images[:2])

    @property
    def n_inserted(self) -> int:
        return len(self.taps)

    def _layer(self, key: str, tap: Tap) -> nn.Module:
        dim = self.spec.dim
        if key == "identity" or key.startswith("ours_"):
            # ours: the package's module; the backend is forced around the step
            return nn.Identity() if key == "identity" else vcreg_kernels.VCReg(ALPHA, BETA, EPS, dim=dim)
        if key == "naive":
            return NaiveLayer(self.sink, dim)
        if key == "paper_alg1":
            return PaperLayer(dim)
        if key == "norm":
            features = tap.out_shape[dim]
            return nn.LayerNorm(features) if len(tap.out_shape) == 3 else nn.BatchNorm2d(features)
        raise ValueError(f"unknown implementation {key!r}")

    def norm_label(self) -> str:
        return "LayerNorm" if self.spec.dim == -1 else "BatchNorm2d"

    def case(self, key: str, label: str) -> Case:
        """Implementation ``key`` after every block; one forward+backward step. Each ``run()``
        (and ``clear()``) puts this case's layers into the taps first, so several cases of one
        network can exist at once."""
        layers = [self._layer(key, tap).to(self.device).train() for tap in self.taps]
        backend = key[len("ours_"):] if key.startswith("ours_") else None
        model, sink, taps = self.model, self.sink, self.taps

        def clear() -> None:
            for tap, layer in zip(taps, layers):
                tap.after = layer
            model.zero_grad(set_to_none=True)
            sink.clear()

        def run() -> None:
            clear()
            with forced_backend(backend):
                loss = F.cross_entropy(model(self.images), self.labels)
                if sink:
                    loss = loss + torch.stack(sink).sum()
                loss.backward()

        return Case(key, label, run, clear)
