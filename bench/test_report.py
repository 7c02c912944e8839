"""The main job, ``python -m bench.report``, end to end at smoke size: every section runs without
an error row and it writes the JSON (pytest-benchmark's layout), the Markdown and the plot it
promises, where it is told to."""
import json

from bench import report


def test_report_smoke(tmp_path, capsys):
    out = report.main(["--smoke", "--out", str(tmp_path)])

    assert out["layer"] and out["network"] and out["cpu_ratios"] and out["loss"]
    assert report.error_rows(out) == []
    data = json.loads((tmp_path / "report.json").read_text())
    assert {"machine_info", "commit_info", "benchmarks", "datetime", "version", "vcreg"} <= set(data)
    assert len(data["benchmarks"]) == len(out["layer"]) + len(out["network"])
    assert all(b["stats"]["median"] > 0 for b in data["benchmarks"])
    assert data["vcreg"]["errors"] == []
    markdown = (tmp_path / "report.md").read_text()
    assert "## Layer level" in markdown and "Beside the paper's Table 8" in markdown and "## CPU" in markdown and "## Loss level" in markdown
    assert "ERROR" not in markdown
    assert "(compile " in markdown  # the naive + torch.compile rows state their compile time
    assert (tmp_path / "report.png").stat().st_size > 0
    assert "| ViT-B/32 | paper, × identity | 1.00 | 6.40 | 1.10 | 1.11 | +9.9% |" in capsys.readouterr().out


def test_error_rows_are_found_in_every_section():
    ok, bad = {"error": None}, {"error": "TypeError: x"}
    sections = ("layer", "network", "cpu_ratios", "loss")
    assert report.error_rows({s: [ok] for s in sections}) == []
    for section in sections:
        rep = {s: [ok] for s in sections}
        rep[section] = [ok, bad]
        assert report.error_rows(rep) == [bad]


def test_the_cases_of_a_group_take_turns():
    """``common.measure_interleaved``: after each case's warm-up, one round of each case in turn
    (on a CPU) until each has its rounds; a case that raises keeps its exception and leaves the
    turns, the others go on."""
    import torch

    from bench import common

    calls = []

    def case(name, fail_at=None):
        def run():
            calls.append(name)
            if fail_at is not None and calls.count(name) == fail_at:
                raise RuntimeError(f"{name} failed")
        return run

    timed = common.measure_interleaved({"a": case("a"), "b": case("b", fail_at=3), "c": case("c")},
                                       torch.device("cpu"), warmup=1, min_rounds=4, max_rounds=4, budget_s=0.0)
    assert calls[:3] == ["a", "b", "c"]  # the warm-ups
    assert calls[3:] == ["a", "b", "c", "a", "b", "c", "a", "c", "a", "c"]
    assert len(timed["a"]) == len(timed["c"]) == 4 and isinstance(timed["b"], RuntimeError)
