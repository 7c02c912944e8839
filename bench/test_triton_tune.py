"""``python -m bench.triton_tune`` (the Triton configuration sweep for a GPU session) end to end at
smoke size: every pass of every smoke shape gets a timed row for the table's choice and a best
candidate, and the table's configuration is back in place afterwards."""
from bench import triton_tune
from vcreg_kernels import triton_kernels as tk


def test_triton_tune_smoke(tmp_path):
    before = {k: {c: dict(t) for c, t in v.items()} for k, v in tk.CONFIGS.items() if k in ("stats", "apply")}
    plans = (tk.STATS_PROGRAMS_PER_SM, tk.STATS_MIN_SAMPLES_PER_FEATURE, tk.APPLY_PROGRAMS_PER_SM)
    assert triton_tune.main(["--smoke", "--out", str(tmp_path / "sweep.md")]) == 0
    cells = [[c.strip() for c in line.strip("|").split("|")]
             for line in (tmp_path / "sweep.md").read_text().splitlines() if line.startswith("| ")]
    timed = [c for c in cells if c[2] in ("stats", "apply") and c[3]]  # not the "not timed" rows
    assert [c[2] for c in timed] == ["stats", "apply"] * len(triton_tune.SMOKE_SHAPES)  # float32 on a CPU
    for c in timed:
        assert float(c[3]) > 0 and float(c[5]) > 0 and float(c[7]) > 0
    assert {k: {c: dict(t) for c, t in v.items()} for k, v in tk.CONFIGS.items() if k in ("stats", "apply")} == before
    assert (tk.STATS_PROGRAMS_PER_SM, tk.STATS_MIN_SAMPLES_PER_FEATURE, tk.APPLY_PROGRAMS_PER_SM) == plans
