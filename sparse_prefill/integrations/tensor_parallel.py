"""Tensor parallelism: which global heads this rank's attention holds, so that per-head policies, written in
global head indices, land on the right heads."""

from __future__ import annotations

from typing import Any, Mapping

__all__ = ["tp_head_offset"]

# Query projections of transformers' attention classes, and the TP styles that keep every head
# on every rank (the projection's output is gathered). A "colwise" rule on an unfused projection
# splits the heads; on a fused one (qkv) the head layout is model-specific.
_QUERY_PROJECTIONS = ("q_proj", "q_b_proj", "qkv_proj", "query_key_value")
_UNFUSED_QUERY_PROJECTIONS = ("q_proj", "q_b_proj")
_GATHERED_STYLES = ("colwise_gather_output", "colwise_rep")


def tp_head_offset(tp_plan: Mapping[str, str], tp_size: int, tp_rank: int, num_heads: int, num_kv_heads: int) -> int:
    """Global index of the first query head that tensor-parallel rank ``tp_rank`` holds.

    A "colwise" rule shards a projection's output features into ``tp_size`` contiguous slices in
    rank order, so with whole heads per slice rank r holds query heads [r*H/tp, (r+1)*H/tp) and
    the KV heads they read. Any layout this cannot vouch for raises: per-head policies would
    otherwise silently run on the wrong heads.
    """
    if tp_size == 1:
        return 0
    rules = {(key.rsplit(".", 1)[-1], style) for key, style in tp_plan.items()
             if key.rsplit(".", 1)[-1] in _QUERY_PROJECTIONS}
    if rules and all(style in _GATHERED_STYLES for _, style in rules):
        return 0
    if not rules or any(name not in _UNFUSED_QUERY_PROJECTIONS or style != "colwise" for name, style in rules):
        raise ValueError(
            f"cannot tell which attention heads tensor-parallel rank {tp_rank} holds: the TP plan's query-projection "
            f"rules are {sorted(rules) or 'missing'}; sparse prefill supports 'colwise' on "
            f"{' or '.join(_UNFUSED_QUERY_PROJECTIONS)} (heads split across ranks) or {' / '.join(_GATHERED_STYLES)} "
            "(every rank keeps every head)"
        )
    if num_heads % tp_size or num_kv_heads % tp_size:
        raise ValueError(
            f"{num_heads} query heads and {num_kv_heads} KV heads do not split evenly over tp_size={tp_size}; "
            "sparse prefill needs whole heads and whole GQA groups on every rank"
        )
    return tp_rank * (num_heads // tp_size)


def _model_head_offset(model: Any) -> int:
    """:func:`tp_head_offset` of this process for a model loaded with transformers' TP (0 without it)."""
    tp_size = getattr(model, "tp_size", None) or 1
    if tp_size == 1:
        return 0
    mesh = getattr(model, "_device_mesh", None)
    if mesh is None:
        raise ValueError(f"model reports tp_size={tp_size} but has no device mesh to read this process's TP rank from")
    tp_rank = mesh.get_local_rank("tp") if mesh.ndim > 1 else mesh.get_local_rank()
    config = model.config.get_text_config()
    num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return tp_head_offset(model.tp_plan or {}, tp_size, tp_rank, config.num_attention_heads, num_kv_heads)
