"""A third-party pattern for sparse-prefill: block-granular sink + local window."""

from __future__ import annotations

import torch

from sparse_prefill import AttentionContext, BlockPlan, Identifier, Parameter, PatternSpec
from sparse_prefill.hookspecs import hookimpl


class LocalBlocksIdentifier(Identifier):
    def __init__(self, block_size: int, window_blocks: int) -> None:
        self.block_size, self.window_blocks = block_size, window_blocks

    def identify(self, q: torch.Tensor, k: torch.Tensor, ctx: AttentionContext) -> BlockPlan:
        batch, heads, seq_len = q.shape[0], q.shape[1], q.shape[2]
        num_blocks = -(-seq_len // self.block_size)
        rows = []
        for i in range(num_blocks):
            rows.append(sorted({0, *range(max(0, i - self.window_blocks + 1), i + 1)}))
        per_head = torch.tensor([b for row in rows for b in row], dtype=torch.int32, device=q.device)
        counts = torch.tensor([len(row) for row in rows], dtype=torch.int64, device=q.device)
        counts = counts.repeat(batch * heads)
        offsets = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=q.device)
        offsets[1:] = counts.cumsum(0)
        return BlockPlan(batch, heads, seq_len, self.block_size, offsets, per_head.repeat(batch * heads))


def _positive(value: int) -> str | None:
    return None if value > 0 else "must be > 0"


LOCAL_BLOCKS = PatternSpec(
    name="local-blocks",
    description="first key block + the last window_blocks key blocks (block-sparse, static)",
    parameters={
        "block_size": Parameter(int, 64, "rows and keys per block", _positive),
        "window_blocks": Parameter(int, 4, "key blocks up to and including the diagonal", _positive),
    },
    make_identifier=LocalBlocksIdentifier,
)


@hookimpl
def sparse_prefill_patterns() -> list[PatternSpec]:
    return [LOCAL_BLOCKS]
