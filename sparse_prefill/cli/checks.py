"""The argument checks that need no model, made before anything loads: numbers, flag combinations, the device and
the output paths."""

from __future__ import annotations

import argparse
import importlib.util
import math

from sparse_prefill.cli.calibrate import MIN_HEAD_RECALL
from sparse_prefill.cli.common import UsageError, check_device, check_out, check_out_folder


def check_numbers(args: argparse.Namespace) -> None:
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


def check_args(args: argparse.Namespace) -> None:
    """The checks that need no model: every command's arguments, before anything loads."""
    check_numbers(args)
    check_device(getattr(args, "device", None))
    if args.command == "calibrate":
        check_out(args.out)
        if args.record is not None:
            check_out(args.record, "--record")
    if args.command == "eval":
        check_out_folder(args.out)
        if not args.no_plots and importlib.util.find_spec("matplotlib") is None:
            raise UsageError("plots need matplotlib: pip install 'sparse-prefill[plots]', or pass --no-plots")
