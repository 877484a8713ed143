"""`sparse-prefill`: run the side-by-side demo, measure perplexity, calibrate theta, validate policies, list patterns."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from sparse_prefill.evaluation import BASELINE_LABEL
from sparse_prefill.policy import Policy, PolicyError, load_policy, shipped_policies
from sparse_prefill.registry import available_patterns, plugin_errors

# The shipped default (fast, recall >= 0.95) and the conservative one (keeps exact retrieval on small models).
DEFAULT_POLICIES = ("anchor.yaml", "anchor-accurate.yaml")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _policies(args: argparse.Namespace) -> dict[str, Policy]:
    """The --policy files (or the defaults) by label, with --min-length applied.

    A policy's label is its file name without the suffix; where that is taken (by another policy,
    or by ``dense``, the unpatched baseline every comparison starts with) it is the path as given,
    so no result silently replaces another.
    """
    policies: dict[str, Policy] = {}
    for name in args.policy or DEFAULT_POLICIES:
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


def _cmd_run(args: argparse.Namespace) -> int:
    from sparse_prefill.demo import compare_dense_and_sparse, format_side_by_side

    policies = _policies(args)
    for policy in policies.values():
        print(policy.describe())
    device, dtype = _device_and_dtype(args)
    prompt, results = compare_dense_and_sparse(args.model, policies, args.length, args.depth, device, dtype,
                                               args.max_new_tokens)
    print(format_side_by_side(prompt, results))
    return 0


def _cmd_perplexity(args: argparse.Namespace) -> int:
    from sparse_prefill.evaluation.models import essay_token_ids, load_model
    from sparse_prefill.evaluation.perplexity import compare_perplexity

    device, dtype = _device_and_dtype(args)
    policies = _policies(args)
    model, tokenizer = load_model(args.model, dtype=dtype, device=device)
    ids = essay_token_ids(tokenizer, args.length)
    results = compare_perplexity(model, ids, policies, args.score_last)
    print(f"perplexity on {args.length} essay tokens, last {args.score_last} scored:")
    for label, value in results.items():
        print(f"  {label:24} {value:.3f}")
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from sparse_prefill.evaluation.calibrate import calibrate_layers, calibrated_policy
    from sparse_prefill.evaluation.models import essay_token_ids, load_model
    from sparse_prefill.evaluation.recall import capture_qk

    base = load_policy(args.policy)
    device, dtype = _device_and_dtype(args)
    model, tokenizer = load_model(args.model, dtype=dtype, device=device)
    layers = args.layers if args.layers else range(model.config.get_text_config().num_hidden_layers)
    qk = capture_qk(model, essay_token_ids(tokenizer, args.tokens), layers)
    qk = {layer: (q.float(), k.float()) for layer, (q, k) in qk.items()}  # scores and theta compared in fp32
    results = calibrate_layers(qk, base.default.as_dict(), args.target_recall,
                               progress=lambda layers: tqdm(layers, desc="layers", unit="layer"))
    header = (f"Written by `sparse-prefill calibrate` from {base.source}: {args.model}, {args.tokens} essay tokens,\n"
              f"the smallest theta per layer keeping attention recall >= {args.target_recall}.")
    text = calibrated_policy(base, results, header)
    args.out.write_text(text)
    print(text, end="")
    missed = [r.layer for r in results if not r.reached]
    if missed:
        print(f"warning: layers {missed} stay below recall {args.target_recall} even at theta 16", file=sys.stderr)
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


def _cmd_patterns(args: argparse.Namespace) -> int:
    infos = available_patterns()
    width = max((len(info.name) for info in infos), default=0)
    for info in infos:
        print(f"{info.name:{width}}  {info.description}  [plugin {info.plugin}, from {info.distribution}]")
    for error in plugin_errors():
        print(f"error: {error}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparse-prefill", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="dense vs sparse prefill on a needle-in-a-haystack prompt, side by side")
    run.add_argument("--model", default="smollm2",
                     help="local Hugging Face model folder, a .gguf file, or 'smollm2' (the packaged default)")
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
    run.add_argument("--max-new-tokens", type=int, default=24)
    run.set_defaults(func=_cmd_run)

    ppl = commands.add_parser("perplexity", help="perplexity on long real text, dense vs each policy")
    ppl.add_argument("--model", default="smollm2", help="as for `run`")
    ppl.add_argument("--policy", action="append", default=None, help="as for `run` (repeatable)")
    ppl.add_argument("--length", type=int, default=4096, help="tokens of text in the one forward pass")
    ppl.add_argument("--score-last", type=int, default=None,
                     help="score only the last N predictions (default: min(1024, length - 1); 0: all of them)")
    ppl.add_argument("--min-length", type=int, default=0, help="as for `run` (-1 keeps the policy's)")
    ppl.add_argument("--device", default=None)
    ppl.add_argument("--dtype", choices=sorted(_DTYPES), default=None)
    ppl.set_defaults(func=_cmd_perplexity)

    calibrate = commands.add_parser(
        "calibrate", help="per-layer theta for a recall target on a model's own attention; writes a policy")
    calibrate.add_argument("--model", default="smollm2", help="as for `run`")
    calibrate.add_argument("--policy", default="anchor.yaml",
                           help="the anchor policy to start from (its other parameters are kept)")
    calibrate.add_argument("--tokens", type=int, default=8192, help="essay tokens to run through the model")
    calibrate.add_argument("--layers", type=int, nargs="*", default=None, help="layers to calibrate (default: all)")
    calibrate.add_argument("--target-recall", type=float, default=0.95, help="softmax mass each layer must keep")
    calibrate.add_argument("--out", type=Path, required=True, help="where to write the calibrated policy YAML")
    calibrate.add_argument("--device", default=None)
    calibrate.add_argument("--dtype", choices=sorted(_DTYPES), default=None)
    calibrate.set_defaults(func=_cmd_calibrate)

    validate = commands.add_parser("validate", help="check policy files; print them resolved")
    validate.add_argument("policies", nargs="+")
    validate.set_defaults(func=_cmd_validate)

    patterns = commands.add_parser("patterns", help="list registered patterns and where they come from")
    patterns.set_defaults(func=_cmd_patterns)
    return parser


def _check_numbers(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject impossible numeric arguments before a model is loaded (which takes seconds to minutes)."""
    if getattr(args, "min_length", None) is not None and args.min_length < -1:
        parser.error(f"--min-length must be >= 0, or -1 to keep the policy's, got {args.min_length}")
    if args.command in ("run", "perplexity") and args.length < 2:
        parser.error(f"--length must be at least 2 tokens, got {args.length}")
    if args.command == "calibrate":
        if not 0 < args.target_recall <= 1:
            parser.error(f"--target-recall must be in (0, 1], got {args.target_recall}")
        if args.tokens < 2:
            parser.error(f"--tokens must be at least 2, got {args.tokens}")
        if args.layers and min(args.layers) < 0:
            parser.error(f"--layers takes layer indices >= 0, got {args.layers}")
    if args.command == "perplexity":
        if args.score_last is None:
            args.score_last = min(1024, args.length - 1)
        elif args.score_last == 0:
            args.score_last = args.length - 1
        elif not 0 < args.score_last < args.length:
            parser.error(f"--score-last must be in [0, {args.length - 1}] for --length {args.length}, "
                         f"got {args.score_last}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_numbers(parser, args)
    if getattr(args, "min_length", None) == -1:
        args.min_length = None
    try:
        return args.func(args)
    except PolicyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
