"""The README's main job, end to end on the real packaged model (short prompt)."""

import pytest

from sparse_prefill.cli import main


@pytest.mark.slow
def test_run_prints_dense_and_each_policy_side_by_side(capsys, monkeypatch, tmp_path):
    # The PyTorch reference path: the interpreted Triton kernels are tested elsewhere and slow here.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    # At 1200 tokens anchor.yaml's windows alone pass its dense_above (0.4): keep the stripes here.
    stripes = tmp_path / "anchor-stripes.yaml"
    stripes.write_text("default: {pattern: anchor, dense_above: 1.0}\n")
    assert main(["run", "--length", "1200", "--max-new-tokens", "4", "--policy", str(stripes),
                 "--policy", "streaming.yaml"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.strip().startswith("dense"))
    assert "anchor" in header and "streaming" in header
    for row in ("answer", "needle found", "prefill time (s)", "density", "attention calls sparse/previous"):
        assert any(line.startswith(row) for line in out.splitlines()), row
    density_row = next(line for line in out.splitlines() if line.startswith("density"))
    densities = [float(cell) for cell in density_row.split()[1:]]
    # dense, anchor, streaming (its 128 + 1024-key windows still cover all of 1200 tokens).
    assert densities[0] == 1.0 and 0 < densities[1] < 1 and 0 < densities[2] <= 1
    # What ran under each policy: its sparse calls with the density of the table, decode dense by design.
    summaries = out.split("what ran:\n", 1)[1].splitlines()
    for label, density in zip(("anchor-stripes", "streaming"), densities[1:]):
        summary = next(line for line in summaries if line.startswith(f"  {label}: "))
        assert "ran sparse" in summary and f"mean density {density:.3f}" in summary and "dense by design" in summary
