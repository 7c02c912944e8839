"""Loss level of SPEC section 7 (bench/loss.py) at the run's size: every implementation runs and is
timed, the memory is measured, the Markdown section renders, and what was timed computes the loss:
the value and the gradients of each backend of ours match facebookresearch/vicreg's formula."""
import torch

from bench import loss

# Relative error of ours against facebookresearch's formula evaluated in float32 on the same
# embeddings: SPEC section 6's bounds where TF32 may be on (the Triton kernels' float32 tl.dot on
# NVIDIA) and for bf16. tests/test_vicreg.py holds the exact ones.
TOLERANCE = {torch.float32: 2e-3, torch.bfloat16: 2e-2}


def test_loss_level(bench_size, device):
    rows = loss.run_loss_level(bench_size.name, device, log=None)
    size = loss.SIZES[bench_size.name]
    assert len(rows) == len(size.cases) * len(loss.impl_keys(device))
    assert not [r["error"] for r in rows if r["error"]]
    for r in rows:
        assert r["median_s"] > 0 and len(r["times_s"]) == size.reps
        assert r["peak_bytes"] is not None and r["peak_bytes"] > 0
        assert r["loss_rel_diff"] < TOLERANCE[getattr(torch, r["dtype"])]
    markdown = "\n".join(loss.loss_markdown(rows))
    assert markdown.startswith("## Loss level") and markdown.count("\n| ") == len(rows) + 2  # header, rule, rows


def test_gradients_match_facebook(bench_size, device):
    for n, d, dtype in loss.SIZES[bench_size.name].cases[:2]:
        z_a, z_b = loss.make_inputs(n, d, dtype, device)
        a32, b32 = (z.detach().float().requires_grad_() for z in (z_a, z_b))
        loss.facebook_vicreg_loss(a32, b32).backward()
        for key in loss.impl_keys(device)[1:]:
            case = loss.make_case(key, z_a, z_b)
            case.run()
            for got, want in ((z_a.grad, a32.grad), (z_b.grad, b32.grad)):
                assert got.dtype == dtype
                err = ((got.double() - want.double()).norm() / want.double().norm()).item()
                assert err < TOLERANCE[dtype] + ((want.to(dtype).double() - want.double()).norm() / want.norm()).item()
