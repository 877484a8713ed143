"""Which layers carry a policy's loss: the policy on one layer alone, every other layer dense.

A whole model's KL(dense || policy) says how much a policy changes the answers, not where. Run on one
layer at a time, the rest on the model's own attention, each layer's KL is its share. Shares do not add up
to the whole exactly (layers interact: on Qwen2.5-Coder-0.5B at 8k they summed to 0.77x the whole policy's
KL), but they point at the layer to fix: that is how calibrated groups written as a theta that ran sparse
on other text were found (docs/benchmarks/whole_model.md). Cost: one forward per layer.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Sequence

import torch

from sparse_prefill.evaluation.layer_budget import DENSE
from sparse_prefill.evaluation.whole_model import kl_per_position, policy_logprobs
from sparse_prefill.policy import Policy, load_policy, selector_items

__all__ = ["policy_on_layer", "layer_kl_shares"]


def policy_on_layer(policy: Policy, layer: int, num_heads: int) -> Policy:
    """``policy`` as it acts on ``layer`` (each query head's choice, its guard and min_length), every other
    layer dense. ``num_heads``: the model's query heads per layer."""
    overrides = [{"layers": layer, "heads": selector_items(group.heads), "pattern": group.choice.pattern,
                  **group.choice.as_dict()}
                 for group in policy.assign_heads(layer, num_heads)]
    alone = load_policy({"min_length": policy.min_length, "default": {"pattern": DENSE}, "overrides": overrides})
    return dataclasses.replace(alone, guard=policy.guard, source=f"{policy.source}, layer {layer} alone")


def layer_kl_shares(model: Any, input_ids: torch.Tensor, policy: Policy, layers: Sequence[int], score_last: int,
                    reference: torch.Tensor, progress: Callable[[Iterable[Any]], Iterable[Any]] = iter,
                    ) -> dict[int, float]:
    """Layer -> mean KL(dense || ``policy`` on that layer alone) at the last ``score_last`` positions;
    ``reference``: the dense model's log-probabilities there."""
    num_heads = model.config.get_text_config().num_attention_heads
    shares = {}
    for layer in progress(layers):
        logprobs, _ = policy_logprobs(model, input_ids, policy_on_layer(policy, layer, num_heads), score_last)
        shares[layer] = float(kl_per_position(reference, logprobs).mean())
    return shares
