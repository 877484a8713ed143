"""`anchor`: AnchorAttention (arXiv 2505.23520), difference-aware stripe selection.

Stage 1 takes each query row's maximum score over its windows (initial + local) as the anchor;
stage 2 keeps key column j for a query group when a pooled query block scores it within
``theta`` (natural-log units) of that block's pooled anchor. The result is a
:class:`~sparse_prefill.plan.StripePlan`; any stripe executor (Triton on GPU) runs it.
Defaults were chosen by measurement on real attention: see docs/benchmarks/recall.md.
"""

from __future__ import annotations

import warnings

import torch

from sparse_prefill.interfaces import AttentionContext, HeadValues, Identifier, Parameter, PatternSpec
from sparse_prefill.kernels.runtime import triton_can_run
from sparse_prefill.patterns._checks import allowing, at_least, density, finite, multiple_of
from sparse_prefill.patterns.anchor.reference import anchor_identify_reference
from sparse_prefill.plan import DensePlan, PendingPlan, StripePlan

__all__ = ["ANCHOR", "AnchorIdentifier"]

# The Triton identifier's largest block: patterns/anchor/kernel.py MAX_BLOCK (its kernel 1 holds a block's
# q rows in registers). Not imported: that module loads Triton, which this one defers to identify().
_MAX_BLOCK = 128


@allowing(f"a positive multiple of 16, at most {_MAX_BLOCK}")
def _block_check(value: int) -> str | None:
    """Reject at load time the blocks the Triton identifier would reject at run time."""
    if value > _MAX_BLOCK:
        return f"must be at most {_MAX_BLOCK} (the Triton identifier's limit)"
    return multiple_of(16)(value)


# Reasons already warned about (warnings.warn once per distinct reason, not once per layer and call).
_WARNED: set[str] = set()


class AnchorIdentifier(Identifier):
    """Runs the Triton identifier on CUDA (or under TRITON_INTERPRET=1), the reference elsewhere.

    Inputs the Triton identifier cannot take (its ``not_supported_reasons``: head dim, dtype, too many
    pooled rows per program) go to the reference too, with a warning once per reason: a policy that
    loads never fails mid-generation, and the plan is the same. The Triton identifier honours
    ``ctx.plan_budget`` and ``ctx.defer_sizing``; the reference (CPU, correctness) does neither. Selection is
    not differentiated.
    """

    def __init__(self, theta: float | HeadValues, block: int, group_blocks: int, sink: int, local: int,
                 share_kv_heads: bool, dense_tail: int, dense_above: float) -> None:
        self.params = dict(theta=theta, block=block, group_blocks=group_blocks, sink=sink, local=local,
                           share_kv_heads=share_kv_heads, dense_tail=dense_tail, dense_above=dense_above)

    def identify(self, q: torch.Tensor, k: torch.Tensor, ctx: AttentionContext) -> StripePlan | DensePlan | PendingPlan:
        params = self.params if ctx.dense_fallback else {**self.params, "dense_above": 1.0}
        if isinstance(params["theta"], HeadValues):  # head groups calibrated apart, run as one call
            params = {**params, "theta": params["theta"].for_heads(ctx.head_offset, q.shape[1])}
        if triton_can_run(q.device):
            from sparse_prefill.patterns.anchor.kernel import anchor_identify, not_supported_reasons

            reasons = not_supported_reasons(q.shape[1], k.shape[1], q.shape[-1], q.dtype, block=params["block"],
                                            group_blocks=params["group_blocks"],
                                            share_kv_heads=params["share_kv_heads"])
            if not reasons:
                return anchor_identify(q, k, scale=ctx.scale, max_plan_bytes=ctx.plan_budget,
                                       defer_sizing=ctx.defer_sizing, **params)
            _warn_once(reasons)
        return anchor_identify_reference(q, k, scale=ctx.scale, **params)


def _warn_once(reasons: list[str]) -> None:
    """One warning per reason not yet given in this process."""
    for reason in reasons:
        if reason not in _WARNED:
            _WARNED.add(reason)
            warnings.warn(
                f"anchor: the Triton identifier cannot take these inputs ({reason}); identifying with the "
                "PyTorch reference instead: the same plan, but slower and without the plan memory budget",
                stacklevel=3,
            )


ANCHOR = PatternSpec(
    name="anchor",
    description="AnchorAttention: pattern-based anchor + difference-aware stripe selection",
    parameters={
        "theta": Parameter(float, 7.7, "keep key j if pooled score + theta >= pooled anchor (natural-log units)",
                           finite, per_head=True),
        "block": Parameter(int, 128, f"query rows pooled into one block (multiple of 16, at most {_MAX_BLOCK})",
                           _block_check),
        "group_blocks": Parameter(int, 1, "query blocks sharing one key list", at_least(1)),
        "sink": Parameter(int, 128, "initial keys every query attends densely", at_least(0)),
        "local": Parameter(int, 128, "keys before each query group attended densely (plus its own diagonal)", at_least(0)),
        "share_kv_heads": Parameter(bool, True, "query heads of one KV group share one key list (union)"),
        "dense_tail": Parameter(int, 128, "last prompt rows (the question) whose groups attend every key", at_least(0)),
        "dense_above": Parameter(float, 0.4, "plans denser than this run as dense attention (faster there, and exact)",
                                 density),
    },
    make_identifier=AnchorIdentifier,
)
