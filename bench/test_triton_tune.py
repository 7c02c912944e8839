"""``python -m bench.triton_tune`` (the triton backend's per-pass timing for a GPU session) end to
end at smoke size: every pass of every smoke shape gets timed rows, one per configuration the
autotuner would time, and the configuration lists are back in place afterwards."""
from bench import triton_tune
from vcreg_kernels.triton_kernels import configs, launch


def test_triton_tune_smoke(tmp_path):
    before = (configs.stats_tuning, configs.apply_tuning, launch.AUTOTUNE)
    assert triton_tune.main(["--smoke", "--dtypes", "float32,bfloat16", "--out", str(tmp_path / "passes.md")]) == 0
    cells = [[c.strip() for c in line.strip("|").split("|")]
             for line in (tmp_path / "passes.md").read_text().splitlines() if line.startswith("| ")][2:]
    for shape in triton_tune.SMOKE_SHAPES:
        for dtype in ("float32 highest", "bfloat16"):
            rows = [c for c in cells if c[0].startswith(shape.name) and c[1] == dtype]
            kinds = [c[2] for c in rows]
            assert kinds.count("stats") >= 1 and kinds.count("apply") >= 1 and "backward" in kinds, (shape, dtype)
            assert ("copy" in kinds) == (shape.name == "NCHW"), kinds  # tokens: d = 64 in place; NCHW: L = 28
            for c in rows:
                assert float(c[4]) > 0
    assert (configs.stats_tuning, configs.apply_tuning, launch.AUTOTUNE) == before
