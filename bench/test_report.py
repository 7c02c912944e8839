"""The main job, ``python -m bench.report``, end to end at smoke size: it runs, and writes the
JSON (pytest-benchmark's layout), the Markdown and the plot it promises."""
import json

from bench import report


def test_report_smoke(tmp_path, capsys):
    out = report.main(["--smoke", "--no-cpu-ratios", "--out", str(tmp_path)])

    rows = out["layer"] + out["network"]
    assert rows and not [r["error"] for r in rows if r["error"]]
    data = json.loads((tmp_path / "report.json").read_text())
    assert {"machine_info", "commit_info", "benchmarks", "datetime", "version", "vcreg"} <= set(data)
    assert len(data["benchmarks"]) == len(rows)
    assert all(b["stats"]["median"] > 0 for b in data["benchmarks"])
    markdown = (tmp_path / "report.md").read_text()
    assert "## Layer level" in markdown and "Beside the paper's Table 8" in markdown
    assert (tmp_path / "report.png").stat().st_size > 0
    assert "| ViT-B/32 | paper, × identity | 1.00 | 6.40 | 1.10 | 1.11 | +9.9% |" in capsys.readouterr().out
