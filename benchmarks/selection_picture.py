"""What each pattern selects for one head of a real prompt, beside where that head's attention lies.

    python benchmarks/selection_picture.py --tokens 4096 --layer 14 --head 4 --out selection.png

Captures post-RoPE Q/K of one layer of the packaged SmolLM2-135M on essay text (CPU is enough),
identifies each pattern at its shipped policy's parameters with the dense fallback off (the
selection itself, as benchmarks/compare_patterns.py does), and draws
:func:`sparse_prefill.evaluation.plots.plot_selection`: the head's attention mass per tile, then
per pattern the fraction of each tile it computes, with its recall and density for that head.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from recall import load_qk
from sparse_prefill.evaluation.plots import plot_selection
from sparse_prefill.evaluation.selection import selection_grid
from sparse_prefill.interfaces import AttentionContext
from sparse_prefill.policy import load_policy
from sparse_prefill.registry import get_pattern

# vertical-slash at the sizes that keep 95% on SmolLM2 at 8k (vertical-slash.yaml's comment): its shipped
# sizes are meant for 128k prompts and select every key at 4k-8k.
POLICIES = ("anchor.yaml", "flexprefill.yaml", "vertical-slash:vertical=800,slash=400", "streaming.yaml")


def _choice(spec: str) -> tuple[str, dict]:
    """A shipped policy's (or a YAML file's) default choice, or ``PATTERN:key=value,...`` (YAML scalars)."""
    if ":" not in spec:
        choice = load_policy(spec).default
        return choice.pattern, choice.as_dict()
    pattern, _, items = spec.partition(":")
    params = {key: yaml.safe_load(value) for key, _, value in (item.partition("=") for item in items.split(","))}
    return pattern, params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--layer", type=int, default=14)
    parser.add_argument("--head", type=int, default=4, help="query head")
    parser.add_argument("--cell", type=int, default=64, help="tile size of the picture, in tokens")
    parser.add_argument("--policy", action="append",
                        help=f"a policy or PATTERN:key=value,... (repeatable); default: {', '.join(POLICIES)}")
    parser.add_argument("--qk-cache", type=Path, help="load captured Q/K from here if it exists, else save them here")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    q, k = load_qk(args.model, args.tokens, [args.layer], args.qk_cache)[args.layer]
    grids = {}
    for name in args.policy or POLICIES:
        pattern, params = _choice(name)
        identifier = get_pattern(pattern).build(**params)
        plan = identifier.identify(q, k, AttentionContext.for_inputs(q, k, dense_fallback=False))
        grids[name] = selection_grid(q, k, plan, head=args.head, cell=args.cell)
    title = f"{args.model}, layer {args.layer}, query head {args.head}, {args.tokens} essay tokens"
    print(f"wrote {plot_selection(grids, args.out, title)}")
    for label, grid in grids.items():
        print(f"{label:40} recall {grid.recall:.3f}  density {grid.density:.3f}")


if __name__ == "__main__":
    main()
