"""A progress bar over decoder layers for each prefill: on a CPU one prefill of a long prompt takes
minutes, and without it the command says nothing between loading the weights and the result.

Only the CLI turns it on (when stderr is a terminal, or when asked); library calls never show it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator, TextIO

import torch

from sparse_prefill.evaluation import BASELINE_LABEL
from sparse_prefill.integrations.huggingface import _HANDLE_ATTR

__all__ = ["decoder_layers", "layer_progress"]


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The language model's decoder layers: the ModuleList as long as the text config's layer count
    (one named ``...layers`` first, so a vision tower of the same depth is not taken instead); [] if none."""
    count = model.config.get_text_config().num_hidden_layers
    lists = [(name, module) for name, module in model.named_modules()
             if isinstance(module, torch.nn.ModuleList) and len(module) == count]
    lists.sort(key=lambda item: not item[0].endswith("layers"))
    return list(lists[0][1]) if lists else []


@contextlib.contextmanager
def layer_progress(model: Any, file: TextIO | None = None, min_tokens: int = 2) -> Iterator[None]:
    """While open, each forward over at least ``min_tokens`` tokens (a prefill; decode steps carry one)
    shows a tqdm bar on ``file`` (default stderr) advanced as each decoder layer finishes, labelled
    with the policy file that runs (or ``dense``). Forward hooks do it; they are removed on exit."""
    from tqdm import tqdm

    layers = decoder_layers(model)
    bar: Any = None

    def close() -> None:
        nonlocal bar
        if bar is not None:
            bar.close()
            bar = None

    def start(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        nonlocal bar
        hidden = args[0] if args else kwargs.get("hidden_states")
        tokens = hidden.shape[-2] if isinstance(hidden, torch.Tensor) and hidden.dim() >= 2 else 0
        close()
        if tokens >= min_tokens:
            handle = getattr(model, _HANDLE_ATTR, None)
            label = BASELINE_LABEL if handle is None else Path(handle.policy.source).name
            bar = tqdm(total=len(layers), desc=f"prefill {label}, {tokens} tokens", unit="layer", file=file)

    def step(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if bar is not None:
            bar.update(1)
            if bar.n >= bar.total:
                close()

    hooks = [layers[0].register_forward_pre_hook(start, with_kwargs=True)] if layers else []
    hooks += [layer.register_forward_hook(step) for layer in layers]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        close()
