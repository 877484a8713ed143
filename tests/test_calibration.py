"""Oracle densities (evaluation.recall) against their dense definition, and the trend the calibration relies on."""

from __future__ import annotations

import itertools

import pytest
import torch

from sparse_prefill.evaluation.recall import attention_recall, oracle_row_density, oracle_stripe_plan
from sparse_prefill.evaluation.synthetic import structured_qkv
from sparse_prefill.patterns.anchor.reference import anchor_identify_reference

TARGET = 0.95


def _dense_probs(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Full causal softmax [B, Hq, N, N] in fp64 (small inputs only)."""
    n = q.shape[2]
    scores = scale * q.double() @ k.double().repeat_interleave(q.shape[1] // k.shape[1], dim=1).transpose(-1, -2)
    return scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf")).softmax(dim=-1)


def _random_qk(seq_len: int = 150) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return 2 * torch.randn(2, 4, seq_len, 16, generator=gen), 2 * torch.randn(2, 2, seq_len, 16, generator=gen)


def test_row_oracle_keeps_each_rows_fewest_keys() -> None:
    q, k = _random_qk()
    probs = _dense_probs(q, k, 0.25)
    needed = (probs.sort(dim=-1, descending=True).values.cumsum(dim=-1) < TARGET).sum(dim=-1) + 1
    n = q.shape[2]
    assert oracle_row_density(q, k, 0.25, TARGET) == pytest.approx(float(needed.sum()) / (2 * 4 * n * (n + 1) / 2))


def test_stripe_oracle_reaches_the_target_in_every_block_with_fewest_columns() -> None:
    q, k = _random_qk()
    block, sink = 16, 8
    plan = oracle_stripe_plan(q, k, 0.25, TARGET, block=block, sink=sink)
    probs, mask = _dense_probs(q, k, 0.25), plan.to_dense()
    assert attention_recall(q, k, plan, 0.25) >= TARGET
    for start in range(0, q.shape[2], block):
        rows = slice(start, start + block)
        kept = (probs[:, :, rows] * mask[:, :, rows]).sum(dim=(-1, -2)) / probs[:, :, rows].shape[2]
        assert bool((kept >= TARGET - 1e-6).all()), f"block at row {start} keeps {kept}"
        if start <= sink:
            continue  # no candidate columns: the windows cover the block's whole causal range
        # Minimal: without its lightest selected column, a block that selected any falls below the target.
        columns = probs[:, :, rows, sink:start].sum(dim=-2)
        stripes = mask[:, :, start, sink:start]
        lightest = columns.masked_fill(~stripes, float("inf")).amin(dim=-1)
        chose = stripes.any(dim=-1)
        assert bool((kept[chose] - lightest[chose] / probs[:, :, rows].shape[2] < TARGET).all())


def test_shared_stripe_oracle_reaches_the_target_per_kv_group_with_fewest_columns() -> None:
    """With ``share_kv_heads`` one list serves a KV group's query heads (anchor's default): each block keeps the
    target on average over the group's heads and rows, and drops below it without its lightest column."""
    q, k = _random_qk()
    block, sink, group = 16, 8, q.shape[1] // k.shape[1]
    plan = oracle_stripe_plan(q, k, 0.25, TARGET, block=block, sink=sink, share_kv_heads=True)
    assert plan.plan_heads == k.shape[1]
    probs = _dense_probs(q, k, 0.25).unflatten(1, (k.shape[1], group))  # [B, Hkv, group, N, N]
    mask = plan.to_dense().unsqueeze(2)  # [B, Hkv, 1, N, N]
    assert attention_recall(q, k, plan, 0.25) >= TARGET
    for start in range(0, q.shape[2], block):
        rows = slice(start, start + block)
        count = group * probs[..., rows, :].shape[-2]
        kept = (probs[..., rows, :] * mask[..., rows, :]).sum(dim=(-1, -2, -3)) / count
        assert bool((kept >= TARGET - 1e-6).all()), f"block at row {start} keeps {kept}"
        if start <= sink:
            continue
        columns = probs[..., rows, sink:start].sum(dim=(-2, -3))
        stripes = mask[:, :, 0, start, sink:start]
        lightest = columns.masked_fill(~stripes, float("inf")).amin(dim=-1)
        chose = stripes.any(dim=-1)
        assert bool((kept[chose] - lightest[chose] / count < TARGET).all())


def test_synthetic_inputs_get_sparser_as_strength_grows() -> None:
    """The calibration (docs/benchmarks/calibration.md) interpolates along this monotone trend."""
    densities = []
    for strength in (0.8, 0.9, 1.0):
        q, k, _ = structured_qkv(2048, 2, 1, 128, dtype=torch.float32, device="cpu", strength=strength)
        densities.append((oracle_row_density(q, k, 128**-0.5), oracle_stripe_plan(q, k, 128**-0.5).density()))
    for (row_a, stripe_a), (row_b, stripe_b) in itertools.pairwise(densities):
        assert row_b < row_a and stripe_b < stripe_a
    assert all(row < stripe for row, stripe in densities)


def test_heavy_hitters_carry_mass_the_anchor_policy_selects() -> None:
    """The 2-D calibration (docs/benchmarks/calibration.md) relies on this: more heavy hitters, higher anchor recall,
    and where the background is light (strength 0.9) more selected columns."""
    results = {}
    for strength, heavy_fraction in itertools.product((0.8, 0.9), (0.002, 0.05)):
        q, k, _ = structured_qkv(2048, 2, 1, 128, dtype=torch.float32, device="cpu", strength=strength,
                                 heavy_fraction=heavy_fraction)
        plan = anchor_identify_reference(q, k, scale=128**-0.5, theta=8.5, block=128, group_blocks=1, sink=128,
                                         local=128, share_kv_heads=False)
        results[strength, heavy_fraction] = attention_recall(q, k, plan, 128**-0.5), plan.density()
    for strength in (0.8, 0.9):
        assert results[strength, 0.05][0] > results[strength, 0.002][0]
    assert results[0.9, 0.05][1] > results[0.9, 0.002][1]
