"""`calibrate`: per-layer theta by attention recall, per (layer, KV group) settings by recall with a head floor, or
per-layer settings within a KL budget; each writes a policy file, and a record of what was measured."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import torch

from sparse_prefill.cli.common import (
    UsageError,
    check_layers,
    device_and_dtype,
    essay_ids,
    tokenizer_and_config,
)
from sparse_prefill.policy import PatternChoice, Policy, PolicyError, load_policy

# `calibrate --kl-budget`'s settings for an anchor base: anchor's thetas, and XAttention's thresholds for the layers
# where anchor's pooled query misses keys (per layer, Qwen2.5-Coder-0.5B / 1.5B at 32k on an H100: KL 0.0125 at
# 0.70x dense / 0.0084 at 0.80x, against 0.016 at 0.69x / 0.0136 at 0.88x for anchor alone; docs/policies.md).
KL_OPTIONS = ("theta=4,6,7.7,10,12", "xattention.threshold=0.8,0.9,0.95")
CALIBRATION_TEXT_OFFSET = 65536  # calibration text starts here: not the text eval and the docs judge on
MIN_HEAD_RECALL = 0.9  # calibrate --per-kv-group's floor: SmolLM2 8k, docs/benchmarks/recall.md


def _calibration_model_and_text(args: argparse.Namespace, base: Policy
                                ) -> tuple[Any, list[torch.Tensor], int, torch.dtype]:
    """(model, essay token ids from each --text-offset, its layer count, dtype) for calibrate: arguments
    checked before the weights load."""
    from sparse_prefill.evaluation.models import load_weights

    files, tokenizer, config = tokenizer_and_config(args.model, [base], args.tokenizer)
    num_layers = config.get_text_config().num_hidden_layers
    check_layers(args.layers, num_layers)
    texts = [essay_ids(tokenizer, config, "--tokens", args.tokens, offset) for offset in args.text_offset]
    device, dtype = device_and_dtype(args)
    return load_weights(files, config, dtype=dtype, device=device), texts, num_layers, dtype


def _text_offsets(args: argparse.Namespace) -> str:
    """Where the calibration text starts, for a written policy's header."""
    offsets = args.text_offset
    return f"from token {offsets[0]}" if len(offsets) == 1 else f"from tokens {', '.join(map(str, offsets))}"


def cmd_calibrate(args: argparse.Namespace) -> int:
    """`calibrate`: by a KL budget (--kl-budget), per KV group by recall (--per-kv-group), or one theta per
    layer by recall; the recall routes measure on the model's captured q and k (or read --from-record)."""
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
    for floor, path in zip(floors, floor_paths(args.out, floors)):
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


def floor_paths(out: Path, floors: list[float]) -> list[Path]:
    """``out`` for one head floor; ``NAME-floor0.9.yaml`` beside it for each of several."""
    return _paths_per_value(out, floors, "floor")


def kl_options(args: argparse.Namespace, base: Policy) -> dict[str, PatternChoice]:
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
    options = kl_options(args, base)
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
                  + "\nwhose KL(dense || policy) stays within the budget was chosen and checked on the whole model"
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
        return not args.per_kv_group and torch.device(device_and_dtype(args)[0]).type == "cuda"
    return args.cost == "time"


def _device_name(args: argparse.Namespace) -> str:
    """The device calibrate ran on, as a policy header names it."""
    device = torch.device(device_and_dtype(args)[0])
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
