"""The CPU layer's C++ autograd node (csrc/vcreg_autograd.cpp) against the Python one it stands in for.

In plain eager mode on the cpu backend, ``vcreg`` / ``VCReg`` / ``torch.ops.vcreg.fused`` record
``vcreg::eager_node``'s node instead of ``_VCRegFunction``; both must give the same gradient and
terms, bitwise, and the node must hand its backward to ``vcreg::fused_backward_terms`` (the Python
path) wherever something watches the backward or the backend setting changed since the forward.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vcreg_kernels
from vcreg_kernels import _extension, _ops, dispatch

pytestmark = pytest.mark.skipif(not _extension.has_kernel("cpu"), reason="the compiled CPU extension is not built")

NODE = "EagerNode"


def _python_layer(x, alpha, beta, eps, gamma, delta, dim, terms_out, scale):
    return _ops._VCRegFunction.apply(x, alpha, beta, eps, gamma, delta, dim % x.dim(), terms_out, None, scale)


def _node_layer(x, alpha, beta, eps, gamma, delta, dim, terms_out, scale):
    y = _ops.vcreg_function(x, _ops.Params.of(alpha, beta, eps, gamma, delta), dim, terms_out, None, scale)
    assert NODE in y.grad_fn.name(), f"plain eager on the cpu backend should record the C++ node, got {y.grad_fn.name()}"
    return y


def _grad_and_terms(layer, x, grad_y, *, alpha=0.16, beta=0.01, eps=1e-4, gamma=1.0, delta=None, dim=-1,
                    scale="exact"):
    x = x.detach().requires_grad_()
    terms = torch.full((2,), float("nan"), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    layer(x, alpha, beta, eps, gamma, delta, dim, terms, scale).backward(grad_y)
    return x.grad, terms


def _layouts():
    """(x, grad_y, dim): the rows and bdl views, channels_last, and strides either side must copy."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).add_(3.0)

    nchw = rand(3, 24, 5, 5)
    cl = rand(3, 24, 5, 5).contiguous(memory_format=torch.channels_last)
    strided = rand(24, 3, 5, 5).transpose(0, 1)  # neither layout: a copy
    return {
        "rows": (rand(6, 7, 40), rand(6, 7, 40), -1),
        "bdl": (nchw, rand(*nchw.shape), 1),
        "bdl-dim0": (rand(24, 9, 4), rand(24, 9, 4), 0),
        "channels_last": (cl, rand(*cl.shape).contiguous(memory_format=torch.channels_last), 1),
        "grad_y-other-strides": (nchw, rand(3, 5, 5, 24).permute(0, 3, 1, 2), 1),
        "x-copied": (strided, rand(*strided.shape), 1),
    }


@pytest.mark.parametrize("case", list(_layouts()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_node_matches_the_python_layer_bitwise(case, dtype):
    x, grad_y, dim = _layouts()[case]
    x, grad_y = x.to(dtype), grad_y.to(dtype)
    got, got_terms = _grad_and_terms(_node_layer, x, grad_y, dim=dim)
    want, want_terms = _grad_and_terms(_python_layer, x, grad_y, dim=dim)
    assert torch.equal(got, want)
    assert got.stride() == want.stride()
    assert torch.equal(got_terms, want_terms) and not got_terms.isnan().any()


@pytest.mark.parametrize("kwargs", [dict(scale="paper"), dict(delta=0.05, gamma=2.0), dict(alpha=0.0, beta=0.3, eps=1e-2)],
                         ids=["paper", "delta-gamma", "cov-only"])
def test_node_matches_the_python_layer_for_every_setting(kwargs):
    x, grad_y, dim = _layouts()["bdl"]
    got, got_terms = _grad_and_terms(_node_layer, x, grad_y, dim=dim, **kwargs)
    want, want_terms = _grad_and_terms(_python_layer, x, grad_y, dim=dim, **kwargs)
    assert torch.equal(got, want) and torch.equal(got_terms, want_terms)


def test_every_public_entry_point_records_the_node():
    x = torch.randn(4, 8, 3, 3, requires_grad=True)
    for y in (vcreg_kernels.vcreg(x, dim=1), torch.ops.vcreg.fused(x, 0.1, 0.1, dim=1), vcreg_kernels.VCReg(dim=1)(x)):
        assert NODE in y.grad_fn.name()
        assert y._base is x, "the forward must not copy"


def test_other_backends_and_modes_keep_the_python_layer():
    x = torch.randn(16, 6, requires_grad=True)
    previous = dispatch.get_backend()
    try:
        dispatch.set_backend("reference")
        assert type(vcreg_kernels.vcreg(x).grad_fn).__name__ == "_VCRegFunctionBackward"
    finally:
        dispatch.set_backend(previous)
    with _Recorder():
        assert type(vcreg_kernels.vcreg(x).grad_fn).__name__ == "_VCRegFunctionBackward"


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_a_dispatch_mode_in_the_backward_sees_the_backward_op():
    x = torch.randn(16, 6, requires_grad=True)
    y = vcreg_kernels.vcreg(x)
    assert NODE in y.grad_fn.name()
    with _Recorder() as rec:
        y.backward(torch.ones_like(y))
    assert any("vcreg.fused_backward_terms" in op for op in rec.ops), rec.ops


def test_set_backend_between_forward_and_backward_takes_effect(monkeypatch):
    seen = []
    vcreg_backward = dispatch.vcreg_backward

    def spy(grad_y, x, params, dim, backend_name=None, group=None, scale="exact"):
        seen.append(dispatch.resolve_backend(x, backend_name))
        return vcreg_backward(grad_y, x, params, dim, backend_name, group, scale)

    monkeypatch.setattr(dispatch, "vcreg_backward", spy)
    x = torch.randn(16, 6, requires_grad=True)
    grad_y = torch.randn(16, 6)
    previous = dispatch.get_backend()
    try:
        vcreg_kernels.vcreg(x).backward(grad_y)
        assert seen == [], "the node's own backward runs no Python"
        y = vcreg_kernels.vcreg(x)
        dispatch.set_backend("reference")
        y.backward(grad_y)
        assert seen == ["reference"]
        dispatch.set_backend("cpu")
        y = vcreg_kernels.vcreg(x)
        dispatch.set_backend("auto")
        y.backward(grad_y)
        assert seen == ["reference"], "auto still resolves to the cpu backend"
    finally:
        dispatch.set_backend(previous)


def test_double_backward_fails_as_the_python_layer_does():
    x = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    for layer in (_node_layer, _python_layer):
        y = layer(x, 0.16, 0.01, 1e-4, 1.0, None, -1, None, "exact")
        (g,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="no autograd formula"):
            g.sum().backward()
