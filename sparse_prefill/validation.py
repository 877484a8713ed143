"""Input checks shared by the dispatcher and every executor: one message for one mistake."""

from __future__ import annotations

import torch

__all__ = ["validate_attention_inputs"]


def validate_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """q [B, Hq, N, D], k and v [B, Hkv, N, D] on one device with one dtype, Hq a multiple of Hkv."""
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 4:
            raise ValueError(f"{name} must be 4-D [batch, heads, seq_len, head_dim], got shape {tuple(tensor.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    (batch, num_q, seq_len, head_dim), (k_batch, num_kv, k_len, k_dim) = q.shape, k.shape
    if (batch, seq_len, head_dim) != (k_batch, k_len, k_dim) or min(batch, seq_len, head_dim) == 0:
        raise ValueError(
            f"q {tuple(q.shape)} and k/v {tuple(k.shape)} must share non-empty batch, seq_len and head_dim "
            "(sparse prefill covers fresh causal prefill: query length == key length)"
        )
    if num_kv == 0 or num_q % num_kv:
        raise ValueError(f"query heads must be a positive multiple of KV heads (GQA), got Hq={num_q} and Hkv={num_kv}")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device} and {v.device}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
