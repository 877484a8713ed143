"""benchmarks/ttft_8b.py on the CPU: its tiny path runs the method it reports, with no timing asserted."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from types import ModuleType

import pytest
import torch

# Triton decides at import whether a kernel compiles or interprets: import them under conftest's TRITON_INTERPRET=1,
# before the fixture below switches the interpreter off, so tests run later in this process still interpret them.
import sparse_prefill.patterns.anchor.kernel  # noqa: F401
import sparse_prefill.kernels.executors  # noqa: F401
from sparse_prefill import AttentionContext, load_policy, registry
from sparse_prefill.evaluation.synthetic import structured_qkv
from sparse_prefill.patterns.anchor import ANCHOR

from benchmark_scripts import load_benchmark


@functools.cache
def _script() -> ModuleType:
    """benchmarks/ttft_8b.py, imported by path once."""
    return load_benchmark("ttft_8b")


@pytest.fixture
def script(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The script with its pattern registered in a registry of this test's own (no other test sees it)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the PyTorch references: 5 s here, 46 s interpreted
    monkeypatch.setattr(registry, "_registry", None)
    module = _script()
    module.register()
    yield module
    module.SYNTHETIC.release()


def _tiny_qkv(script: ModuleType, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return structured_qkv(length, 4, 2, 16, dtype=torch.bfloat16, device="cpu", **script.REAL_CALIBRATED)


def test_tiny_run_identifies_on_synthetic_inputs_and_executes_on_every_layer(script: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "ttft.json"
    lengths = [320, 384]
    script.main(["--tiny", "--device", "cpu", "--lengths", *map(str, lengths), "--repeats", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    assert [row["length"] for row in result["lengths"]] == lengths
    assert result["config"]["num_hidden_layers"] == 2 and "structured_qkv" in result["method"]
    params = dict(ANCHOR.build().params, **script.TINY_ANCHOR)
    for row in result["lengths"]:
        q, k, _ = _tiny_qkv(script, row["length"])
        direct = ANCHOR.build(**params).identify(q, k, AttentionContext.for_inputs(q, k)).density()
        run = row[script.PATTERN]
        assert run["sparse_calls"] == 2 and run["fallbacks"] == {}
        assert run["layer_densities"] == {"0": direct, "1": direct} and direct < 1
        assert run["logits_finite"] and run["ms"] > 0 and run["ratio_vs_dense"] > 0
        tested = row[script.GUARD_TESTED]  # anchor.yaml's guard tests every call and, at max_error 1e9, keeps it
        assert tested["layer_densities"] == run["layer_densities"] and tested["fallbacks"] == {}
        assert tested["logits_finite"] and tested["ms"] > 0
    raw = result["lengths"][0]["anchor_yaml_raw_inputs"]  # random weights: near-uniform, so the dense fallback
    assert raw["layer_densities"] == {"0": 1.0, "1": 1.0} and raw["logits_finite"]
    assert raw["sparse_calls"] == 2 and raw["fallbacks"] == {}
    assert "anchor_yaml_raw_inputs" not in result["lengths"][1]


def test_identification_reads_the_held_heads_of_each_call(script: ModuleType) -> None:
    q, k, v = _tiny_qkv(script, 384)
    policy = script.anchor_policy("anchor.yaml", script.PATTERN, min_length=0, **script.TINY_ANCHOR)
    identifier, anchor = policy.identifier(policy.default), ANCHOR.build(**policy.default.as_dict())
    script.SYNTHETIC.hold(q, k)
    # The second KV group alone, as the dispatcher calls it when a plan passes its memory budget.
    ctx = AttentionContext.for_inputs(q[:, 2:], k[:, 1:], head_offset=2, dense_fallback=False)
    plan = identifier.identify(torch.randn_like(q[:, 2:]), torch.randn_like(k[:, 1:]), ctx)
    expected = anchor.identify(q[:, 2:], k[:, 1:], ctx)
    assert torch.equal(plan.indices, expected.indices) and torch.equal(plan.offsets, expected.offsets)


@pytest.mark.parametrize("change", ["length", "heads", "dtype"])
def test_a_call_unlike_the_held_inputs_raises(script: ModuleType, change: str) -> None:
    q, k, _ = _tiny_qkv(script, 384)
    script.SYNTHETIC.hold(q, k)
    policy = script.anchor_policy("anchor.yaml", script.PATTERN)
    identifier = policy.identifier(policy.default)
    call_q, call_k = {"length": (q[:, :, :256], k[:, :, :256]), "heads": (torch.cat([q, q], 1), torch.cat([k, k], 1)),
                      "dtype": (q.float(), k.float())}[change]
    with pytest.raises(ValueError, match="do not match the held synthetic"):
        identifier.identify(call_q, call_k, AttentionContext.for_inputs(call_q, call_k))


def test_the_policy_keeps_anchor_yaml_but_the_pattern(script: ModuleType) -> None:
    shipped = load_policy("anchor.yaml")
    policy = script.anchor_policy("anchor.yaml", script.PATTERN)
    assert policy.min_length == shipped.min_length and policy.default.params == shipped.default.params
    assert policy.default.pattern == script.PATTERN
    assert policy.guard is None  # its plans are made on other inputs than the model's: see anchor_policy
    with pytest.raises(ValueError, match="one anchor default"):
        script.anchor_policy("streaming.yaml", script.PATTERN)
