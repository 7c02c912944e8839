"""VCReg in whole models (SPEC section 8): insert/remove, logging, torch.compile, AMP, determinism.

Gradients are checked against "naive" autograd of the same objective: a copy of the model whose
VCReg layers are the identity, plus ``vcreg_loss`` of each of their inputs added to the loss.
"""
import copy
import os
import pickle

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS, before CUDA starts

import vcreg_kernels  # noqa: E402
from vcreg_kernels import VCReg, reference  # noqa: E402
from conftest import deterministic  # noqa: E402


def naive(model, x, y):
    """(parameter gradients, {layer name: [l_var, l_cov]}) of the same objective in plain autograd."""
    ref = copy.deepcopy(model)
    ref.zero_grad(set_to_none=True)
    acts = []
    for name, m in ref.named_modules():
        if isinstance(m, VCReg):
            m.eval()  # the identity; its input is regularised with vcreg_loss below
            m.register_forward_hook(lambda mod, args, out, name=name: acts.append((name, mod, args[0])))
    loss = F.cross_entropy(ref(x), y)
    terms = {}
    for name, m, a in acts:
        dim = m.feature_dim(a)
        loss = loss + vcreg_kernels.vcreg_loss(a, m.alpha, m.beta, m.eps, m.gamma, m.delta, dim)
        terms[name] = torch.stack(reference.vcreg_terms_of(a.detach(), m.eps, m.gamma, m.delta, dim % a.dim()))
    loss.backward()
    return {n: p.grad for n, p in ref.named_parameters()}, terms


def step(model, x, y):
    """One backward of the fused objective: (parameter gradients, vcreg_terms)."""
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    params = vcreg_kernels.integration._unwrap(model).named_parameters()
    return {n: p.grad.clone() for n, p in params}, vcreg_kernels.vcreg_terms(model)


def assert_grads_close(got, want, rtol):
    assert got.keys() == want.keys()
    for k in want:
        err = ((got[k].double() - want[k].double()).norm() / want[k].double().norm().clamp_min(1e-30)).item()
        assert err < rtol, f"gradient of {k}: relative error {err:.3g}"


def assert_terms_close(got, want, rtol):
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k].double(), want[k].double(), rtol=rtol, atol=1e-7, msg=k)


# --- torchvision models --------------------------------------------------------------------

TORCHVISION = {  # builder kwargs, input size, blocks that get a layer
    "resnet18": (dict(num_classes=10), (2, 3, 32, 32), 8),
    "convnext_tiny": (dict(num_classes=10), (2, 3, 32, 32), 18),
    "vit_b_32": (dict(num_classes=10, image_size=64), (2, 3, 64, 64), 12),
}


@pytest.mark.parametrize("arch", list(TORCHVISION))
def test_insert_and_remove_torchvision(arch):
    kwargs, shape, n_blocks = TORCHVISION[arch]
    model = getattr(torchvision.models, arch)(weights=None, **kwargs)
    keys = list(model.state_dict())
    block_types = {type(m) for m in model.modules() if hasattr(type(m), "_vcreg_base")}
    assert not block_types
    vcreg_kernels.insert_vcreg(model, alpha=0.5, beta=0.3, delta=0.05)
    layers = [m for m in model.modules() if isinstance(m, VCReg)]
    assert len(layers) == n_blocks
    assert all(m.dim == (-1 if arch.startswith("vit") else 1) for m in layers)
    assert list(model.state_dict()) == keys, "parameter and buffer names are unchanged"
    x = torch.randn(shape)
    model(x).sum().backward()
    terms = vcreg_kernels.vcreg_terms(model)
    assert len(terms) == n_blocks and all(torch.isfinite(t).all() for t in terms.values())
    assert next(iter(terms)).endswith(".vcreg")

    vcreg_kernels.remove_vcreg(model)
    assert not any(isinstance(m, VCReg) or hasattr(type(m), "_vcreg_base") for m in model.modules())
    assert list(model.state_dict()) == keys


def test_resnet18_gradients_match_naive():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=5)
    vcreg_kernels.insert_vcreg(model, alpha=0.5, beta=0.3, gamma=1.5)
    x, y = torch.randn(3, 3, 32, 32), torch.randint(0, 5, (3,))
    want, want_terms = naive(model, x, y)
    got, got_terms = step(model, x, y)
    assert_grads_close(got, want, 1e-4)
    assert_terms_close(got_terms, want_terms, 1e-4)


# --- a small model, trained a few steps, eager and compiled ----------------------------------


class ConvBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)  # BatchNorm follows
        self.bn = nn.BatchNorm2d(c)

    def forward(self, h):
        return torch.relu(h + self.bn(self.conv(h)))


class TokenBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.lin = nn.Linear(d, d)

    def forward(self, h):
        return h + F.gelu(self.lin(self.norm(h)))


class SmallNet(nn.Module):
    """NCHW blocks (dim=1, n = batch*H*W), then token blocks ((batch, tokens, features), dim=-1)."""

    def __init__(self, classes=4):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.convs = nn.Sequential(ConvBlock(8), ConvBlock(8))
        self.embed = nn.Linear(8, 16)
        self.tokens = nn.Sequential(TokenBlock(16), TokenBlock(16))
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        h = self.convs(self.stem(x))
        h = self.tokens(self.embed(h.flatten(2).transpose(1, 2)))
        return self.head(h.mean(1))


def small_model():
    torch.manual_seed(1)
    model = SmallNet()
    # Types given as a list: each layer's dim follows its input's rank (4-D: 1, 3-D: -1).
    return vcreg_kernels.insert_vcreg(model, alpha=0.6, beta=0.4, gamma=1.2, block_types=[ConvBlock, TokenBlock])


def small_batch():
    return torch.randn(6, 3, 5, 5), torch.randint(0, 4, (6,))


def test_small_model_training_matches_naive():
    model = small_model()
    assert sorted(vcreg_kernels.vcreg_terms(model)) == [
        "convs.0.vcreg", "convs.1.vcreg", "tokens.0.vcreg", "tokens.1.vcreg"]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        x, y = small_batch()
        want, want_terms = naive(model, x, y)
        got, got_terms = step(model, x, y)
        assert_grads_close(got, want, 1e-4)
        assert_terms_close(got_terms, want_terms, 1e-4)
        opt.step()


def test_torch_compile_fullgraph_trains_like_eager():
    torch._dynamo.reset()
    eager, compiled_model = small_model(), small_model()
    compiled = torch.compile(compiled_model, fullgraph=True)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (eager, compiled_model)]
    for _ in range(3):
        x, y = small_batch()
        want, want_terms = naive(eager, x, y)
        got_eager, terms_eager = step(eager, x, y)
        got, terms = step(compiled, x, y)
        assert_grads_close(got_eager, want, 1e-4)
        assert_grads_close(got, got_eager, 1e-4)
        assert_terms_close(terms, terms_eager, 1e-5)
        assert_terms_close(terms, want_terms, 1e-4)
        for opt in opts:
            opt.step()


def test_insert_and_remove_retrace_a_compiled_model():
    """Layers inserted into (removed from) a model compiled and run before take effect (are gone)."""
    torch._dynamo.reset()
    model = SmallNet()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # Dynamo's guards are the point
    x, y = small_batch()
    plain = step(compiled, x, y)[0]
    vcreg_kernels.insert_vcreg(compiled, alpha=0.6, beta=0.4, delta=0.05, block_types=[ConvBlock, TokenBlock])
    want, want_terms = naive(model, x, y)
    got, terms = step(compiled, x, y)
    assert_grads_close(got, want, 1e-4)
    assert_terms_close(terms, want_terms, 1e-4)
    vcreg_kernels.remove_vcreg(compiled)
    assert_grads_close(step(compiled, x, y)[0], plain, 1e-6)


def test_public_op_under_compile_matches_eager():
    """torch.ops.vcreg.fused itself (not the module) under fullgraph compile: eager's gradients."""
    torch._dynamo.reset()
    w = torch.randn(4, 8, 3, 3)

    def f(x):
        return (torch.ops.vcreg.fused(x, 0.5, 0.4, 1e-4, 1.2, 0.05, 1) * w).sum()

    x = torch.randn(4, 8, 3, 3) + 2
    xs = [x.clone().requires_grad_() for _ in range(2)]
    f(xs[0]).backward()
    torch.compile(f, fullgraph=True)(xs[1]).backward()
    torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=1e-5, atol=1e-6)


# --- the module and the helpers --------------------------------------------------------------


def test_terms_logging():
    layer = VCReg(alpha=0.3, beta=0.2, dim=1)
    assert torch.isnan(layer.terms).all(), "NaN before the first backward"
    assert "terms" not in layer.state_dict(), "not persistent"
    assert layer.to(torch.bfloat16).terms.dtype == torch.float32, "and kept float32"
    x = (torch.randn(4, 6, 3, 3) + 5).requires_grad_()
    layer(x).sum().backward()
    want = torch.stack(reference.vcreg_terms_of(x.detach(), 1e-4, 1.0, None, 1))
    torch.testing.assert_close(layer.terms, want)
    logged = vcreg_kernels.vcreg_terms(layer)[""]
    layer(x * 2).sum().backward()  # a later backward does not change what was read before
    torch.testing.assert_close(logged, want)
    assert not torch.equal(layer.terms, want)
    layer.eval()
    vcreg_kernels.reset_vcreg_terms(layer)
    layer(x).sum().backward()  # eval mode: the identity, nothing logged
    assert torch.isnan(layer.terms).all()


def test_same_layer_twice_before_one_backward():
    """A shared layer: no error from autograd's saved-tensor version check; its last backward is logged."""
    layer = VCReg(alpha=0.3, beta=0.2)
    a, b = torch.randn(8, 5, requires_grad=True), torch.randn(8, 5, requires_grad=True)
    (layer(a).sum() + 2 * layer(b * 3).sum()).backward()
    assert torch.isfinite(layer.terms).all()
    terms_a = torch.stack(reference.vcreg_terms_of(a.detach(), 1e-4, 1.0, None, 1))
    terms_b = torch.stack(reference.vcreg_terms_of(3 * b.detach(), 1e-4, 1.0, None, 1))
    assert torch.allclose(layer.terms, terms_a) or torch.allclose(layer.terms, terms_b)


def test_opcheck_fused_backward_terms():
    x = torch.randn(3, 4, 2, 5)
    gy = torch.randn(3, 4, 2, 5)
    for group in (None, "world"):  # "world" without a process group: the local batch
        torch.library.opcheck(torch.ops.vcreg.fused_backward_terms.default,
                              (gy, x, 0.3, 0.2, 1e-4, 1.0, None, 1, group))


def test_insert_options_and_errors():
    model = SmallNet()
    with pytest.raises(ValueError, match="no module of type"):
        vcreg_kernels.insert_vcreg(model, block_types=[nn.GRU])
    vcreg_kernels.insert_vcreg(model, block_types={ConvBlock: 1})
    vcreg_kernels.insert_vcreg(model, alpha=0.9, block_types={ConvBlock: 1})  # again: new settings, no second layer
    layers = [m for m in model.modules() if isinstance(m, VCReg)]
    assert len(layers) == 2 and all(m.alpha == 0.9 and m.dim == 1 for m in layers)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert type(clone.convs[0]) is type(model.convs[0]) and isinstance(clone.convs[0].vcreg, VCReg)
    vcreg_kernels.convert_sync_vcreg(model)
    assert all(m.sync and m.process_group is None for m in layers)
    seq = nn.Sequential(nn.Linear(3, 4), VCReg(), nn.ReLU())
    vcreg_kernels.remove_vcreg(seq)  # stand-alone layers become nn.Identity
    assert isinstance(seq[1], nn.Identity)


# --- AMP and determinism ------------------------------------------------------------------


@pytest.mark.parametrize("backward_in_autocast", [False, True])
def test_autocast_bfloat16(backend_device, backward_in_autocast):
    """Under CPU autocast the layer keeps bf16 activations bf16 and accumulates in float32."""
    _, device = backend_device
    lin = nn.Linear(24, 32).to(device)
    layer = VCReg(alpha=0.7, beta=0.5, gamma=1.5).to(device)
    x = torch.randn(1024, 24, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        h = lin(x) + 3.0
    h64 = h.detach().double().requires_grad_()
    (reg,) = torch.autograd.grad(vcreg_kernels.vcreg_loss(h64, 0.7, 0.5, gamma=1.5), h64)
    w = torch.randn(1024, 32, device=device)
    w *= reg.norm().item() / w.norm().item()  # as large as the regulariser's gradient: neither hides the other
    with torch.autocast(device, dtype=torch.bfloat16):
        y = layer(h)
        assert h.dtype == y.dtype == torch.bfloat16
        out = (y.float() * w).sum()
        if backward_in_autocast:
            (g,) = torch.autograd.grad(out, h)
    if not backward_in_autocast:
        (g,) = torch.autograd.grad(out, h)
    assert g.dtype == torch.bfloat16
    expected = w.double().bfloat16().double() + reg
    floor = ((expected.bfloat16().double() - expected).norm() / reg.norm()).item()  # rounding the output
    err = ((g.double() - expected).norm() / reg.norm()).item()
    assert err < 2e-2 + 2 * floor, err
    # The statistics themselves are float32-accurate (a bf16 accumulation would be off by ~1e-2).
    want = torch.stack(reference.vcreg_terms_of(h64.detach(), 1e-4, 1.5, None, 1))
    assert layer.terms.dtype == torch.float32
    torch.testing.assert_close(layer.terms.double(), want, rtol=1e-4, atol=1e-6)


def test_loss_scale_workaround(backend_device):
    """docs/guide.md, float16 with a loss scaler: a loss scaled by S with the layers' alpha and beta
    scaled by S gives S times the gradients, so unscaled they are the unscaled objective's; with
    S a power of two, bitwise. Scaling the loss alone leaves the regulariser S times too weak."""
    _, device = backend_device
    x, y = (t.to(device) for t in small_batch())
    model = small_model().to(device)
    want, _ = step(model, x, y)
    S = 2.0**16
    layers = [m for m in model.modules() if isinstance(m, VCReg)]

    def scaled_step():
        model.zero_grad(set_to_none=True)
        (F.cross_entropy(model(x), y) * S).backward()
        return {n: p.grad / S for n, p in vcreg_kernels.integration._unwrap(model).named_parameters()}

    weak = scaled_step()
    assert any(not torch.allclose(weak[k], want[k], rtol=1e-3) for k in want), "the regulariser must matter here"
    for m in layers:
        m.alpha, m.beta = m.alpha * S, m.beta * S
    got = scaled_step()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_deterministic_algorithms_give_bitwise_repeatable_gradients(backend_device):
    _, device = backend_device
    with deterministic():
        x, y = (t.to(device) for t in small_batch())
        runs = []
        for _ in range(2):
            model = small_model().to(device)
            runs.append(step(model, x, y))
    (g0, t0), (g1, t1) = runs
    assert all(torch.equal(g0[k], g1[k]) for k in g0)
    assert all(torch.equal(t0[k], t1[k]) for k in t0)


# --- scale="paper": the paper's alpha/beta grid as printed ----------------------------------


def test_scale_paper_is_beta_times_n_minus_one():
    """scale="paper" on the op, the function, the module and insert_vcreg: exactly scale="exact"
    with beta * (n - 1), n the layer's sample count (here 4 * 3 * 3 = 36 at dim=1; 6 * 5 = 30 tokens)."""
    torch._dynamo.reset()
    x = (torch.randn(4, 6, 3, 3) + 2).requires_grad_()
    w = torch.randn(4, 6, 3, 3)

    def grad(f):
        (g,) = torch.autograd.grad((f(x) * w).sum(), x)
        return g

    want = grad(lambda t: torch.ops.vcreg.fused(t, 0.5, 0.3 * 35, 1e-4, 1.2, None, 1))
    assert not torch.equal(want, grad(lambda t: torch.ops.vcreg.fused(t, 0.5, 0.3, 1e-4, 1.2, None, 1)))
    paper = [
        lambda t: torch.ops.vcreg.fused(t, 0.5, 0.3, 1e-4, 1.2, None, 1, "paper"),
        lambda t: vcreg_kernels.vcreg(t, 0.5, 0.3, gamma=1.2, dim=1, scale="paper"),
        lambda t: VCReg(0.5, 0.3, gamma=1.2, dim=1, scale="paper")(t),
        torch.compile(lambda t: torch.ops.vcreg.fused(t, 0.5, 0.3, 1e-4, 1.2, None, 1, "paper"),
                      fullgraph=True, backend="aot_eager"),
    ]
    for f in paper:
        assert torch.equal(grad(f), want)

    model, paper_model = small_model(), small_model()
    vcreg_kernels.insert_vcreg(paper_model, alpha=0.6, beta=0.4 / 10, gamma=1.2, block_types=[ConvBlock, TokenBlock],
                               scale="paper")
    assert "scale='paper'" in repr(paper_model.convs[0].vcreg)
    x, y = small_batch()  # n = 6 * 5 * 5 = 150 at the conv blocks, 6 * 25 = 150 at the token blocks
    for m in model.modules():
        if isinstance(m, VCReg):
            m.beta = 0.4 / 10 * 149
    got, want = step(paper_model, x, y)[0], step(model, x, y)[0]
    assert_grads_close(got, want, 1e-6)


def test_scale_bad_value():
    x = torch.randn(8, 5, requires_grad=True)
    for f in (lambda: torch.ops.vcreg.fused(x, 0.1, 0.1, 1e-4, 1.0, None, -1, "Paper"),
              lambda: vcreg_kernels.vcreg(x, scale="exact "),
              lambda: VCReg(scale="paper!"),
              lambda: vcreg_kernels.insert_vcreg(SmallNet(), block_types=[ConvBlock], scale="n-1")):
        with pytest.raises(ValueError, match="scale must be one of"):
            f()
