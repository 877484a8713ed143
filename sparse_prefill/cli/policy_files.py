"""`validate` (policy files checked and printed resolved) and `convert-minference` (MInference's per-head
configurations as a policy)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sparse_prefill.policy import PolicyError, load_policy


def cmd_validate(args: argparse.Namespace) -> int:
    """`validate`: each policy file resolved and printed, or its error; exit 1 if any failed."""
    failed = 0
    for path in args.policies:
        try:
            print(load_policy(path).describe())
        except PolicyError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


def cmd_convert_minference(args: argparse.Namespace) -> int:
    """`convert-minference`: MInference's JSON as a policy, validated before anything is written."""
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
