"""The layers before the one a calibration unit changes, replayed from one dense forward instead of computed.

A KL calibration runs one forward per unit (a setting on one layer or KV group, every other layer dense), and
every layer before the changed one computes exactly what it computed in a dense forward: on average half of each
unit's decoder work is repeated. :class:`DensePrefix` keeps the decoder layers' outputs of one dense forward that
units will need (on the CPU: the accelerator holds one layer's output at a time) and, for a unit whose first
changed layer is L, makes layers 0 to L-1 return the stored output of layer L-1 without computing: layer L
receives what it would have, and what the earlier replayed layers return feeds only the next replayed layer,
which ignores it.

Replay needs the decoder's layers in order (``model.get_decoder().layers``, layer i holding the attention module
of ``layer_idx`` i) and layers whose output depends on their input alone (no state shared between layers, no
hidden states of every layer requested). :meth:`DensePrefix.capture` checks what it can: with as many layers
replayed as any unit will replay, the forward must give the captured log-probabilities exactly. Where the layers
are not found or that check fails it returns None, tells why on the ``sparse_prefill`` logger, and units run
whole.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import torch

from sparse_prefill.evaluation.whole_model import policy_logprobs
from sparse_prefill.policy import Policy

__all__ = ["DensePrefix", "decoder_layers", "replaying"]

_logger = logging.getLogger(__name__)


def decoder_layers(model: Any) -> tuple[list[torch.nn.Module] | None, str]:
    """(the decoder layers in order, "") or (None, why they were not found)."""
    get_decoder = getattr(model, "get_decoder", None)
    layers = getattr(get_decoder() if callable(get_decoder) else None, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        return None, f"{type(model).__name__} has no get_decoder().layers list"
    expected = model.config.get_text_config().num_hidden_layers
    if len(layers) != expected:
        return None, f"get_decoder().layers holds {len(layers)} layers, the config {expected}"
    for index, layer in enumerate(layers):
        indices = {getattr(module, "layer_idx", None) for module in layer.modules()} - {None}
        if indices != {index}:
            return None, f"decoder layer {index} holds modules of layer_idx {sorted(indices)}, not only {index}"
    return list(layers), ""


def _to_device(output: Any, device: torch.device) -> Any:
    """A layer's output (a tensor, or a tuple or list holding tensors) with its tensors copied to ``device``."""
    if isinstance(output, torch.Tensor):
        return output.detach().to(device, copy=True)
    if isinstance(output, (tuple, list)):
        return type(output)(_to_device(item, device) for item in output)
    return output


def _bytes(output: Any) -> int:
    """Bytes of the tensors a layer's output holds."""
    if isinstance(output, torch.Tensor):
        return output.numel() * output.element_size()
    if isinstance(output, (tuple, list)):
        return sum(_bytes(item) for item in output)
    return 0


@dataclass
class DensePrefix:
    """Decoder layers' outputs of one dense forward of one text, on the CPU (None where no unit replays it)."""

    layers: list[torch.nn.Module]
    outputs: list[Any]
    device: torch.device

    @classmethod
    def capture(cls, model: Any, input_ids: torch.Tensor, dense_policy: Policy, score_last: int,
                first_changed: Iterable[int] | None = None) -> "DensePrefix | None":
        """The outputs of a forward under ``dense_policy`` (the policy the units run every other layer with) that
        units changing ``first_changed`` (default: every layer) replay; None where no unit would replay, or (told
        on the logger) where replaying would not reproduce that forward. Only the outputs replayed are kept."""
        layers, why = decoder_layers(model)
        if layers is None:
            _logger.warning("calibration units run whole: %s", why)
            return None
        changed = range(len(layers)) if first_changed is None else first_changed
        kept = sorted({layer - 1 for layer in changed if layer > 0})
        if not kept:
            return None
        outputs: list[Any] = [None] * len(layers)

        def keep(index: int) -> Any:
            def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
                outputs[index] = _to_device(output, torch.device("cpu"))
            return hook

        handles = [layers[index].register_forward_hook(keep(index)) for index in kept]
        try:
            expected, _ = policy_logprobs(model, input_ids, dense_policy, score_last)
        finally:
            for handle in handles:
                handle.remove()
        prefix = cls(layers, outputs, next(model.parameters()).device)
        deepest = kept[-1] + 1  # the most layers any unit replays
        with replaying(prefix, deepest):
            replayed, _ = policy_logprobs(model, input_ids, dense_policy, score_last)
        if not torch.equal(expected, replayed):
            difference = float((expected - replayed).abs().max())
            _logger.warning("calibration units run whole: replaying the first %d layers changed the dense "
                            "log-probabilities by up to %.3g (layers that share state?)", deepest, difference)
            return None
        stored = sum(_bytes(output) for output in outputs)
        _logger.info("calibration units replay the layers before their own from one dense forward (%d outputs "
                     "kept, %.2f GB on the host)", len(kept), stored / 2**30)
        return prefix


@contextlib.contextmanager
def replaying(prefix: DensePrefix | None, first_changed: int) -> Iterator[None]:
    """Within: layers before ``first_changed`` return ``prefix``'s stored output of layer ``first_changed - 1``
    instead of computing (nothing changes for None or layer 0)."""
    if prefix is None or first_changed <= 0:
        yield
        return
    stored = _to_device(prefix.outputs[first_changed - 1], prefix.device)
    replayed: Sequence[torch.nn.Module] = prefix.layers[:first_changed]
    own_forwards = [layer.__dict__.get("forward") for layer in replayed]  # an instance's own (accelerate's hooks)

    def replay(*args: Any, **kwargs: Any) -> Any:
        return stored

    for layer in replayed:
        setattr(layer, "forward", replay)
    try:
        yield
    finally:
        for layer, own in zip(replayed, own_forwards):
            if own is None:
                delattr(layer, "forward")
            else:
                setattr(layer, "forward", own)
