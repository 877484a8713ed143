"""`eval`: policies measured on a whole model (quality, needles, RULER, per-layer numbers, time), with plots."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Sequence

import torch

from sparse_prefill.cli.common import (
    UsageError,
    check_positions,
    device_and_dtype,
    essay_ids,
    policies_from_args,
    print_summaries,
    tokenizer_and_config,
)
from sparse_prefill.evaluation import BASELINE_LABEL

# `eval` compares every shipped sparse policy by default: the comparison is the point.
EVAL_POLICIES = ("anchor.yaml", "anchor-accurate.yaml", "flexprefill.yaml", "vertical-slash.yaml", "streaming.yaml")


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


def cmd_eval(args: argparse.Namespace) -> int:
    """`eval`: every (length, policy) measured against dense, results.json written after each run (a cut-off
    evaluation keeps what it measured), then the tables and plots; lengths, needles and RULER tasks are checked
    before the weights load."""
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
    policies = sweep_policies(policies_from_args(args, EVAL_POLICIES), sweep)
    files, tokenizer, config = tokenizer_and_config(args.model, policies.values(), args.tokenizer)
    texts = {}
    for length in settings.lengths:
        new_tokens = max([settings.needle_new_tokens] * bool(settings.needle_depths)
                         + [ruler.new_tokens(task) for task in settings.ruler_tasks], default=0)
        check_positions(config, "--lengths", length, length + new_tokens)
        texts[length] = essay_ids(tokenizer, config, "--lengths", length)
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
    device, dtype = device_and_dtype(args)
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
    print_summaries({f"{m.label} at {m.length}": m.summary for m in results if m.summary})
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
