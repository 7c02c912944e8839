"""VCReg layers in whole models (SPEC section 8): insert, remove, synchronise across ranks, log.

``insert_vcreg`` puts a ``VCReg`` after each block (the paper's Appendix A, setting 2) without
touching the model's structure: the block gets a child ``vcreg`` and its class becomes a
subclass of its own whose forward ends with ``self.vcreg(...)``, the pattern of
torch.nn.utils.parametrize. So parameter and state_dict names do not change (VCReg holds no
persistent state), ``isinstance`` still holds, and torch.compile, which guards on module types,
retraces a model compiled before the insertion; a forward hook would not be seen by a model
compiled before it was registered (Dynamo does not guard on hooks). ``remove_vcreg`` restores the
original classes.
"""
from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from typing import Optional, Union

import torch
from torch import nn

from .modules import VCReg

_WITH_VCREG: dict[type, type] = {}  # block type -> its subclass that ends with self.vcreg


def _restore_block(base: type) -> nn.Module:
    """Unpickling/deepcopy of a block with a VCReg: an empty instance of the subclass."""
    block = base.__new__(base)
    block.__class__ = _with_vcreg(base)
    return block


def _with_vcreg(base: type) -> type:
    cls = _WITH_VCREG.get(base)
    if cls is None:
        def forward(self, *args, **kwargs):
            return self.vcreg(base.forward(self, *args, **kwargs))

        def __reduce_ex__(self, protocol):  # the generated class cannot be imported by name
            return _restore_block, (base,), self.__getstate__()

        name = f"{base.__name__}WithVCReg"
        cls = type(name, (base,), {"forward": forward, "__reduce_ex__": __reduce_ex__,
                                   "_vcreg_base": base, "__qualname__": name})
        _WITH_VCREG[base] = cls
    return cls


def _known_blocks() -> dict[type, int]:
    """The torchvision blocks of the paper, with the feature dimension of their output."""
    try:
        from torchvision.models.convnext import CNBlock
        from torchvision.models.resnet import BasicBlock, Bottleneck
        from torchvision.models.vision_transformer import EncoderBlock
    except ImportError as e:
        raise ImportError("insert_vcreg: block_types=None means torchvision's blocks, and torchvision "
                          f"does not import ({e}); pass block_types") from e
    # CNBlock computes in NHWC but returns NCHW; EncoderBlock returns (batch, tokens, features).
    return {BasicBlock: 1, Bottleneck: 1, CNBlock: 1, EncoderBlock: -1}


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / torch.compile wrappers, so module names read as the user's."""
    dynamo = sys.modules.get("torch._dynamo")  # only a model compiled here can be wrapped by it
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif dynamo is not None and isinstance(model, dynamo.eval_frame.OptimizedModule):
            model = model._orig_mod
        else:
            return model


def insert_vcreg(
    model: nn.Module,
    alpha: float = 0.16,
    beta: float = 0.01,
    eps: float = 1e-4,
    gamma: float = 1.0,
    delta: Optional[float] = None,
    block_types: Union[None, Iterable[type], Mapping[type, Optional[int]]] = None,
    sync: bool = False,
    process_group=None,
    scale: str = "exact",
) -> nn.Module:
    """Put a VCReg layer after every block of ``model``, in place; returns ``model``.

    ``block_types=None``: torchvision's ResNet BasicBlock/Bottleneck and ConvNeXt CNBlock (NCHW
    output, ``dim=1``) and ViT EncoderBlock (``dim=-1``). Otherwise an iterable of module types
    (subclasses included), whose output's feature dimension is 1 for outputs of rank 4 or more and
    -1 otherwise, or a mapping ``{type: dim}``. A block that already has one gets new settings.
    ``sync``, ``process_group``: the cross-rank mode (``VCReg``); ``scale="paper"``: each layer's
    covariance coefficient is beta * (n - 1) at its own n, the paper's grid as printed. Works on DDP-wrapped and
    torch.compile'd models. Raises ValueError when the model has no such block.
    """
    types = _known_blocks() if block_types is None else (
        dict(block_types) if isinstance(block_types, Mapping) else dict.fromkeys(block_types))
    device = next(model.parameters(), torch.empty(0)).device  # for the layers' terms buffers
    found = 0
    for module in list(model.modules()):
        dims = [d for t, d in types.items() if isinstance(module, t)]
        if not dims or isinstance(module, VCReg):
            continue
        base = getattr(type(module), "_vcreg_base", type(module))
        if base is type(module) and hasattr(module, "vcreg"):
            raise ValueError(f"insert_vcreg: {base.__name__} already has an attribute 'vcreg'")
        module.vcreg = VCReg(alpha, beta, eps, gamma, delta, dims[0], sync, process_group, scale).to(device)
        module.__class__ = _with_vcreg(base)
        found += 1
    if not found:
        names = ", ".join(t.__name__ for t in types)
        raise ValueError(f"insert_vcreg: no module of type {names} in {type(_unwrap(model)).__name__}")
    return model


def remove_vcreg(model: nn.Module) -> nn.Module:
    """Remove every VCReg layer: those of ``insert_vcreg``, and any other (replaced by nn.Identity)."""
    for module in list(model.modules()):
        base = getattr(type(module), "_vcreg_base", None)
        if base is not None:
            del module.vcreg
            module.__class__ = base
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, VCReg):
                setattr(parent, name, nn.Identity())
    return model


def convert_sync_vcreg(model: nn.Module, process_group=None) -> nn.Module:
    """Switch every VCReg layer of ``model`` to the cross-rank mode over ``process_group``, in place."""
    for module in model.modules():
        if isinstance(module, VCReg):
            module.set_sync(True, process_group)
    return model


def vcreg_terms(model: nn.Module) -> dict[str, torch.Tensor]:
    """{module name: tensor([l_var, l_cov])}: the unweighted terms of each VCReg layer's last backward.

    Copies of the layers' ``terms`` buffers, on their device: reading them costs no host sync
    until you call ``.item()``/``.tolist()``. NaN where a layer has had no backward since it was
    made or since ``reset_vcreg_terms``. In the cross-rank mode they are the whole batch's, the
    same on every rank; otherwise this rank's.
    """
    return {name: m.terms.clone() for name, m in _unwrap(model).named_modules() if isinstance(m, VCReg)}


def reset_vcreg_terms(model: nn.Module) -> None:
    """Set every VCReg layer's terms to NaN ("no backward since")."""
    for module in model.modules():
        if isinstance(module, VCReg):
            module.reset_terms()
