"""`run` (dense vs each policy on a needle prompt, side by side) and `perplexity` (dense vs each policy on text)."""

from __future__ import annotations

import argparse

from sparse_prefill.cli.common import (
    UsageError,
    check_positions,
    device_and_dtype,
    essay_ids,
    policies_from_args,
    print_summaries,
    progress_bars,
    tokenizer_and_config,
)


def cmd_run(args: argparse.Namespace) -> int:
    """`run`: the needle prompt under dense and each policy, answers side by side, then what ran; every argument
    the prompt depends on is checked before the weights load."""
    from sparse_prefill.demo import compare_dense_and_sparse, format_side_by_side
    from sparse_prefill.evaluation.models import load_weights
    from sparse_prefill.evaluation.needle import build_needle_prompt

    policies = policies_from_args(args)
    files, tokenizer, config = tokenizer_and_config(args.model, policies.values())
    new = f" with --max-new-tokens {args.max_new_tokens}"
    check_positions(config, "--length", args.length, args.length + args.max_new_tokens, new)
    try:
        prompt = build_needle_prompt(tokenizer, args.length, args.depth)
    except ValueError as exc:
        raise UsageError(f"--length {args.length}: {exc}") from None
    # The built prompt can run a token past --length (the needle re-tokenized with its neighbours).
    check_positions(config, "--length", args.length, prompt.input_ids.shape[1] + args.max_new_tokens, new)
    for policy in policies.values():
        print(policy.describe())
    device, dtype = device_and_dtype(args)
    model = load_weights(files, config, dtype=dtype, device=device)
    with progress_bars(args, model):
        results = compare_dense_and_sparse(model, tokenizer, prompt, policies, args.max_new_tokens)
    print(format_side_by_side(prompt, results))
    print_summaries({r.label: r.summary for r in results if r.summary})
    return 0


def cmd_perplexity(args: argparse.Namespace) -> int:
    """`perplexity`: dense and each policy on the same essay tokens, then what ran under each."""
    from sparse_prefill.evaluation.models import load_weights
    from sparse_prefill.evaluation.perplexity import compare_perplexity

    policies = policies_from_args(args)
    files, tokenizer, config = tokenizer_and_config(args.model, policies.values())
    ids = essay_ids(tokenizer, config, "--length", args.length)
    device, dtype = device_and_dtype(args)
    model = load_weights(files, config, dtype=dtype, device=device)
    summaries: dict[str, str] = {}
    with progress_bars(args, model):
        results = compare_perplexity(model, ids, policies, args.score_last, summaries)
    print(f"perplexity on {args.length} essay tokens, last {args.score_last} scored:")
    for label, value in results.items():
        print(f"  {label:24} {value:.3f}")
    print_summaries(summaries)
    return 0
