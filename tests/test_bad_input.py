"""Every row of SPEC section 5: errors raised when the op is called, naming the offending value."""
import dataclasses
import os
import subprocess
import sys
import types
import warnings

import pytest
import torch

import vcreg_kernels
from vcreg_kernels import _extension, dispatch

OK = dict(alpha=0.1, beta=0.1, eps=1e-4, gamma=1.0, delta=None, dim=-1)


def _entry_points():
    """Every public way to call the op, each taking (x, **params)."""
    def op(x, **p):
        return torch.ops.vcreg.fused(x, p["alpha"], p["beta"], p["eps"], p["gamma"], p["delta"], p["dim"])

    def func(x, **p):
        return vcreg_kernels.vcreg(x, **p)

    def module(x, **p):
        return vcreg_kernels.VCReg(**p)(x)

    def backward_op(x, **p):
        return torch.ops.vcreg.fused_backward(torch.ones_like(x), x, *p.values())

    def loss(x, **p):
        return vcreg_kernels.vcreg_loss(x, **p)

    return {"op": op, "vcreg": func, "VCReg": module, "fused_backward": backward_op, "vcreg_loss": loss}


ENTRY = _entry_points()


@pytest.fixture(params=list(ENTRY), ids=list(ENTRY))
def call(request):
    return ENTRY[request.param]


@pytest.mark.parametrize("shape,dim", [((1, 5), -1), ((5,), 0), ((1, 3, 1, 1), 1), ((0, 4), -1)])
def test_fewer_than_two_samples(call, shape, dim):
    x = torch.randn(shape)
    with pytest.raises(ValueError, match=rf"n = {x.numel() // shape[dim]}.*{tuple(shape)}".replace("(", r"\(").replace(")", r"\)")):
        call(x, **{**OK, "dim": dim})


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.uint8])
def test_non_floating_dtype(call, dtype):
    x = torch.ones(4, 3).to(dtype)
    with pytest.raises(TypeError, match=str(dtype)):
        call(x, **OK)


@pytest.mark.parametrize("dim", [2, -3, 5])
def test_dim_out_of_range(call, dim):
    with pytest.raises(IndexError, match="out of range"):
        call(torch.randn(4, 3), **{**OK, "dim": dim})


def test_zero_dim_tensor(call):
    with pytest.raises(IndexError):
        call(torch.tensor(1.5), **OK)


@pytest.mark.parametrize("name,value", [("eps", 0.0), ("eps", -1e-4), ("eps", float("nan")), ("delta", 0.0),
                                        ("delta", -0.5), ("alpha", -0.1), ("beta", -1.0)])
def test_bad_hyperparameters(call, name, value):
    with pytest.raises(ValueError, match=rf"{name} must be .*{value}"):
        call(torch.randn(6, 3), **{**OK, name: value})


def test_empty_feature_dimension(call):
    with pytest.raises(ValueError, match="d = 0"):
        call(torch.randn(5, 0), **OK)


def test_errors_are_raised_in_the_forward():
    """The forward raises at call time; no error waits for the backward."""
    x = torch.randn(1, 4, requires_grad=True)
    with pytest.raises(ValueError):
        vcreg_kernels.vcreg(x)


def test_unknown_backend():
    with pytest.raises(ValueError, match="'fast'"):
        vcreg_kernels.set_backend("fast")


def test_forcing_an_unavailable_backend_names_what_is_missing(monkeypatch):
    monkeypatch.setattr(_extension, "has_kernel", lambda device_type: False)
    x = torch.randn(8, 3, requires_grad=True)
    dispatch.set_backend("cpu")
    try:
        with pytest.raises(RuntimeError, match="no CPU kernel"):
            vcreg_kernels.vcreg(x).sum().backward()
        dispatch.set_backend("cuda")
        with pytest.raises(RuntimeError, match="cuda backend takes CUDA tensors"):
            vcreg_kernels.vcreg(x).sum().backward()
    finally:
        dispatch.set_backend("auto")


def test_auto_falls_back_to_reference_with_one_warning(monkeypatch):
    monkeypatch.setattr(_extension, "has_kernel", lambda device_type: False)
    monkeypatch.setattr(dispatch, "_warned", set())
    x = torch.randn(8, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert dispatch.resolve_backend(x) == "reference"
        assert dispatch.resolve_backend(x) == "reference"
    assert len([w for w in caught if "reference backend" in str(w.message)]) == 1


def test_auto_on_a_gpu_prefers_cuda_then_triton(monkeypatch):
    """SPEC section 4: a GPU tensor goes to cuda if built, else triton, else reference."""
    x = types.SimpleNamespace(device=torch.device("cuda"))  # only its device type is read
    monkeypatch.setattr(dispatch, "_warned", set())
    missing: set[str] = set()
    for name in ("cuda", "triton"):
        record = dispatch.backend(name)
        monkeypatch.setitem(dispatch._RECORDS, name, dataclasses.replace(
            record, unavailable=lambda device_type, name=name: "missing" if name in missing else None))
    assert dispatch.resolve_backend(x, "auto") == "cuda"
    missing.add("cuda")
    assert dispatch.resolve_backend(x, "auto") == "triton"
    missing.add("triton")
    with pytest.warns(RuntimeWarning, match="reference backend"):
        assert dispatch.resolve_backend(x, "auto") == "reference"


def test_environment_variable_sets_the_default():
    code = "import vcreg_kernels; print(vcreg_kernels.get_backend())"
    env = {**os.environ, "VCREG_BACKEND": "reference"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "reference"
    env["VCREG_BACKEND"] = "bogus"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "bogus" in bad.stderr
