"""benchmarks/patterns_gpu.py on the CPU at a tiny size: its rows hold what they claim (no timing asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmark_scripts import load_benchmark


def test_tiny_cpu_run_matches_the_target_recall_with_the_least_dense_setting(tmp_path: Path, monkeypatch) -> None:
    script = load_benchmark("patterns_gpu")
    monkeypatch.setattr(script, "SWEEPS", {"vertical-slash": [{"vertical": v, "slash": v} for v in (1, 8, 64)]})
    out = tmp_path / "p.json"
    script.main(["--device", "cpu", "--lengths", "128", "--hq", "2", "--hkv", "1", "--d", "16", "--match-recall",
                 "--pattern", "vertical-slash block=16 last_q=16 sink=4 local=8 dense_above=1.0",
                 "--target", "streaming sink=4 local=48 group_rows=16", "--recall-windows", "4", "--recall-rows", "16",
                 "--out", str(out), "--commit", "abc"])
    result = json.loads(out.read_text())
    assert result["commit"] == "abc" and "torch" in result["versions"] and result["gpu"].startswith("cpu")
    rows = {(row["pattern"], row["mode"]): row for row in result["rows"]}
    assert sorted(rows) == [("vertical-slash", "defaults"), ("vertical-slash", "equal recall")]
    for row in rows.values():
        assert row["identify_over_execute"] == pytest.approx(row["identify_ms"] / row["execute_ms"])
        assert 0 < row["density"] <= 1 and 0 < row["recall"] <= 1 + 1e-6 and row["finite"]
    matched = rows[("vertical-slash", "equal recall")]
    assert [s["params"]["vertical"] for s in matched["sweep"]] == [1, 8, 64]
    reaching = [s for s in matched["sweep"] if s["recall"] >= matched["target_recall"]]
    assert matched["reached"] == bool(reaching)
    if reaching:  # the least dense setting that reaches the target
        assert matched["recall"] >= matched["target_recall"]
        assert matched["density"] == min(s["density"] for s in reaching)
    assert "| vertical-slash | equal recall |" in result["table_markdown"]
    assert "| vertical-slash | equal recall |" in result["equal_recall_markdown"]
    assert "| vertical-slash | defaults |" not in result["equal_recall_markdown"]
