"""benchmarks/minference_configs.py on the CPU with a tiny configuration: converted, run, and what it records."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from benchmark_scripts import load_benchmark

# Two layers of four heads, sizes sparse at 256 tokens (vertical-slash) beside a streaming head.
CONFIG = [
    {"0": ["vertical_and_slash", 16, 32, 0.9], "1": ["vertical_and_slash", 16, 32, 0.9],
     "2": ["stream_llm", 4, 32, 0.8], "3": ["vertical_and_slash", 64, 8, 0.9]},
    {"0": ["vertical_and_slash", 16, 32, 0.9], "1": ["vertical_and_slash", 16, 32, 0.9],
     "2": ["vertical_and_slash", 16, 32, 0.9], "3": ["vertical_and_slash", 16, 32, 0.9]},
]


def test_a_tiny_configuration_converts_runs_sparse_and_is_recorded(tmp_path: Path) -> None:
    script = load_benchmark("minference_configs")
    path = tmp_path / "Tiny_config.json"
    path.write_text(json.dumps(CONFIG))
    row = script.check(path, length=256, max_heads=8)
    assert (row["layers"], row["heads"], row["ran"], row["finite"]) == (2, 4, True, True)
    assert row["heads_per_pattern"] == {"vertical-slash": 7, "streaming": 1}
    assert row["vertical_slash_sizes"] == {"16/32": 6, "64/8": 1}
    assert row["default"]["pattern"] == "vertical-slash" and row["overrides"] >= 1
    assert 0 < row["mean_density"] < 1 and row["max_logit_difference"] > 0  # sparse at this length, not dense
    assert "2 attention call(s) ran sparse" in row["what_ran"]
    assert script.check(path, length=256, max_heads=7)["ran"] is False  # 2 x 4 heads: converted only


@pytest.mark.parametrize("bad", ["0", "-5", "x"])
def test_lengths_and_head_limits_below_one_are_refused_before_any_model(bad: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="expected an integer >= 1"):
        load_benchmark("minference_configs")._positive(bad)
