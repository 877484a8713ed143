"""Query heads split into calls that keep GQA groups whole (a per-head policy's head groups)."""

from __future__ import annotations

__all__ = ["kv_aligned_chunks"]


def kv_aligned_chunks(heads: tuple[int, ...], group: int) -> list[tuple[list[int], list[int]]]:
    """Split query heads into (query heads, kv heads) chunks that keep GQA groups whole.

    Each run of adjacent complete KV groups is one call, so a chunk's heads are consecutive and its
    ``head_offset`` is exact; a KV group only partly in ``heads`` runs head by head against its
    single KV head (a view, never a copy per query head).
    """
    head_set = set(heads)
    runs: list[tuple[list[int], list[int]]] = []
    partial: list[tuple[list[int], list[int]]] = []
    for kv in sorted({h // group for h in heads}):
        members = list(range(kv * group, (kv + 1) * group))
        if not head_set.issuperset(members):
            partial.extend(([h], [kv]) for h in members if h in head_set)
        elif runs and runs[-1][1][-1] == kv - 1:
            runs[-1][0].extend(members)
            runs[-1][1].append(kv)
        else:
            runs.append((members, [kv]))
    return runs + partial
