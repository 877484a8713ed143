"""What `vertical-slash` and `flexprefill` share: the last queries' attention summed per key column
(vertical lines) and per diagonal (slash lines), and a top-k whose order among equal values is fixed.

:func:`line_scores` broadcasts over leading dims, so the per-head references and the vectorised
identifiers run the same arithmetic (their selections are then equal bit for bit, not only close).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparse_prefill.patterns import _blocks

__all__ = ["largest", "line_scores", "all_line_scores"]


def largest(values: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` largest entries along the last dim, ties to the lower index.

    A stable sort, not ``torch.topk``: topk's order among equal values is unspecified and differs
    between shapes and devices, which would let one head's list depend on how many heads ran with it.
    """
    return values.sort(dim=-1, descending=True, stable=True).indices[..., :count]


def line_scores(q_last: torch.Tensor, k: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(vertical [..., N], slash [..., N]): the last queries' attention (softmax in float32) summed per
    key column and per diagonal ``offset = row - key``.

    q_last [..., L, D] are the last L queries (positions N - L to N - 1); k [..., N, D] broadcasts
    against q_last's leading dims (one KV head read by several query heads).
    """
    seq_len, rows = k.shape[-2], q_last.shape[-2]
    first = seq_len - rows  # keys before the first query precede every row: only the last L keys are masked
    scores = (q_last.float() @ k.float().transpose(-1, -2)) * scale
    later = torch.ones(rows, rows, dtype=torch.bool, device=k.device).triu(1)  # key first + j after query first + r
    scores[..., first:].masked_fill_(later, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    del scores  # the chunk's [..., L, N] buffers: at most three alive at once (probs, reversed, padded)
    # Row r's key on diagonal `offset` is first + r - offset: with the keys reversed, column (L - 1 - r) + offset
    # of row r. Zero-padded by L columns and read with a row stride one shorter than the padded row's, each row
    # starts L - 1 - r further in; offsets past the row read the padding.
    reversed_padded = F.pad(probs.flip(-1), (0, rows))
    batch_shape = reversed_padded.shape[:-2]
    per_row = reversed_padded.flatten(0, -3) if batch_shape else reversed_padded[None]
    width = seq_len + rows
    slash = per_row.as_strided((per_row.shape[0], rows, seq_len), (rows * width, width - 1, 1),
                               storage_offset=rows - 1).sum(dim=-2)
    return probs.sum(dim=-2), slash.view(*batch_shape, seq_len)


def all_line_scores(q: torch.Tensor, k: torch.Tensor, scale: float, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`line_scores` of the last ``rows`` queries of every query head, (vertical, slash) each
    [B, Hq, N] float32; q [B, Hq, N, D], k [B, Hkv, N, D] read in place for GQA. KV heads go in
    chunks whose scores stay under CHUNK_ELEMENTS floats (a loop over chunks, no host sync)."""
    batch, num_q, seq_len, _ = q.shape
    num_kv = k.shape[1]
    group = num_q // num_kv
    vertical = torch.empty(batch, num_q, seq_len, dtype=torch.float32, device=q.device)
    slash = torch.empty_like(vertical)
    step = max(1, _blocks.CHUNK_ELEMENTS // (batch * group * rows * seq_len))
    for start in range(0, num_kv, step):
        end = min(start + step, num_kv)
        q_last = q[:, start * group:end * group, seq_len - rows:].unflatten(1, (end - start, group))
        chunk_vertical, chunk_slash = line_scores(q_last, k[:, start:end, None], scale)
        vertical[:, start * group:end * group] = chunk_vertical.flatten(1, 2)
        slash[:, start * group:end * group] = chunk_slash.flatten(1, 2)
    return vertical, slash
