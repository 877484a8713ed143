"""`sparse-prefill`: the side-by-side demo, perplexity, whole-model evaluation, theta calibration, policy checks,
patterns and executors. Each command has its own --help."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import logging
import math
import os
import sys
import textwrap
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch

from sparse_prefill.evaluation import BASELINE_LABEL
from sparse_prefill.policy import PatternChoice, Policy, PolicyError, load_policy, shipped_policies
from sparse_prefill.registry import available_patterns, plugin_errors

# The shipped default (fast, recall >= 0.95) and the conservative one (keeps exact retrieval on small models).
DEFAULT_POLICIES = ("anchor.yaml", "anchor-accurate.yaml")
# `eval` compares every shipped sparse policy by default: the comparison is the point.
EVAL_POLICIES = ("anchor.yaml", "anchor-accurate.yaml", "flexprefill.yaml", "vertical-slash.yaml", "streaming.yaml")
# `calibrate --kl-budget`'s settings for an anchor base: anchor's thetas, and XAttention's thresholds for the layers
# where anchor's pooled query misses keys (per layer, Qwen2.5-Coder-0.5B / 1.5B at 32k on an H100: KL 0.0125 at
# 0.70x dense / 0.0084 at 0.80x, against 0.016 at 0.69x / 0.0136 at 0.88x for anchor alone; docs/policies.md).
KL_OPTIONS = ("theta=4,6,7.7,10,12", "xattention.threshold=0.8,0.9,0.95")
CALIBRATION_TEXT_OFFSET = 65536
MIN_HEAD_RECALL = 0.9  # calibrate --per-kv-group's floor: SmolLM2 8k, docs/benchmarks/recall.md
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UsageError(ValueError):
    """A bad argument value: :func:`main` reports it as argparse does (``sparse-prefill <cmd>: error: ...``, exit 2)."""


def _policies(args: argparse.Namespace, defaults: Iterable[str] = DEFAULT_POLICIES) -> dict[str, Policy]:
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


def _device_and_dtype(args: argparse.Namespace) -> tuple[str, torch.dtype]:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = torch.device(device).type == "cuda"  # "cuda:1" too
    return device, _DTYPES[args.dtype or ("bfloat16" if on_gpu else "float32")]


def _available_devices() -> list[str]:
    """The --device values this machine can run, for error messages."""
    cuda = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    mps = ["mps"] if torch.backends.mps.is_available() else []
    return ["cpu", *(["cuda"] if cuda else []), *cuda, *mps]


def _check_device(device: str | None) -> None:
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


def _check_out(path: Path, flag: str = "--out") -> None:
    """UsageError unless ``path`` can be written: calibrate writes it last, after minutes of work."""
    if path.is_dir():
        raise UsageError(f"{flag} {path}: is a folder; give the path of the file to write")
    folder = path.parent
    if not folder.is_dir():
        reason = "is not a folder" if folder.exists() else "does not exist; create it first"
        raise UsageError(f"{flag} {path}: {folder} {reason}")
    if not os.access(path if path.exists() else folder, os.W_OK):
        raise UsageError(f"{flag} {path}: not writable by this user")


def _check_out_folder(path: Path) -> None:
    """UsageError unless ``path`` is a writable folder or can be made one: eval writes last, after the runs."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {path}: is a file; give a folder for results.json and the plots")
    folder = path if path.exists() else path.parent
    if not folder.is_dir():
        raise UsageError(f"--out {path}: {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"--out {path}: not writable by this user")


def _check_layers(layers: list[int] | None, num_layers: int) -> None:
    """UsageError for a --layers index the model lacks (capturing it would fail after the weights load)."""
    missing = [layer for layer in layers or [] if layer >= num_layers]
    if missing:
        raise UsageError(f"--layers {' '.join(map(str, missing))}: the model has {num_layers} layers; "
                         f"allowed: 0..{num_layers - 1}")


def _max_positions(config: Any) -> int | None:
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


def _check_positions(config: Any, flag: str, value: int, needed: int, why: str = "") -> None:
    """UsageError when ``needed`` positions exceed the model's: past them it runs, but its output is garbage."""
    limit = _max_positions(config)
    if limit is not None and needed > limit:
        raise UsageError(f"{flag} {value} needs {needed} positions{why}, but the model has {limit} "
                         f"(max_position_embeddings); allowed: {flag} <= {value - (needed - limit)}")


def _tokenizer_and_config(model: str, policies: Iterable[Policy], tokenizer: str | None = None,
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


def _progress(args: argparse.Namespace, model: Any) -> contextlib.AbstractContextManager[None]:
    """A bar per prefill over the decoder layers with --progress, or by default when stderr is a terminal
    (a prefill on a CPU takes minutes); nothing otherwise, so logs and pipes stay clean."""
    from sparse_prefill.evaluation.progress import layer_progress

    wanted = sys.stderr.isatty() if args.progress is None else args.progress
    return layer_progress(model, sys.stderr) if wanted else contextlib.nullcontext()


def _cmd_run(args: argparse.Namespace) -> int:
    from sparse_prefill.demo import compare_dense_and_sparse, format_side_by_side
    from sparse_prefill.evaluation.models import load_weights
    from sparse_prefill.evaluation.needle import build_needle_prompt

    policies = _policies(args)
    files, tokenizer, config = _tokenizer_and_config(args.model, policies.values())
    new = f" with --max-new-tokens {args.max_new_tokens}"
    _check_positions(config, "--length", args.length, args.length + args.max_new_tokens, new)
    try:
        prompt = build_needle_prompt(tokenizer, args.length, args.depth)
    except ValueError as exc:
        raise UsageError(f"--length {args.length}: {exc}") from None
    # The built prompt can run a token past --length (the needle re-tokenized with its neighbours).
    _check_positions(config, "--length", args.length, prompt.input_ids.shape[1] + args.max_new_tokens, new)
    for policy in policies.values():
        print(policy.describe())
    device, dtype = _device_and_dtype(args)
    model = load_weights(files, config, dtype=dtype, device=device)
    with _progress(args, model):
        results = compare_dense_and_sparse(model, tokenizer, prompt, policies, args.max_new_tokens)
    print(format_side_by_side(prompt, results))
    _print_summaries({r.label: r.summary for r in results if r.summary})
    return 0


def _print_summaries(summaries: Mapping[str, str]) -> None:
    """One paragraph per policy saying what ran (sparse calls, density, dense calls and why): a policy that
    stayed dense must not pass for a sparse result."""
    print("what ran:")
    for label, summary in summaries.items():
        print(f"  {label}: {summary}")


def _essay_ids(tokenizer: Any, config: Any, flag: str, tokens: int, offset: int = 0) -> torch.Tensor:
    """``tokens`` essay tokens from the ``offset``-th on, or a UsageError naming ``flag`` when the model or the
    text is too short for them."""
    from sparse_prefill.evaluation.models import essay_token_ids

    _check_positions(config, flag, tokens, tokens)
    try:
        return essay_token_ids(tokenizer, tokens, offset)
    except ValueError as exc:
        raise UsageError(f"{flag} {tokens}: {exc}") from None


def _cmd_perplexity(args: argparse.Namespace) -> int:
    from sparse_prefill.evaluation.models import load_weights
    from sparse_prefill.evaluation.perplexity import compare_perplexity

    policies = _policies(args)
    files, tokenizer, config = _tokenizer_and_config(args.model, policies.values())
    ids = _essay_ids(tokenizer, config, "--length", args.length)
    device, dtype = _device_and_dtype(args)
    model = load_weights(files, config, dtype=dtype, device=device)
    summaries: dict[str, str] = {}
    with _progress(args, model):
        results = compare_perplexity(model, ids, policies, args.score_last, summaries)
    print(f"perplexity on {args.length} essay tokens, last {args.score_last} scored:")
    for label, value in results.items():
        print(f"  {label:24} {value:.3f}")
    _print_summaries(summaries)
    return 0


def _calibration_model_and_text(args: argparse.Namespace, base: Policy
                                ) -> tuple[Any, list[torch.Tensor], int, torch.dtype]:
    """(model, essay token ids from each --text-offset, its layer count, dtype) for calibrate: arguments
    checked before the weights load."""
    from sparse_prefill.evaluation.models import load_weights

    files, tokenizer, config = _tokenizer_and_config(args.model, [base], args.tokenizer)
    num_layers = config.get_text_config().num_hidden_layers
    _check_layers(args.layers, num_layers)
    texts = [_essay_ids(tokenizer, config, "--tokens", args.tokens, offset) for offset in args.text_offset]
    device, dtype = _device_and_dtype(args)
    return load_weights(files, config, dtype=dtype, device=device), texts, num_layers, dtype


def _text_offsets(args: argparse.Namespace) -> str:
    """Where the calibration text starts, for a written policy's header."""
    offsets = args.text_offset
    return f"from token {offsets[0]}" if len(offsets) == 1 else f"from tokens {', '.join(map(str, offsets))}"


def _print_layer_kl(results: Sequence[Any], shown: int = 5) -> None:
    """The layers with the largest KL shares (``eval --layer-kl``), per measured policy and length."""
    measured = [m for m in results if m.layer_kl]
    if measured:
        print(f"KL by layer, the policy on that layer alone (largest {shown}; all in results.json):")
    for m in measured:
        largest = sorted(m.layer_kl.items(), key=lambda item: -item[1])[:shown]
        print(f"  {m.label} at {m.length}: " + ", ".join(f"layer {layer} {kl:.4f}" for layer, kl in largest)
              + f" (sum {sum(m.layer_kl.values()):.4f}, whole policy {m.kl:.4f})")


def _print_attention_time(results: Sequence[Any], shown: int = 3) -> None:
    """How much of each prefill is attention (``eval`` with timing): summed over layers in one timed forward,
    against dense's at the same length, and the layers that keep most of their dense time; per layer in
    results.json."""
    dense = {m.length: m for m in results if m.label == BASELINE_LABEL and m.attention_ms}
    timed = [m for m in results if m.attention_ms is not None]
    if timed:
        print("attention time, summed over layers in one timed forward (per layer in results.json):")
    for m in timed:
        prefill = m.prefill_ms if m.prefill_ms is not None else math.nan
        line = f"  {m.label} at {m.length}: {m.attention_ms:.1f} ms of a {prefill:.1f} ms prefill"
        base = dense.get(m.length)
        if m.label != BASELINE_LABEL and base is not None:
            ratios = {layer: ms / base.layer_attention_ms[layer] for layer, ms in m.layer_attention_ms.items()
                      if base.layer_attention_ms.get(layer)}
            costliest = sorted(ratios.items(), key=lambda item: -item[1])[:shown]
            line += (f", {m.attention_ms / base.attention_ms:.2f} of dense's attention; costliest layers against "
                     f"their dense: " + ", ".join(f"{layer} {ratio:.2f}" for layer, ratio in costliest))
        print(line)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    if args.kl_budget is not None:
        return _cmd_calibrate_kl(args)
    from tqdm import tqdm

    from sparse_prefill.evaluation.calibrate import calibrate_layers, calibrated_policy, check_calibration_base
    from sparse_prefill.evaluation.recall import capture_qk

    base = load_policy(args.policy)
    try:
        check_calibration_base(base)
    except ValueError as exc:
        raise UsageError(f"--policy {args.policy}: {exc}") from None
    if args.from_record is not None:
        return _calibrate_per_kv_group(args, base, None)
    model, (ids,), num_layers, dtype = _calibration_model_and_text(args, base)  # one text: checked
    qk = capture_qk(model, ids, args.layers if args.layers else range(num_layers))
    qk = {layer: (q.float(), k.float()) for layer, (q, k) in qk.items()}  # scores and theta compared in fp32
    if args.per_kv_group:
        return _calibrate_per_kv_group(args, base, qk)
    results = calibrate_layers(qk, base.default.as_dict(), args.target_recall,
                               progress=lambda layers: tqdm(layers, desc="layers", unit="layer"))
    header = (f"Written by `sparse-prefill calibrate` from {base.source}: {args.model}, {args.tokens} essay tokens "
              f"{_text_offsets(args)},\n"
              f"the smallest theta per layer keeping attention recall >= {args.target_recall}.")
    text = calibrated_policy(base, results, header)
    args.out.write_text(text)
    print(text, end="")
    missed = [r.layer for r in results if not r.reached]
    if missed:
        print(f"warning: layers {missed} stay below recall {args.target_recall} even at theta 16", file=sys.stderr)
    return 0


def _calibrate_per_kv_group(args: argparse.Namespace, base: Policy,
                            qk: dict[int, tuple[torch.Tensor, torch.Tensor]] | None) -> int:
    """Measure each (layer, KV group) at each theta (or read the measurement from ``--from-record``, ``qk``
    None), allocate for the mean recall target, write the policy."""
    from sparse_prefill.evaluation.kv_group_calibration import (
        allocate_one_call_per_layer,
        allocate_settings,
        group_calibrated_policy,
    )

    about, options = _group_measurement(args, base, qk)
    thetas, locals_ = about["thetas"], about["locals"]
    group_size, unit = about["query_heads"] // about["kv_heads"], "(layer, KV group)"
    allocate = allocate_settings
    if args.one_call_per_layer:
        allocate, unit = allocate_one_call_per_layer, "(layer, KV group), each layer's groups all dense or all sparse"
    floors = args.min_head_recall
    for floor, path in zip(floors, _floor_paths(args.out, floors)):
        allocation = allocate(options, group_size, args.target_recall, floor)
        flags = " --one-call-per-layer" if args.one_call_per_layer else ""
        header = (f"Written by `sparse-prefill calibrate --per-kv-group{flags}` from {base.source}: "
                  f"{about['model']}, {about['tokens']} essay tokens from token {about['text_offset']},\nthe least "
                  f"mean density whose mean attention recall over every query head is >= {args.target_recall}, "
                  f"every head >= {floor:g},\n"
                  f"thetas from {' '.join(f'{t:g}' for t in thetas)} and local windows from "
                  f"{' '.join(map(str, locals_))} per {unit}.")
        text = group_calibrated_policy(base, allocation, header)
        path.write_text(text)
        if len(floors) == 1:
            print(text, end="")
        print(f"{path}: every head >= {floor:g}: mean recall {allocation.recall:.4f}, worst head "
              f"{allocation.worst_head:.4f}, mean density {allocation.density:.4f}")
        if not allocation.reached:
            print(f"warning: mean recall {args.target_recall} with every head >= {floor:g} was not reached "
                  f"by any setting; the groups short of it take the setting that keeps their worst head most",
                  file=sys.stderr)
    return 0


def _group_measurement(args: argparse.Namespace, base: Policy, qk: dict[int, tuple[torch.Tensor, torch.Tensor]] | None
                       ) -> tuple[dict[str, Any], dict[tuple[int, int], list[Any]]]:
    """(what was measured, every (layer, KV group)'s options): measured on ``qk`` (and kept in ``--record``), or
    read from ``--from-record``."""
    from tqdm import tqdm

    from sparse_prefill.evaluation.kv_group_calibration import (
        DEFAULT_THETAS,
        measure_group_options,
        options_from_record,
        options_record,
    )

    params = base.default.as_dict()
    if qk is None:
        about = _read_group_record(args.from_record, params)
        return about, options_from_record(about)
    q, k = next(iter(qk.values()))
    about = {"model": str(args.model), "tokens": args.tokens, "text_offset": args.text_offset[0],
             "policy": str(base.source),
             "params": {name: value for name, value in params.items() if name not in ("theta", "local")},
             "thetas": sorted(set(args.thetas or DEFAULT_THETAS)),
             "locals": sorted(set(args.locals or [params["local"]])),
             "query_heads": q.shape[1], "kv_heads": k.shape[1]}
    options = measure_group_options(qk, params, about["thetas"], about["locals"],
                                    progress=lambda layers: tqdm(layers, desc="layers x settings", unit="layer"))
    if args.record is not None:
        args.record.write_text(json.dumps(options_record(options, about)) + "\n")
        print(f"record: {args.record}")
    return about, options


def _read_group_record(path: Path, params: dict[str, Any]) -> dict[str, Any]:
    """A ``--record`` of ``calibrate --per-kv-group``, checked against the policy it will be written into."""
    try:
        about = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"--from-record {path}: cannot read it as JSON ({exc})") from None
    missing = [key for key in ("params", "thetas", "locals", "query_heads", "kv_heads", "options")
               if not isinstance(about, dict) or key not in about]
    if missing:
        raise UsageError(f"--from-record {path}: not a record of `calibrate --per-kv-group --record` (no "
                         f"{', '.join(missing)})")
    differ = {name: (value, params.get(name)) for name, value in about["params"].items() if params.get(name) != value}
    if differ:
        raise UsageError(f"--from-record {path}: measured with other anchor parameters than --policy's "
                         + ", ".join(f"{name} {was} (policy: {now})" for name, (was, now) in differ.items()))
    return about


def _paths_per_value(out: Path, values: list[float], tag: str) -> list[Path]:
    """``out`` for one value; ``NAME-{tag}{value}.yaml`` beside it for each of several (several budgets or
    floors share one measurement, one policy file each)."""
    if len(values) == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{tag}{value:g}{out.suffix}") for value in values]


def _floor_paths(out: Path, floors: list[float]) -> list[Path]:
    """``out`` for one head floor; ``NAME-floor0.9.yaml`` beside it for each of several."""
    return _paths_per_value(out, floors, "floor")


def _kl_options(args: argparse.Namespace, base: Policy) -> dict[str, PatternChoice]:
    """The settings each layer may take: ``base``'s default with every combination of the ``--options`` that
    name no pattern or its own (labelled ``theta=6``), and each other pattern named
    (``xattention.threshold=0.9``) at its defaults with every combination of its own (labelled
    ``xattention[threshold=0.9]``). The layers then choose by KL and attention density, whatever the pattern."""
    from sparse_prefill.evaluation.whole_model import parse_sweep, sweep_policies

    if base.overrides:
        raise UsageError(f"--policy {args.policy}: calibration sets every layer itself, so it starts from a "
                         f"policy without overrides; {base.source} has {len(base.overrides)}")
    items = args.options or (KL_OPTIONS if base.default.pattern == "anchor" else None)
    if not items:
        raise UsageError(f"--options: give the settings to choose from for pattern {base.default.pattern!r}, "
                         "e.g. --options PARAM=V1,V2 (`sparse-prefill patterns` lists the patterns)")
    try:
        # A key naming no pattern is the base pattern's; a key naming another pattern adds that pattern's options.
        sweep = {(pattern or base.default.pattern, name): values
                 for (pattern, name), values in parse_sweep(items).items()}
        starts = {"": base}
        for pattern in sorted({pattern for pattern, _ in sweep} - {base.default.pattern}):
            starts[pattern] = dataclasses.replace(base, default=load_policy({"default": {"pattern": pattern}}).default)
        swept = sweep_policies(starts, sweep, allow_guard=False)
    except (ValueError, PolicyError) as exc:
        raise UsageError(f"--options: {exc}") from None
    # The base's default stays one option as it is when no key sweeps it (labelled by its pattern's name).
    return {(label.strip("[]") if label.startswith("[") else label) or base.default.pattern: policy.default
            for label, policy in swept.items()}


def _cmd_calibrate_kl(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from sparse_prefill.evaluation.layer_budget import (
        calibration_record,
        choose_and_check,
        kl_calibrated_policy,
        measure_on_texts,
    )

    base = load_policy(args.policy)
    options = _kl_options(args, base)
    if args.tokens < base.min_length:
        raise UsageError(f"--tokens {args.tokens}: below the policy's min_length {base.min_length}, every layer "
                         "would stay dense; give at least that many tokens, or (for a model of shorter context) a "
                         "--policy whose min_length is at most --tokens")
    model, texts, num_layers, dtype = _calibration_model_and_text(args, base)
    layers = args.layers if args.layers else list(range(num_layers))
    timed = _timed_cost(args)
    group_record: list[dict[str, Any]] = []
    if args.per_kv_group:
        measured, skipped, references, group_record = _measure_kv_groups(args, model, texts, base, options, layers)
    else:
        measured, skipped, references = measure_on_texts(
            model, texts, base, options, layers, args.score_last,
            progress=lambda runs: tqdm(runs, desc="each (layer, option) alone, per text", unit="run"), timed=timed)
    if not measured:
        raise UsageError(f"no layer among {layers} made a sparse plan at {args.tokens} tokens; nothing to calibrate")
    unit = "KV group" if args.per_kv_group else "layer"
    records = []
    for budget, path in zip(args.kl_budget, _paths_per_value(args.out, args.kl_budget, "kl")):
        result = choose_and_check(model, texts, base, measured, budget, references, args.score_last,
                                  skipped_layers=skipped)
        flags = " --per-kv-group" if args.per_kv_group else ""
        header = (f"Written by `sparse-prefill calibrate --kl-budget {budget:g}{flags}` from {base.source}: "
                  f"{args.model},\n{args.tokens} essay tokens {_text_offsets(args)}, {dtype}, last {args.score_last} "
                  f"positions scored. Each {unit}\nran each option alone (the rest dense); the least mean "
                  + (f"attention time (timed on {_device_name(args)})" if timed else "density")
                  + f"\nwhose KL(dense || policy) stays within the budget was chosen and checked on the whole model"
                  + (" (KL: the worst text's)." if len(texts) > 1 else ".")
                  + ("\nA layer's KV groups are all dense or all sparse in one call (their thetas may differ)."
                     if args.per_kv_group else ""))
        text = kl_calibrated_policy(base, result, header)
        path.write_text(text)
        print(text, end="")
        print(f"written: {path}")
        if not result.within_budget:
            print(f"warning: no choice met KL {budget:g}; every calibrated layer stays dense", file=sys.stderr)
        records.append({"out": str(path), **calibration_record(result)})
    if args.record is not None:
        args.record.write_text(json.dumps({"model": args.model, "policy": base.source, "tokens": args.tokens,
                                           "text_offset": args.text_offset[0], "text_offsets": args.text_offset,
                                           "score_last": args.score_last,
                                           "dtype": str(dtype), "options": sorted(options),
                                           "cost": "time" if timed else "density",
                                           **({"device": _device_name(args)} if timed else {}),
                                           "per_kv_group": args.per_kv_group, "group_measured": group_record,
                                           "budgets": records}, indent=1))
        print(f"record: {args.record}")
    return 0


def _timed_cost(args: argparse.Namespace) -> bool:
    """Whether ``calibrate --kl-budget`` spends measured time (``--cost time``, or ``auto`` on a GPU, where the
    times are the ones the policy will see) rather than density."""
    if args.cost == "auto":
        return not args.per_kv_group and torch.device(_device_and_dtype(args)[0]).type == "cuda"
    return args.cost == "time"


def _device_name(args: argparse.Namespace) -> str:
    """The device calibrate ran on, as a policy header names it."""
    device = torch.device(_device_and_dtype(args)[0])
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def _measure_kv_groups(args: argparse.Namespace, model: Any, texts: list[torch.Tensor], base: Policy,
                       options: dict[str, PatternChoice], layers: list[int]
                       ) -> tuple[list[Any], list[int], list[torch.Tensor], list[dict[str, Any]]]:
    """``calibrate --kl-budget --per-kv-group``'s measurement: (each layer's combinations of its KV groups'
    options, the layers skipped, the dense references, every (layer, KV group, option) for the record)."""
    from tqdm import tqdm

    from sparse_prefill.evaluation.group_budget import kv_group_heads, layer_combinations, measure_groups_on_texts

    config = model.config.get_text_config()
    num_heads = config.num_attention_heads
    groups = kv_group_heads(num_heads, getattr(config, "num_key_value_heads", None) or num_heads)
    measured, skipped, references = measure_groups_on_texts(
        model, texts, base, options, layers, groups, args.score_last,
        progress=lambda runs: tqdm(runs, desc="each (layer, KV group, option) alone, per text", unit="run"))
    record = [{"layer": o.layer, "heads": [o.heads.start, o.heads.stop - 1], "label": o.label, "kl": o.kl,
               "density": o.density} for o in measured]
    return layer_combinations(measured), skipped, references, record


def _cmd_eval(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from sparse_prefill.evaluation.models import load_weights
    from sparse_prefill.evaluation import ruler
    from sparse_prefill.evaluation.needle import build_needle_prompt
    from sparse_prefill.evaluation.report import environment, write_report
    from sparse_prefill.evaluation.whole_model import (
        EvalSettings,
        Measurement,
        evaluate,
        parse_sweep,
        summary_table,
        sweep_policies,
    )

    try:
        settings = EvalSettings(lengths=tuple(args.lengths), score_last=args.score_last,
                                needle_depths=tuple(args.needle_depths), needle_new_tokens=args.needle_new_tokens,
                                repeats=args.repeats, recall=args.recall, layer_kl=args.layer_kl,
                                ruler_tasks=tuple(args.ruler),
                                ruler_samples=args.ruler_samples)
        sweep = parse_sweep(args.sweep or [])
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if settings.ruler_tasks:
        try:
            ruler.require_data()
        except ModuleNotFoundError as exc:
            raise UsageError(f"--ruler: {exc}") from None
    policies = sweep_policies(_policies(args, EVAL_POLICIES), sweep)
    files, tokenizer, config = _tokenizer_and_config(args.model, policies.values(), args.tokenizer)
    texts = {}
    for length in settings.lengths:
        new_tokens = max([settings.needle_new_tokens] * bool(settings.needle_depths)
                         + [ruler.new_tokens(task) for task in settings.ruler_tasks], default=0)
        _check_positions(config, "--lengths", length, length + new_tokens)
        texts[length] = _essay_ids(tokenizer, config, "--lengths", length)
        if settings.needle_depths:
            try:
                build_needle_prompt(tokenizer, length, settings.needle_depths[0])
            except ValueError as exc:
                raise UsageError(f"--lengths {length}: {exc}") from None
        for task in settings.ruler_tasks:  # a length too short for a task fails here, not after the weights load
            try:
                ruler.build_samples(tokenizer, task, length, 1)
            except ValueError as exc:
                raise UsageError(f"--lengths {length}: {exc}") from None
    device, dtype = _device_and_dtype(args)
    model = load_weights(files, config, dtype=dtype, device=device)
    args.out.mkdir(exist_ok=True)
    env = environment(torch.device(device))
    extra = {"dtype": str(dtype).removeprefix("torch."),
             "policies": {label: policy.describe() for label, policy in policies.items()}}
    total = len(settings.lengths) * (len(policies) + 1)

    def save(results: list[Measurement]) -> Path:  # after every run: a cut-off evaluation keeps what it measured
        done = {"complete": len(results) == total}
        return write_report(args.out / "results.json", args.model, settings, results, env, {**extra, **done})

    results = evaluate(model, tokenizer, texts.__getitem__, policies, settings,
                       progress=lambda steps: tqdm(steps, desc="eval (length, policy)", unit="run"), on_result=save)
    print(summary_table(results))
    _print_summaries({f"{m.label} at {m.length}": m.summary for m in results if m.summary})
    _print_layer_kl(results)
    _print_attention_time(results)
    print(f"results: {save(results)}")
    if not args.no_plots:
        from sparse_prefill.evaluation.plots import plot_needle_heatmap, plot_quality_vs_density, plot_quality_vs_time

        title = f"{Path(args.model).name}, {torch.device(device).type}"
        print(f"plot: {plot_quality_vs_density(results, args.out / 'quality_vs_density.png', title)}")
        if any(m.prefill_vs_dense is not None for m in results):
            print(f"plot: {plot_quality_vs_time(results, args.out / 'quality_vs_time.png', title)}")
        if settings.needle_depths:
            print(f"plot: {plot_needle_heatmap(results, args.out / 'needle.png', title)}")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    failed = 0
    for path in args.policies:
        try:
            print(load_policy(path).describe())
        except PolicyError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


def _cmd_convert_minference(args: argparse.Namespace) -> int:
    import yaml

    from sparse_prefill.minference import MInferenceConfigError, convert_minference

    try:
        config = json.loads(Path(args.config).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MInferenceConfigError(f"cannot read {args.config} as JSON: {exc}") from None
    policy = convert_minference(config, args.config)
    load_policy(policy)  # checked as any policy is, before anything is written
    text = f"# converted from MInference's {Path(args.config).name} by sparse-prefill convert-minference\n"
    text += yaml.safe_dump(policy, sort_keys=False)
    if args.output is None:
        print(text, end="")
    else:
        Path(args.output).write_text(text, encoding="utf-8")
        print(load_policy(args.output).describe())
    return 0


def _cmd_patterns(args: argparse.Namespace) -> int:
    if args.name is not None:
        return _print_pattern(args.name)
    infos = available_patterns()
    width = max((len(info.name) for info in infos), default=0)
    for info in infos:
        print(f"{info.name:{width}}  {info.description}  [plugin {info.plugin}, from {info.distribution}]")
    _print_plugin_errors()
    return 0


def _print_plugin_errors() -> None:
    """Plugins that failed to load: a listing without them must not look complete."""
    for error in plugin_errors():
        print(f"error: {error}", file=sys.stderr)


def _print_pattern(name: str) -> int:
    """One pattern's parameters as a policy sets them; a UsageError listing the patterns for an unknown name."""
    from sparse_prefill.registry import get_pattern

    try:
        spec = get_pattern(name)
    except KeyError:
        known = ", ".join(info.name for info in available_patterns()) or "none"
        raise UsageError(f"unknown pattern {name!r}; registered patterns: {known}") from None
    print(f"{spec.name}: {spec.description}")
    if not spec.parameters:
        print("  (no parameters)")
        return 0
    rows = [("parameter", "default", "allowed", "meaning")]
    rows += [(key, repr(param.default), param.allowed(), param.help) for key, param in spec.parameters.items()]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for key, default, allowed, meaning in rows:
        print(f"  {key:{widths[0]}}  {default:{widths[1]}}  {allowed:{widths[2]}}  {meaning}")
    return 0


def _cmd_executors(args: argparse.Namespace) -> int:
    from sparse_prefill.registry import get_registry

    for executor in get_registry().executors():
        kinds = ", ".join(kind.__name__ for kind in executor.plan_kinds)
        dtypes = ", ".join(sorted(str(d).removeprefix("torch.") for d in executor.dtypes))
        head_dims = "any" if executor.head_dims is None else ", ".join(map(str, sorted(executor.head_dims)))
        backward = "yes" if getattr(executor, "supports_backward", False) else "no"
        print(f"{executor.name} (priority {executor.priority}; {type(executor).__module__}.{type(executor).__name__})")
        print(f"  plans: {kinds}; devices: {', '.join(sorted(executor.devices))}; dtypes: {dtypes}; "
              f"head dims: {head_dims}; backward: {backward}")
    _print_plugin_errors()
    return 0


def _version() -> str:
    """The installed distribution's version, with the torch, triton and transformers it runs on."""
    import importlib.metadata

    import sparse_prefill

    found = []
    for name in ("torch", "triton", "transformers"):
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} missing")
    return f"{sparse_prefill.__version__} ({', '.join(found)})"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults in every help line, except where there is none to show (None, False): those
    options say in words what happens when they are left out."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)

    def _split_lines(self, text: str, width: int) -> list[str]:  # never "--kl-" at one line's end, "budget" below
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return textwrap.fill(" ".join(text.split()), width, initial_indent=indent, subsequent_indent=indent,
                             break_on_hyphens=False)


def _command(commands: Any, name: str, summary: str, description: str | None = None) -> argparse.ArgumentParser:
    """A sub-command with its one-line help in the command list, a description and its defaults in --help."""
    return commands.add_parser(name, help=summary, description=description or summary[0].upper() + summary[1:] + ".",
                               formatter_class=_HelpFormatter)


def _add_output_options(parser: argparse.ArgumentParser, progress: bool = True) -> None:
    """--verbose (the library's notices), and --progress where one prefill can keep a CPU busy for minutes."""
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="show why calls stayed dense as they happen (-v: also what the policy chose, "
                             "such as min_length; -vv: also decode steps); warnings are always shown")
    if progress:
        parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                            help="a bar per prefill over the decoder layers (default: when stderr is a terminal)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparse-prefill", description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = _command(commands, "run", "dense vs sparse prefill on a needle-in-a-haystack prompt, side by side",
                   "Dense, then each policy: one long prompt with a number hidden in an essay, the answer each "
                   "generates, whether it found the number, time to first token and attention density; then what "
                   "ran under each policy (sparse calls, dense calls and why).")
    run.add_argument("--model", default="smollm2",
                     help="local Hugging Face model folder, a .gguf file, or 'smollm2' (the packaged model)")
    run.add_argument("--policy", action="append", default=None,
                     help=f"policy YAML path, or the name of a shipped policy ({', '.join(shipped_policies())}); "
                          f"repeat to compare several (default: {' and '.join(DEFAULT_POLICIES)})")
    run.add_argument("--length", type=int, default=4096, help="prompt length in tokens")
    run.add_argument("--depth", type=float, default=0.5, help="needle position, 0 = start, 1 = end")
    run.add_argument("--min-length", type=int, default=0,
                     help="override the policy's min_length; the default 0 forces the sparse path even at demo "
                          "lengths where the policy would stay dense (pass -1 to keep the policy's value)")
    run.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    run.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="default: bfloat16 on GPU, float32 on CPU")
    run.add_argument("--max-new-tokens", type=int, default=24, help="tokens generated after the prompt")
    _add_output_options(run)
    run.set_defaults(func=_cmd_run, command_parser=run)

    ppl = _command(commands, "perplexity", "perplexity on long real text, dense vs each policy",
                   "Perplexity of one forward pass over real essay text, dense and under each policy, scored on "
                   "the last positions (where long context matters most); then what ran under each policy.")
    ppl.add_argument("--model", default="smollm2", help="as for `run`")
    ppl.add_argument("--policy", action="append", default=None,
                     help=f"as for `run` (repeatable; default: {' and '.join(DEFAULT_POLICIES)})")
    ppl.add_argument("--length", type=int, default=4096, help="tokens of text in the one forward pass")
    ppl.add_argument("--score-last", type=int, default=None,
                     help="score only the last N predictions (default: min(1024, length - 1); 0: all of them)")
    ppl.add_argument("--min-length", type=int, default=0, help="as for `run` (-1 keeps the policy's)")
    ppl.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ppl.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="default: bfloat16 on GPU, float32 on CPU")
    _add_output_options(ppl)
    ppl.set_defaults(func=_cmd_perplexity, command_parser=ppl)

    calibrate = _command(
        commands, "calibrate", "per-layer settings for a model, by attention recall or by a KL budget; writes a policy",
        "Without --kl-budget: the smallest anchor theta per layer that keeps --target-recall of the softmax mass on "
        "the model's own attention. With --kl-budget: each layer runs each --options setting alone (the rest dense) "
        "and the least mean density whose KL(dense || policy) of the next-token distributions stays within the "
        "budget is chosen, layers that cost too much staying dense; the choice is then checked on the whole model. "
        "Reads essay text from --text-offset, past what `eval` and `perplexity` score.")
    calibrate.add_argument("--model", default="smollm2", help="as for `run`")
    calibrate.add_argument("--policy", default="anchor.yaml",
                           help="the anchor policy to start from (its other parameters are kept)")
    calibrate.add_argument("--tokens", type=int, default=8192, help="essay tokens to run through the model")
    calibrate.add_argument("--layers", type=int, nargs="*", default=None, help="layers to calibrate (default: all)")
    calibrate.add_argument("--target-recall", type=float, default=0.95,
                           help="softmax mass each layer must keep (without --kl-budget)")
    calibrate.add_argument("--per-kv-group", action="store_true",
                           help="without --kl-budget: a theta (and with --locals a local window) per (layer, KV "
                                "group), the least mean density whose mean recall over every query head reaches "
                                "--target-recall (a layer's groups may differ: groups differing in theta alone share "
                                "one call, a dense group beside sparse ones or another local window runs apart); "
                                "with --kl-budget: each KV group runs each --options setting alone and a layer's "
                                "groups are all dense or all sparse in one call, their per-head settings (theta) "
                                "free")
    calibrate.add_argument("--one-call-per-layer", action="store_true",
                           help="with --per-kv-group: each layer runs as one attention call, its KV groups all "
                                "dense or all sparse with one local window (thetas may differ: one call takes a "
                                "theta per head); a dense group beside sparse ones, or groups of different "
                                "--locals, would run as a call each, which can cost more time than their density "
                                "saves")
    calibrate.add_argument("--min-head-recall", type=float, nargs="+", default=None,
                           help=f"with --per-kv-group: every query head keeps at least this much (default "
                                f"{MIN_HEAD_RECALL}: the worst heads carry the answers' loss, "
                                f"docs/benchmarks/recall.md; 0 for the mean alone); several floors share one "
                                f"measurement and write OUT-floorF.yaml each")
    calibrate.add_argument("--thetas", type=float, nargs="+", default=None,
                           help="with --per-kv-group: the thetas a group may take (default: "
                                "4 5 6 7 7.7 8.5 9.5 11 13 16)")
    calibrate.add_argument("--locals", type=int, nargs="+", default=None,
                           help="with --per-kv-group: local windows (keys) a group may take with each theta "
                                "(default: the policy's own); e.g. 128 512 1024")
    calibrate.add_argument("--kl-budget", type=float, nargs="+", default=None,
                           help="choose per layer by what the answers lose: mean KL(dense || policy) per scored "
                                "position allowed, nats (e.g. 0.02); several budgets share one measurement and "
                                "write OUT-klBUDGET.yaml each")
    calibrate.add_argument("--record", type=Path, default=None,
                           help="with --kl-budget: also write every measured (layer, option) and check as JSON; "
                                "with --per-kv-group: every measured (layer, KV group, setting), for --from-record")
    calibrate.add_argument("--from-record", type=Path, default=None,
                           help="with --per-kv-group: allocate from a --record of an earlier measurement instead of "
                                "running the model (other targets, floors, --one-call-per-layer in seconds)")
    calibrate.add_argument("--options", action="append", default=None, metavar="[PATTERN.]PARAM=V1,V2,...",
                           help=f"with --kl-budget: the settings a layer may take, as eval's --sweep (repeatable: "
                                f"their product); PATTERN.PARAM adds another pattern's settings, so each layer "
                                f"also chooses its pattern (by KL and --cost); default for anchor: "
                                f"--options {' --options '.join(KL_OPTIONS)}")
    calibrate.add_argument("--cost", choices=("auto", "time", "density"), default="auto",
                           help="with --kl-budget: what the choice minimises within the budget: each layer's "
                                "attention time, measured on this device against its dense attention (a costlier "
                                "identification or a plan denser than it saves then loses), or the attention "
                                "density; auto: time on a GPU, density elsewhere (and with --per-kv-group)")
    calibrate.add_argument("--score-last", type=int, default=None,
                           help="with --kl-budget: positions scored, the last ones (default: min(1024, tokens - 1))")
    calibrate.add_argument("--text-offset", type=int, nargs="+", default=[CALIBRATION_TEXT_OFFSET],
                           help="essay tokens skipped: eval and perplexity read from token 0, so calibration "
                                "reads text they do not score; with --kl-budget, several offsets calibrate on "
                                "several texts, each option costing its worst KL over them")
    calibrate.add_argument("--tokenizer", default=None,
                           help="a folder holding a saved tokenizer, used instead of the model's own")
    calibrate.add_argument("--out", type=Path, required=True, help="where to write the calibrated policy YAML")
    calibrate.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    calibrate.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                           help="default: bfloat16 on GPU, float32 on CPU")
    calibrate.set_defaults(func=_cmd_calibrate, command_parser=calibrate)

    evaluation = _command(
        commands, "eval",
        "whole-model quality (perplexity, KL vs dense, needle) and prefill time, dense vs each policy",
        "Dense, then each policy, at each length: perplexity and KL(dense || policy) of the next-token "
        "distributions on real text, attention density per layer, which calls fell back and why, time "
        "to first token, and needle in a haystack. Writes results.json and plots to --out.")
    evaluation.add_argument("--model", default="smollm2", help="as for `run`")
    evaluation.add_argument("--tokenizer", default=None,
                            help="a folder holding a saved tokenizer, used instead of the model's own")
    evaluation.add_argument("--policy", action="append", default=None,
                            help=f"as for `run` (repeatable; default: {', '.join(EVAL_POLICIES)})")
    evaluation.add_argument("--sweep", action="append", default=None, metavar="[PATTERN.]PARAM=V1,V2,...",
                            help="run each policy whose default pattern has PARAM once per value (repeatable); "
                                 "guard.max_error=none,0.3 runs every policy without and with a guard")
    evaluation.add_argument("--lengths", type=int, nargs="+", default=[4096], help="prompt lengths in tokens")
    evaluation.add_argument("--score-last", type=int, default=1024,
                            help="positions scored for perplexity and KL (the last ones of each text)")
    evaluation.add_argument("--needle-depths", type=float, nargs="*", default=[0.1, 0.5, 0.9],
                            help="needle positions (0 = start, 1 = end); none: no needle test")
    evaluation.add_argument("--needle-new-tokens", type=int, default=12, help="tokens generated for each needle")
    evaluation.add_argument("--repeats", type=int, default=3, help="timed prefills per run (0: no timing)")
    evaluation.add_argument("--recall", action="store_true",
                            help="also measure each layer's attention recall (softmax mass its plans keep; mean and "
                                 "worst query head) on the dense model's q and k: one more forward per length, an "
                                 "exact softmax per layer")
    evaluation.add_argument("--layer-kl", action="store_true",
                            help="also measure each layer's share of a policy's KL: the policy on that layer alone, "
                                 "every other layer dense (one more forward per layer); finds the layers that lose")
    evaluation.add_argument("--ruler", nargs="+", default=[], metavar="TASK",
                            help="RULER tasks to score at each length, e.g. niah_multikey_1 vt cwe (see docs/ruler.md; "
                                 "needs the ruler extra)")
    evaluation.add_argument("--ruler-samples", type=int, default=5, help="samples of each RULER task per length")
    evaluation.add_argument("--min-length", type=int, default=-1,
                            help="override the policies' min_length (-1 keeps each policy's)")
    evaluation.add_argument("--out", type=Path, required=True, help="folder for results.json and the plots")
    evaluation.add_argument("--no-plots", action="store_true", help="write no plots (no matplotlib needed)")
    evaluation.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    evaluation.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                            help="default: bfloat16 on GPU, float32 on CPU")
    _add_output_options(evaluation, progress=False)  # eval has its own bar over (length, policy)
    evaluation.set_defaults(func=_cmd_eval, command_parser=evaluation)

    validate = _command(commands, "validate", "check policy files; print them resolved",
                        "Loads each policy file as apply() would and prints it with every default filled in; "
                        "exits 1 if any is invalid, each error naming the file and the key.")
    validate.add_argument("policies", nargs="+", metavar="POLICY",
                          help="policy YAML paths or names of shipped policies")
    validate.set_defaults(func=_cmd_validate, command_parser=validate)

    convert = _command(commands, "convert-minference", "turn an MInference per-head config (JSON) into a policy",
                       "Reads MInference's per-layer, per-head pattern file (vertical_and_slash, stream_llm, "
                       "block_sparse entries with their sizes) and writes the same choices as a policy: "
                       "vertical-slash, streaming and block-topk. Unknown entries are refused with the layer, the "
                       "head and what is allowed.")
    convert.add_argument("config", help="MInference's JSON: one {head: [type, vertical_size, slash_size, score]} "
                                        "per layer")
    convert.add_argument("-o", "--output", help="policy YAML to write (default: print it)")
    convert.set_defaults(func=_cmd_convert_minference, command_parser=convert)

    patterns = _command(commands, "patterns", "list registered patterns, or one pattern's parameters",
                        "Without NAME: every registered pattern and the plugin it comes from. With NAME: that "
                        "pattern's parameters as a policy sets them (type, default, what is allowed, meaning).")
    patterns.add_argument("name", nargs="?", default=None, metavar="NAME",
                          help="a pattern whose parameters to list (default: list the patterns)")
    patterns.set_defaults(func=_cmd_patterns, command_parser=patterns)

    executors = _command(commands, "executors", "list registered executors and what each supports",
                         "Every registered executor, highest priority first (the dispatcher takes the first that "
                         "supports a call): the plan kinds, devices, dtypes and head dims it takes, and whether "
                         "it has a backward.")
    executors.set_defaults(func=_cmd_executors, command_parser=executors)
    return parser


def _check_numbers(args: argparse.Namespace) -> None:
    """Reject impossible numeric arguments before a model is loaded (which takes seconds to minutes)."""
    if getattr(args, "min_length", None) is not None and args.min_length < -1:
        raise UsageError(f"--min-length must be >= 0, or -1 to keep the policy's, got {args.min_length}")
    if args.command in ("run", "perplexity") and args.length < 2:
        raise UsageError(f"--length must be at least 2 tokens, got {args.length}")
    if args.command == "run":
        if not 0 <= args.depth <= 1:
            raise UsageError(f"--depth must be in [0, 1] (0 = start of the text, 1 = end), got {args.depth}")
        if args.max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.command == "calibrate":
        if not 0 < args.target_recall <= 1:
            raise UsageError(f"--target-recall must be in (0, 1], got {args.target_recall}")
        if args.tokens < 2:
            raise UsageError(f"--tokens must be at least 2, got {args.tokens}")
        if min(args.text_offset) < 0:
            raise UsageError(f"--text-offset must be >= 0 tokens, got {' '.join(map(str, args.text_offset))}")
        if len(args.text_offset) > 1 and args.kl_budget is None:
            raise UsageError("several --text-offset values are for --kl-budget calibration (recall is measured on "
                             "one text)")
        if args.kl_budget is not None and not all(budget >= 0 for budget in args.kl_budget):
            raise UsageError(f"--kl-budget must be >= 0 nats, got {' '.join(map(str, args.kl_budget))}")
        if args.kl_budget is None and args.record is not None and not args.per_kv_group:
            raise UsageError("--record is for --kl-budget or --per-kv-group calibration")
        if args.score_last is None:
            args.score_last = min(1024, args.tokens - 1)
        if args.kl_budget is not None and not 0 < args.score_last < args.tokens:
            raise UsageError(f"--score-last must be in [1, {args.tokens - 1}] for --tokens {args.tokens}, "
                             f"got {args.score_last}")
        if args.kl_budget is None and args.options:
            raise UsageError("--options is for --kl-budget calibration (the recall target sets theta alone)")
        if args.cost != "auto" and args.kl_budget is None:
            raise UsageError(f"--cost {args.cost} is for --kl-budget calibration (recall calibration minimises "
                             "density)")
        if args.cost == "time" and args.per_kv_group:
            raise UsageError("--cost time times each layer's attention call; --per-kv-group measures KV groups "
                             "one at a time, whose calls are not the policy's (use --cost density)")
        _check_per_kv_group(args)
        if args.layers and min(args.layers) < 0:
            raise UsageError(f"--layers takes layer indices >= 0, got {args.layers}")
    if args.command == "perplexity":
        if args.score_last is None:
            args.score_last = min(1024, args.length - 1)
        elif args.score_last == 0:
            args.score_last = args.length - 1
        elif not 0 < args.score_last < args.length:
            raise UsageError(f"--score-last must be in [0, {args.length - 1}] for --length {args.length}, "
                             f"got {args.score_last}")


def _check_per_kv_group(args: argparse.Namespace) -> None:
    """The per-KV-group recall calibration's own arguments, and that nothing else takes them."""
    recall_flags = (("--min-head-recall", args.min_head_recall), ("--thetas", args.thetas),
                    ("--locals", args.locals), ("--one-call-per-layer", args.one_call_per_layer or None),
                    ("--from-record", args.from_record))
    if not args.per_kv_group or args.kl_budget is not None:
        for flag, value in recall_flags:
            if value is not None:
                raise UsageError(f"{flag} is for --per-kv-group calibration by recall" + (
                    "; with --kl-budget the settings are --options, and each layer is one call"
                    if args.kl_budget is not None else ""))
        return
    if args.min_head_recall is None:
        args.min_head_recall = [MIN_HEAD_RECALL]
    if not all(0 <= floor <= 1 for floor in args.min_head_recall):
        raise UsageError(f"--min-head-recall must be in [0, 1], got {' '.join(map(str, args.min_head_recall))}")
    if len(set(args.min_head_recall)) != len(args.min_head_recall):
        raise UsageError(f"--min-head-recall lists a floor twice: {' '.join(map(str, args.min_head_recall))}")
    if args.from_record is not None:
        for flag, value in (("--thetas", args.thetas), ("--locals", args.locals), ("--record", args.record),
                            ("--layers", args.layers)):
            if value is not None:
                raise UsageError(f"--from-record allocates from what was measured; {flag} sets what is measured")
        if not args.from_record.is_file():
            raise UsageError(f"--from-record {args.from_record}: no such file")
    if args.thetas is not None and not all(math.isfinite(theta) for theta in args.thetas):
        raise UsageError(f"--thetas must be finite numbers (nats), got {' '.join(map(str, args.thetas))}")
    if args.locals is not None and min(args.locals) < 0:
        raise UsageError(f"--locals must be key counts >= 0, got {' '.join(map(str, args.locals))}")


def _check_args(args: argparse.Namespace) -> None:
    """The checks that need no model: every command's arguments, before anything loads."""
    _check_numbers(args)
    _check_device(getattr(args, "device", None))
    if args.command == "calibrate":
        _check_out(args.out)
        if args.record is not None:
            _check_out(args.record, "--record")
    if args.command == "eval":
        _check_out_folder(args.out)
        if not args.no_plots and importlib.util.find_spec("matplotlib") is None:
            raise UsageError("plots need matplotlib: pip install 'sparse-prefill[plots]', or pass --no-plots")


@contextlib.contextmanager
def _notices(verbose: int) -> Iterator[None]:
    """The library's notices on stderr while a command runs, from sparse_prefill's logger: warnings always,
    what the policy chose with -v, decode steps too with -vv. Undone on exit: main() leaves no handler behind
    (a caller, or a test, runs it many times)."""
    logger = logging.getLogger("sparse_prefill")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("sparse-prefill: %(levelname)s: %(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel((logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)])
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    """Run one command; a bad argument exits 2 with one ``sparse-prefill <cmd>: error: ...`` line, before the
    model's weights load."""
    args = build_parser().parse_args(argv)
    try:
        _check_args(args)
        if getattr(args, "min_length", None) == -1:
            args.min_length = None
        with _notices(getattr(args, "verbose", 0)):
            return args.func(args)
    except (UsageError, PolicyError) as exc:
        args.command_parser.error(str(exc))  # exits 2


if __name__ == "__main__":
    raise SystemExit(main())
