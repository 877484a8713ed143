"""What every command shares: the default policies, argument checks that need no model (device, output paths,
layers, positions), loading the tokenizer and config before the weights, progress bars and the "what ran" lines."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from sparse_prefill.evaluation import BASELINE_LABEL
from sparse_prefill.policy import Policy, PolicyError, load_policy

# The shipped default (fast, recall >= 0.95) and the conservative one (keeps exact retrieval on small models).
DEFAULT_POLICIES = ("anchor.yaml", "anchor-accurate.yaml")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UsageError(ValueError):
    """A bad argument value: :func:`main` reports it as argparse does (``sparse-prefill <cmd>: error: ...``, exit 2)."""


def policies_from_args(args: argparse.Namespace, defaults: Iterable[str] = DEFAULT_POLICIES) -> dict[str, Policy]:
    """The --policy files (or the defaults) by label, with --min-length applied.

    A policy's label is its file name without the suffix; where that is taken (by another policy,
    or by ``dense``, the unpatched baseline every comparison starts with) it is the path as given,
    so no result silently replaces another.
    """
    policies: dict[str, Policy] = {}
    for name in args.policy or defaults:
        label = Path(name).stem
        if label == BASELINE_LABEL or label in policies:
            label = name
        if label in policies:
            raise PolicyError(f"{name}: given twice with --policy")
        policy = load_policy(name)
        if args.min_length is not None:
            policy = dataclasses.replace(policy, min_length=args.min_length)
        policies[label] = policy
    return policies


def device_and_dtype(args: argparse.Namespace) -> tuple[str, torch.dtype]:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = torch.device(device).type == "cuda"  # "cuda:1" too
    return device, DTYPES[args.dtype or ("bfloat16" if on_gpu else "float32")]


def _available_devices() -> list[str]:
    """The --device values this machine can run, for error messages."""
    cuda = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    mps = ["mps"] if torch.backends.mps.is_available() else []
    return ["cpu", *(["cuda"] if cuda else []), *cuda, *mps]


def check_device(device: str | None) -> None:
    """UsageError unless this machine has ``device`` (None: the default, always there): otherwise the
    error would come from ``model.to(device)``, after the weights have loaded."""
    if device is None:
        return
    allowed = f"allowed here: {', '.join(_available_devices())}"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {device!r} is not a device string; {allowed}") from None
    if parsed.type == "cpu":
        return
    backend = getattr(torch, parsed.type, None)
    available = backend is not None and hasattr(backend, "is_available") and backend.is_available()
    count = backend.device_count() if available and hasattr(backend, "device_count") else int(available)
    if not available or (parsed.index is not None and parsed.index >= count):
        which = f"{parsed.type} device" + ("" if parsed.index is None else f" {parsed.index}")
        raise UsageError(f"--device {device}: this machine has no {which}; {allowed}")


def check_out(path: Path, flag: str = "--out") -> None:
    """UsageError unless ``path`` can be written: calibrate writes it last, after minutes of work."""
    if path.is_dir():
        raise UsageError(f"{flag} {path}: is a folder; give the path of the file to write")
    folder = path.parent
    if not folder.is_dir():
        reason = "is not a folder" if folder.exists() else "does not exist; create it first"
        raise UsageError(f"{flag} {path}: {folder} {reason}")
    if not os.access(path if path.exists() else folder, os.W_OK):
        raise UsageError(f"{flag} {path}: not writable by this user")


def check_out_folder(path: Path) -> None:
    """UsageError unless ``path`` is a writable folder or can be made one: eval writes last, after the runs."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {path}: is a file; give a folder for results.json and the plots")
    folder = path if path.exists() else path.parent
    if not folder.is_dir():
        raise UsageError(f"--out {path}: {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"--out {path}: not writable by this user")


def check_layers(layers: list[int] | None, num_layers: int) -> None:
    """UsageError for a --layers index the model lacks (capturing it would fail after the weights load)."""
    missing = [layer for layer in layers or [] if layer >= num_layers]
    if missing:
        raise UsageError(f"--layers {' '.join(map(str, missing))}: the model has {num_layers} layers; "
                         f"allowed: 0..{num_layers - 1}")


def max_positions(config: Any) -> int | None:
    """The positions a model is made for: max_position_embeddings, or factor x original_max_position_embeddings
    where its RoPE scaling extends them (YaRN set-ups of Qwen2.5 keep 32768 in the first); None if unstated."""
    text = config.get_text_config()
    limit = getattr(text, "max_position_embeddings", None)
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    for params in [value for value in rope.values() if isinstance(value, dict)] or [rope]:  # per layer type, or one
        factor, original = params.get("factor"), params.get("original_max_position_embeddings")
        if isinstance(factor, (int, float)) and isinstance(original, int):
            limit = max(limit or 0, int(factor * original))
    return limit if isinstance(limit, int) else None


def check_positions(config: Any, flag: str, value: int, needed: int, why: str = "") -> None:
    """UsageError when ``needed`` positions exceed the model's: past them it runs, but its output is garbage."""
    limit = max_positions(config)
    if limit is not None and needed > limit:
        raise UsageError(f"{flag} {value} needs {needed} positions{why}, but the model has {limit} "
                         f"(max_position_embeddings); allowed: {flag} <= {value - (needed - limit)}")


def tokenizer_and_config(model: str, policies: Iterable[Policy], tokenizer: str | None = None,
                          ) -> tuple[Any, Any, Any]:
    """(files, tokenizer, config) of --model (the tokenizer from ``tokenizer``'s folder when given):
    seconds, so what depends on the model is checked before the weights load (a minute); each failure
    is a UsageError naming --model."""
    from sparse_prefill.evaluation.models import load_tokenizer_and_config, locate_model

    try:
        files = locate_model(model, tokenizer)
    except FileNotFoundError as exc:
        raise UsageError(f"--model {model}: {exc}") from None
    try:
        tokenizer, config = load_tokenizer_and_config(files)
    except (OSError, ValueError, KeyError) as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UsageError(f"--model {model}: cannot load its tokenizer and config: {first_line}") from None
    text = config.get_text_config()
    for policy in policies:
        policy.check_model(text.num_hidden_layers, text.num_attention_heads)  # PolicyError: an override's layer
    return files, tokenizer, config


def progress_bars(args: argparse.Namespace, model: Any) -> contextlib.AbstractContextManager[None]:
    """A bar per prefill over the decoder layers with --progress, or by default when stderr is a terminal
    (a prefill on a CPU takes minutes); nothing otherwise, so logs and pipes stay clean."""
    from sparse_prefill.evaluation.progress import layer_progress

    wanted = sys.stderr.isatty() if args.progress is None else args.progress
    return layer_progress(model, sys.stderr) if wanted else contextlib.nullcontext()


def print_summaries(summaries: Mapping[str, str]) -> None:
    """One paragraph per policy saying what ran (sparse calls, density, dense calls and why): a policy that
    stayed dense must not pass for a sparse result."""
    print("what ran:")
    for label, summary in summaries.items():
        print(f"  {label}: {summary}")


def essay_ids(tokenizer: Any, config: Any, flag: str, tokens: int, offset: int = 0) -> torch.Tensor:
    """``tokens`` essay tokens from the ``offset``-th on, or a UsageError naming ``flag`` when the model or the
    text is too short for them."""
    from sparse_prefill.evaluation.models import essay_token_ids

    check_positions(config, flag, tokens, tokens)
    try:
        return essay_token_ids(tokenizer, tokens, offset)
    except ValueError as exc:
        raise UsageError(f"{flag} {tokens}: {exc}") from None
