"""Per-layer attention recall of a policy's plans, on the dense model's own q and k.

`sparse-prefill eval --recall` reports, beside each layer's density, how much softmax mass its
plans keep, on average and for its worst query head (on real attention, patterns of equal mean recall differ
most in their worst heads: docs/benchmarks/patterns.md). Each layer's post-RoPE q and k come from one dense
forward (:func:`capture_qk`); the identifier the policy assigns to each head group (:meth:`Policy.call_groups`,
as attention runs them) makes its plan from them, as the Hugging Face integration would, and
:func:`head_recalls` measures it per query head. Under
the policy a layer's inputs also carry the earlier sparse layers' changes; that second-order difference is
left out, so every policy is judged on the same q and k. The softmax scale is 1/sqrt(head dim), the scale of every
model measured here (Gemma 3's query_pre_attn_scalar equals its head dim).
"""

from __future__ import annotations

from typing import Iterable, Iterator, Mapping

import torch

from sparse_prefill.evaluation.recall import head_recalls
from sparse_prefill.integrations.head_groups import kv_aligned_chunks
from sparse_prefill.interfaces import AttentionContext
from sparse_prefill.plan import Plan
from sparse_prefill.policy import Policy

__all__ = ["layer_head_recalls", "policy_layer_head_recalls", "policy_layer_plans"]


def policy_layer_plans(q: torch.Tensor, k: torch.Tensor, policy: Policy, layer: int, dense_fallback: bool = True,
                       ) -> Iterator[tuple[list[int], list[int], Plan, AttentionContext]]:
    """(query heads, KV heads, plan, context) of each call one layer's attention makes under ``policy``: the
    identifier each head group is assigned, on the heads' q [B, Hq, N, D] and k [B, Hkv, N, D], split as the
    Hugging Face integration splits them. ``dense_fallback`` False measures the selection itself."""
    num_q, num_kv = q.shape[1], k.shape[1]
    for assignment in policy.call_groups(layer, num_q):
        identifier = policy.identifier(assignment.choice)
        for q_heads, kv_heads in kv_aligned_chunks(assignment.heads, num_q // num_kv):
            q_part, k_part = q[:, q_heads], k[:, kv_heads]
            ctx = AttentionContext.for_inputs(q_part, k_part, layer_idx=layer, head_offset=q_heads[0],
                                              dense_fallback=dense_fallback)
            with torch.inference_mode():
                plan = identifier.identify(q_part, k_part, ctx)
            yield q_heads, kv_heads, plan, ctx


def layer_head_recalls(q: torch.Tensor, k: torch.Tensor, policy: Policy, layer: int, dense_fallback: bool = True,
                       ) -> tuple[list[float], float]:
    """(each query head's recall, the plans' density with heads weighted equally) of one layer's calls under
    ``policy`` (:func:`policy_layer_plans`); ``dense_fallback`` False measures the selection itself."""
    heads, density = [0.0] * q.shape[1], 0.0
    for q_heads, kv_heads, plan, ctx in policy_layer_plans(q, k, policy, layer, dense_fallback):
        kept = head_recalls(q[:, q_heads], k[:, kv_heads], [plan], ctx.scale)[0].tolist()
        for head, recall in zip(q_heads, kept):
            heads[head] = recall
        density += plan.density() * len(q_heads) / q.shape[1]
    return heads, density


def policy_layer_head_recalls(qk: Mapping[int, tuple[torch.Tensor, torch.Tensor]], policy: Policy,
                              layers: Iterable[int]) -> dict[int, list[float]]:
    """Each query head's recall per layer under the plans ``policy`` makes from ``qk[layer]``.

    Layers shorter than the policy's ``min_length`` run dense and are left out, like layers not in ``qk``.
    """
    recalls = {}
    for layer in layers:
        if layer not in qk:
            continue
        q, k = qk[layer]
        if q.shape[2] < policy.min_length:
            continue
        recalls[layer] = layer_head_recalls(q, k, policy, layer)[0]
    return recalls

