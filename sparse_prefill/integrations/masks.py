"""Masks for the sparse path: transformers' mask function replaced by one that defers the S x S mask.

On a fresh causal prefill the attention function gets a :class:`DeferredMask`: the 2-D padding
mask plus a recipe for the exact mask the model's previous implementation would have built, so the
sparse path never builds an S x S tensor and the dense fallback still gets the exact mask.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch

__all__ = ["DeferredMask"]


@dataclass
class DeferredMask:
    """What the attention function receives on a fresh prefill.

    ``padding`` is the [B, N] boolean mask of real tokens, or None when nothing is padded;
    ``materialize()`` builds (once) the mask the previous implementation expects. Both derived
    values are computed once per forward and shared by every layer.
    """

    padding: torch.Tensor | None
    build: Callable[[], Any]

    def materialize(self) -> Any:
        return self._mask

    def sequence_ranges(self) -> list[tuple[int, int]] | None:
        """[start, end) of each sequence's real tokens, or None if some sequence has holes.

        One host sync per forward (not per layer): the ranges decide how the batch is split.
        """
        return self._ranges

    @functools.cached_property
    def _mask(self) -> Any:
        return self.build()

    @functools.cached_property
    def _ranges(self) -> list[tuple[int, int]] | None:
        return _valid_ranges(self.padding)


def _valid_ranges(padding: torch.Tensor) -> list[tuple[int, int]] | None:
    """Per row of ``padding`` [B, N], [first real, last real + 1) if the real tokens are contiguous."""
    real = padding.int()
    first = real.argmax(dim=1)
    end = padding.shape[1] - real.flip(1).argmax(dim=1)
    contiguous = (real.sum(dim=1) == end - first) & padding.any(dim=1)
    if not bool(contiguous.all()):
        return None
    return list(zip(first.tolist(), end.tolist()))


def _is_fresh_prefill(q_length: int, kv_length: int, q_offset: Any, kv_offset: Any, allow_is_causal_skip: bool) -> bool:
    """A plain causal prefill with no cached prefix (custom mask overlays and packing disable the skip)."""
    offsets_zero = isinstance(q_offset, int) and isinstance(kv_offset, int) and q_offset == 0 and kv_offset == 0
    return offsets_zero and q_length == kv_length and allow_is_causal_skip


def _make_mask_function(previous_mask: Callable[..., Any]) -> Callable[..., Any]:
    def mask_function(
        batch_size: int,
        q_length: int,
        kv_length: int,
        q_offset: Any = 0,
        kv_offset: Any = 0,
        attention_mask: torch.Tensor | None = None,
        allow_is_causal_skip: bool = True,
        **kwargs: Any,
    ) -> Any:
        arguments = dict(
            batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
            kv_offset=kv_offset, attention_mask=attention_mask, allow_is_causal_skip=allow_is_causal_skip, **kwargs,
        )
        build = functools.partial(previous_mask, **arguments)
        if not _is_fresh_prefill(q_length, kv_length, q_offset, kv_offset, allow_is_causal_skip):
            return build()
        # Sliding and chunked layers pass their window here only (Llama 4, PhiMoE, Qwen2-MoE
        # never hand it to attention); a window at least as long as the keys is plain causal.
        local_size = kwargs.get("local_size")
        if local_size is not None and kv_length > local_size:
            return build()
        padding = None
        if attention_mask is not None:
            padding = attention_mask[:, -kv_length:].bool()
            if bool(padding.all()):
                padding = None
        return DeferredMask(padding=padding, build=build)

    return mask_function
