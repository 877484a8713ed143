"""benchmarks/static_cache.py on the CPU: its tiny path measures what the record reports, no timing asserted."""

from __future__ import annotations

import json

from benchmark_scripts import load_benchmark


def test_tiny_path_compares_both_caches_patched_and_unpatched(tmp_path):
    out = tmp_path / "static.json"
    result = load_benchmark("static_cache").main(
        ["--tiny", "--device", "cpu", "--lengths", "192", "--layers", "2", "--repeats", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    times = {(row["patched"], row["cache"]) for row in result["rows"] if "prefill_ms" in row}
    assert times == {(False, "dynamic"), (False, "static"), (True, "dynamic"), (True, "static")}
    diffs = [row["max_abs_logit_diff_static_vs_dynamic"] for row in result["rows"] if "patched" in row
             and "max_abs_logit_diff_static_vs_dynamic" in row]
    assert len(diffs) == 2 and max(diffs) < 1e-4  # the same attention, whichever cache holds the keys
    plans = next(row for row in result["rows"] if "plans_per_round" in row)
    assert plans["plans_per_round"] == 4 and 0 < plans["mean_plan_density"] <= 1  # 2 caches x 2 layers
