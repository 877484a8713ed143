"""Masks for the sparse path: transformers' mask function replaced by one that defers the S x S mask.

On a fresh causal prefill the attention function gets a :class:`DeferredMask`: the 2-D padding
mask plus a recipe for the exact mask the model's previous implementation would have built, so the
sparse path never builds an S x S tensor and the dense fallback still gets the exact mask.

A fresh prefill is one whose queries and keys both start at position 0. A preallocated cache
(transformers' ``StaticCache``, ``cache_implementation="static"``) hands attention its whole buffer,
more keys than queries; under the causal mask row i attends keys 0..i only, so such a prefill is
the same attention over the first ``q_length`` keys, and the deferred mask says so (``key_length``).
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
    key_length: int  # keys the prefill attends: the first ones of those attention receives (= the queries)

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
    """A plain causal prefill with no cached prefix (custom mask overlays and packing disable the skip).

    ``kv_length`` may exceed ``q_length`` for a preallocated cache (its buffer's length); its query
    offset is then a 0-dim tensor once the cache holds tensors, read here on multi-token calls only (one
    host sync per forward; decode steps, which transformers may compile, are never read).
    """
    if kv_length < q_length or not allow_is_causal_skip or not isinstance(kv_offset, int) or kv_offset != 0:
        return False
    if isinstance(q_offset, torch.Tensor):
        return q_length > 1 and q_offset.numel() == 1 and int(q_offset) == 0
    return isinstance(q_offset, int) and q_offset == 0


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
        # never hand it to attention); a window at least as long as the input is plain causal.
        local_size = kwargs.get("local_size")
        if local_size is not None and q_length > local_size:
            return build()
        padding = None
        if attention_mask is not None:
            if attention_mask.shape[-1] < q_length:  # transformers pads it with masked keys: let it
                return build()
            padding = attention_mask[:, :q_length].bool()  # column j is key position j (kv_offset 0)
            if bool(padding.all()):
                padding = None
        return DeferredMask(padding=padding, build=build, key_length=q_length)

    return mask_function


GENERATE_MASKS = "create_masks_for_generate"  # the model attribute generate() builds its masks through


class PrefillMasksInForward:
    """A patched model's ``create_masks_for_generate``: multi-token calls leave the mask to the forward.

    With a preallocated cache (``cache_implementation="static"``) ``generate`` builds the masks before each
    forward, through the mask function, and hands the forward what it returns as its attention mask. A
    :class:`DeferredMask` is not something a forward takes as one, so for a prefill (more than one new
    token, on generate's first iteration) the 2-D mask goes to the forward unchanged and the forward builds
    its masks itself, as it does with a dynamic cache; decode steps (one token) and later multi-token steps
    (assisted decoding's checks, never a fresh prefill) keep the model's own pre-built masks, which a compiled
    step needs. ``previous`` is what the model had (a bound method is rebound by ``copy.deepcopy``).
    """

    def __init__(self, previous: Callable[..., Any], was_instance_attribute: bool) -> None:
        self.previous = previous
        self.was_instance_attribute = was_instance_attribute

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        inputs_embeds = kwargs.get("inputs_embeds")
        first = kwargs.get("is_first_iteration", True) is not False  # passed by transformers 5.17 and 5.25
        if first and inputs_embeds is not None and inputs_embeds.shape[1] > 1:
            return kwargs.get("attention_mask")
        return self.previous(*args, **kwargs)

    @classmethod
    def install(cls, model: Any) -> None:
        from transformers.masking_utils import create_masks_for_generate

        previous = getattr(model, GENERATE_MASKS, None)
        setattr(model, GENERATE_MASKS, cls(previous or create_masks_for_generate, GENERATE_MASKS in vars(model)))

    @staticmethod
    def uninstall(model: Any) -> None:
        installed = vars(model).get(GENERATE_MASKS)
        if not isinstance(installed, PrefillMasksInForward):
            return
        if installed.was_instance_attribute:
            setattr(model, GENERATE_MASKS, installed.previous)
        else:
            delattr(model, GENERATE_MASKS)
