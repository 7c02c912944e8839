"""vcreg_kernels: Variance-Covariance Regularization as a fused PyTorch op, and the VICReg loss on its kernels.

``import vcreg_kernels`` registers ``torch.ops.vcreg.fused`` and ``torch.ops.vcreg.fused_backward``
and loads the compiled kernels when they are built (the reference backend works without them).
"""
from . import _ops  # noqa: F401  (defines the op schemas first)
from . import _extension
from .dispatch import BACKENDS, available_backends, get_backend, resolve_backend, set_backend
from .integration import convert_sync_vcreg, insert_vcreg, remove_vcreg, reset_vcreg_terms, vcreg_terms
from .modules import VCReg, vcreg
from .reference import vcreg_loss
from .vicreg import VICRegLoss, vicreg_loss, vicreg_terms

_extension.load()

__all__ = [
    "BACKENDS",
    "VCReg",
    "VICRegLoss",
    "available_backends",
    "convert_sync_vcreg",
    "get_backend",
    "insert_vcreg",
    "remove_vcreg",
    "reset_vcreg_terms",
    "resolve_backend",
    "set_backend",
    "vcreg",
    "vcreg_loss",
    "vcreg_terms",
    "vicreg_loss",
    "vicreg_terms",
]
__version__ = "0.1.0"
