"""Perplexity of a causal LM on long text, dense and under sparse-prefill policies.

One forward over the whole text (a fresh prefill, so the sparse path runs at or above each
policy's ``min_length``); the loss is averaged over the last ``score_last`` tokens, where long
context matters most and where sparse attention has the most keys to drop.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch

from sparse_prefill.evaluation import BASELINE_LABEL
from sparse_prefill.integrations.huggingface import apply, remove
from sparse_prefill.policy import PolicySource

__all__ = ["perplexity", "compare_perplexity"]


def perplexity(model: Any, input_ids: torch.Tensor, score_last: int | None = None) -> float:
    """exp(mean next-token loss) over the last ``score_last`` predictions of ``input_ids`` [1, N]."""
    n = input_ids.shape[1]
    score_last = n - 1 if score_last is None else score_last
    if not 0 < score_last < n:
        raise ValueError(f"score_last must be in [1, {n - 1}] for {n} tokens, got {score_last}")
    device = next(model.parameters()).device
    ids = input_ids.to(device)
    # Only the scored positions' logits: all N of them would be N x vocab floats (34 GB for
    # Llama-3 at 128k in bf16). Models whose forward lacks logits_to_keep return all of them.
    keep = {"logits_to_keep": score_last + 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    with torch.inference_mode():
        logits = model(ids, use_cache=False, **keep).logits[0, -score_last - 1 : -1].float()
    loss = torch.nn.functional.cross_entropy(logits, ids[0, -score_last:])
    return math.exp(float(loss))


def _check_labels(policies: dict[str, Any]) -> None:
    if BASELINE_LABEL in policies:
        raise ValueError(f"the label {BASELINE_LABEL!r} names the unpatched model's result; give the policy another")


def compare_perplexity(model: Any, input_ids: torch.Tensor, policies: dict[str, PolicySource],
                       score_last: int | None = None, summaries: dict[str, str] | None = None) -> dict[str, float]:
    """Perplexity dense and under each labelled policy; the model is restored after each.

    ``summaries``, when given, receives each label's ``handle.stats.summary()`` (what ran, densities
    collected for it at a host sync per plan).
    """
    _check_labels(policies)
    results = {BASELINE_LABEL: perplexity(model, input_ids, score_last)}
    for label, policy in policies.items():
        handle = apply(model, policy, collect_stats=summaries is not None)
        try:
            results[label] = perplexity(model, input_ids, score_last)
        finally:
            remove(model)
        if summaries is not None:
            summaries[label] = handle.stats.summary()
    return results
