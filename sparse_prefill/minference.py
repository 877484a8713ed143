"""MInference's per-head pattern files as sparse-prefill policies (`sparse-prefill convert-minference`).

MInference (arXiv 2407.02490) ships, per model, a JSON list with one entry per layer; each maps a
head index (a string) to ``[type, vertical_size, slash_size, score]``. The score is what its
offline search measured and is not needed to run. The three types become these patterns:

==================== ================================================================================
MInference type      pattern here
==================== ================================================================================
vertical_and_slash   ``vertical-slash`` with ``vertical = vertical_size``, ``slash = slash_size``
stream_llm           ``streaming`` with ``sink = vertical_size`` and ``local = slash_size`` (MInference
                     passes them as the initial and the local token counts)
block_sparse         ``block-topk`` with ``blocks = 100`` of ``block = 64``: MInference's block-sparse
                     kernel keeps the top 100 blocks of 64 whatever the entry's sizes say
==================== ================================================================================

The policy's default is the most common choice; every other head is an override, consecutive heads
of one layer with one choice joined into a range. Anything else is refused, naming the layer, the
head and what is allowed: the configuration users have must convert whole or not at all.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Mapping

from sparse_prefill.policy import PolicyError, selector_items

__all__ = ["MINFERENCE_TYPES", "MInferenceConfigError", "convert_minference"]

# MInference's block_sparse kernel: the top 100 key blocks of 64 per query block.
BLOCK_SPARSE_BLOCKS = 100
BLOCK_SPARSE_BLOCK = 64


def _vertical_slash(vertical: int, slash: int) -> dict[str, Any]:
    return {"pattern": "vertical-slash", "vertical": vertical, "slash": slash}


def _streaming(vertical: int, slash: int) -> dict[str, Any]:
    return {"pattern": "streaming", "sink": vertical, "local": slash}


def _block_sparse(vertical: int, slash: int) -> dict[str, Any]:
    return {"pattern": "block-topk", "blocks": BLOCK_SPARSE_BLOCKS, "block": BLOCK_SPARSE_BLOCK}


MINFERENCE_TYPES = {"vertical_and_slash": _vertical_slash, "stream_llm": _streaming, "block_sparse": _block_sparse}


class MInferenceConfigError(PolicyError):
    """An MInference configuration that cannot be converted; the message names the layer and head."""


def _layers(config: Any, source: str) -> list[tuple[int, Any]]:
    """(layer index, head mapping) pairs from a list of layers or a mapping of layer index to heads."""
    if isinstance(config, list):
        return list(enumerate(config))
    if isinstance(config, Mapping):
        return [(_index(key, f"{source}: layer key {key!r}"), heads) for key, heads in config.items()]
    raise MInferenceConfigError(f"{source}: expected a JSON list with one object per layer (MInference's "
                                f"format), got {type(config).__name__}")


def _index(key: Any, where: str) -> int:
    text = str(key)
    if not (text.isascii() and text.isdigit()):
        raise MInferenceConfigError(f"{where}: expected a non-negative integer index")
    return int(text)


def _size(value: Any, where: str, name: str) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise MInferenceConfigError(f"{where}: {name} must be an integer >= 0, got {value!r}")
    return value


def _choice(entry: Any, where: str) -> dict[str, Any]:
    allowed = ", ".join(MINFERENCE_TYPES)
    if not isinstance(entry, (list, tuple)) or not 3 <= len(entry) <= 4:
        raise MInferenceConfigError(f"{where}: expected [type, vertical_size, slash_size, score], got {entry!r}")
    kind = entry[0]
    if kind not in MINFERENCE_TYPES:
        raise MInferenceConfigError(f"{where}: unknown pattern type {kind!r}; allowed: {allowed}")
    vertical = _size(entry[1], where, "vertical_size")
    slash = _size(entry[2], where, "slash_size")
    return MINFERENCE_TYPES[kind](vertical, slash)


def _ranges(heads: list[int]) -> int | str | list[int | str]:
    """Sorted head indices in the policy's forms, runs as "a-b": [0, 1, 2, 5] -> ["0-2", 5]; one run alone."""
    items = selector_items(heads)
    return items[0] if len(items) == 1 else items


def convert_minference(config: list | dict, source: str = "<config>") -> dict[str, Any]:
    """The policy dict (see :mod:`sparse_prefill.policy`) of an MInference per-head configuration.

    ``config`` is the parsed JSON: a list with one ``{head: [type, vertical_size, slash_size, score]}``
    per layer (a mapping from layer index to the same is taken too). Every layer must list the same
    heads. Raises :class:`MInferenceConfigError` naming ``source``, the layer, the head and what is
    allowed. ``min_length`` is 0: MInference itself runs its patterns at every length.
    """
    choices: dict[tuple[int, int], dict[str, Any]] = {}
    expected_heads: set[int] | None = None
    for layer, heads in _layers(config, source):
        if not isinstance(heads, Mapping) or not heads:
            raise MInferenceConfigError(f"{source}: layer {layer}: expected an object mapping head index to "
                                        f"[type, vertical_size, slash_size, score], got {heads!r}")
        indices = set()
        for key, entry in heads.items():
            head = _index(key, f"{source}: layer {layer}, head key {key!r}")
            choices[layer, head] = _choice(entry, f"{source}: layer {layer}, head {head}")
            indices.add(head)
        if expected_heads is not None and indices != expected_heads:
            missing = sorted(expected_heads - indices) or sorted(indices - expected_heads)
            raise MInferenceConfigError(f"{source}: layer {layer} lists heads {sorted(indices)} but earlier layers "
                                        f"{sorted(expected_heads)} (differs at {missing}); every layer must list "
                                        "the same heads")
        expected_heads = indices
    if not choices:
        raise MInferenceConfigError(f"{source}: no layers; expected a JSON list with one object per layer")

    keyed = {key: tuple(choice.items()) for key, choice in choices.items()}
    default = Counter(keyed.values()).most_common(1)[0][0]
    overrides = []
    for layer in sorted({layer for layer, _ in keyed}):
        by_choice: dict[tuple, list[int]] = {}
        for (entry_layer, head), choice in sorted(keyed.items()):
            if entry_layer == layer and choice != default:
                by_choice.setdefault(choice, []).append(head)
        for choice, heads in by_choice.items():
            overrides.append({"layers": layer, "heads": _ranges(heads), **dict(choice)})
    return {"min_length": 0, "default": dict(default), "overrides": overrides}
