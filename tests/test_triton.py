"""What only the triton backend has (vcreg_kernels/triton_kernels.py): Chan's merge over many
sample chunks, several column blocks, and the configuration table that the ahead-of-time check
compiles. Its kernels are tested with every backend's in test_kernels.py and through the op in
test_backends.py.

Without a GPU these run through TRITON_INTERPRET=1 (set by conftest) on small CPU shapes; the
``gpu`` test runs the compiled kernels at n in the millions.
"""
import math

import pytest
import torch

from conftest import HAS_GPU, assert_within, rel_err
from vcreg_kernels import reference as ref
from vcreg_kernels import triton_kernels as tk
from vcreg_kernels._params import Params

DEV = "cuda" if HAS_GPU else "cpu"
# float32-exact values, so that the interpreter (which passes Python floats as float32) is exact
# in float64 too.
PARAMS = Params(0.75, 0.625, 2.0**-13, 4.0, None)


def make_x3(B, d, L, dtype, mean_scale=0.0):
    """(B, d, L) canonical: correlated features with spreads 0.5..2.5 and means mean_scale times
    their spread (never zeros)."""
    n = B * L
    z = torch.randn(n, d, dtype=torch.float64)
    mix = torch.eye(d, dtype=torch.float64) + 0.3 * torch.randn(d, d, dtype=torch.float64) / math.sqrt(d)
    spread = 0.5 + 2.0 * torch.rand(d, dtype=torch.float64)
    X = (z @ mix) * spread + mean_scale * spread * (1.0 + torch.rand(d, dtype=torch.float64))
    return X.view(B, L, d).permute(0, 2, 1).contiguous().to(device=DEV, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_stats_many_chunks_and_blocks(dtype, monkeypatch):
    """Several column blocks (d > BLOCK_D) and one tile per chunk: Chan's merge over many chunks."""
    monkeypatch.setattr(tk, "STATS_PROGRAMS_PER_SM", 1000)
    monkeypatch.setattr(tk, "STATS_MIN_SAMPLES_PER_FEATURE", 0)
    d = tk.stats_config(10**6, dtype)["BLOCK_D"] + 3
    x3 = make_x3(3, d, 45, dtype, mean_scale=100.0)
    mu, m2 = tk.vcreg_stats_triton(x3)
    mu_want, m2_want = ref.vcreg_stats_reference(x3.double())
    _, m2_plain = ref.vcreg_stats_reference(x3)
    assert_within(rel_err(m2, m2_want), rel_err(m2_plain, m2_want), "triton", dtype, DEV, "M2")
    assert rel_err(mu, mu_want) <= (1e-12 if dtype == torch.float64 else 2e-5)


def test_stats_mean_over_many_chunks(monkeypatch):
    """mu after Chan's merge of hundreds of chunks at |mu| = 100 std, measured on the spread's
    scale (relative to |mu| it would hide): a running mean rounded to float32 at every merge
    drifts by several ulps of |mu|, six times plain PyTorch's error here."""
    monkeypatch.setattr(tk, "STATS_PROGRAMS_PER_SM", 1000)
    monkeypatch.setattr(tk, "STATS_MIN_SAMPLES_PER_FEATURE", 0)
    B, d = 528 * tk.stats_config(16, torch.float32)["BLOCK_S"], 16  # 528 chunks of one tile
    x3 = make_x3(B, d, 1, torch.float32, mean_scale=100.0)
    mu, _ = tk.vcreg_stats_triton(x3)
    X = x3.double().cpu().view(B, d)
    mu_want, std = X.mean(0), X.std(0)
    err = ((mu.double().cpu() - mu_want).abs() / std).max().item()
    err_plain = ((x3.view(B, d).mean(0).double().cpu() - mu_want).abs() / std).max().item()
    assert err <= 4 * err_plain + 1e-6, f"mu: {err:.3g} of the spread (plain torch: {err_plain:.3g})"


def test_config_table_covers_every_choice():
    """The host code only ever picks configurations that aot_cases() compiles."""
    compiled = {(c.kernel, tuple(sorted((k, v) for k, v in c.constexprs.items() if k.startswith("BLOCK"))))
                for c in tk.aot_cases(("cuda", 90))}
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for d in (1, 2, 17, 31, 32, 33, 64, 65, 128, 129, 768, 2048, 8192, 10000):
            for kernel, cfg in ((tk._stats_kernel, tk.stats_config(d, dtype)), (tk._apply_kernel, tk.apply_config(d, dtype))):
                assert (kernel, cfg.blocks) in compiled, (dtype, d, cfg)


@pytest.mark.gpu
def test_gpu_many_rows():
    """n in the millions (many chunks, Chan's merge) with a large mean."""
    x3 = make_x3(2_000_000, 16, 1, torch.float32, mean_scale=100.0)
    gy3 = torch.randn_like(x3) * 1e-3
    got, _ = tk.vcreg_backward_triton(gy3, x3, PARAMS)
    want, _ = ref.vcreg_backward_reference(gy3.double(), x3.double(), PARAMS)
    plain, _ = ref.vcreg_backward_reference(gy3, x3, PARAMS)
    scale = (want - gy3.double()).norm().item()
    assert_within(rel_err(got, want, scale), rel_err(plain, want, scale), "triton", torch.float32, DEV, "grad_x n = 2e6")
