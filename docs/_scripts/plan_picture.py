"""Draws docs/img/plans.png: a StripePlan beside a BlockPlan, from real plan objects.

Both plans cover the same 64-token causal prefill of one head. The picture is each plan's own
``to_dense()`` mask, coloured by which part of the plan put each key there, so it shows the layout
the code uses rather than a drawing of it. Rerun after changing either plan type:

    python docs/_scripts/plan_picture.py
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "docs" / "img" / "plans.png"


def example_plans():
    """A stripe plan (groups of 8 rows, sink 4, local 8, a few selected keys) and a block plan (blocks of 8)."""
    import torch

    from sparse_prefill import BlockPlan, StripePlan

    stripe = StripePlan.empty(batch=1, plan_heads=1, seq_len=64, group_rows=8, sink=4, local=8, device="cpu")
    _, _, sink_end, local_start = stripe.group_geometry()
    # Keys 13, 21 and 22 are "heavy" columns: each group keeps those that lie among its candidates.
    lists = [[key for key in (13, 21, 22, 37) if start <= key < stop]
             for start, stop in zip(sink_end.tolist(), local_start.tolist())]
    stripe = stripe.filled(torch.tensor([len(keys) for keys in lists]),
                           torch.tensor([key for keys in lists for key in keys]))
    # Each query block keeps key block 0, its diagonal, and one block chosen in between.
    rows = [[0], [0, 1], [0, 2], [0, 1, 3], [0, 2, 4], [0, 2, 5], [0, 3, 6], [0, 5, 7]]
    offsets = torch.tensor([0] + [len(r) for r in rows]).cumsum(0)
    block = BlockPlan(1, 1, 64, 8, offsets, torch.tensor([b for r in rows for b in r], dtype=torch.int32))
    stripe.validate()
    block.validate()
    return stripe, block


def stripe_parts(stripe) -> "torch.Tensor":
    """0 none, 1 initial window, 2 local window, 3 selected key: per (row, key) of head 0."""
    import torch

    mask = stripe.to_dense()[0, 0]
    parts = torch.zeros(mask.shape, dtype=torch.int64)
    for group in range(stripe.num_groups):
        row_start, row_end, sink_end, local_start = stripe.group_bounds(group)
        rows = slice(row_start, row_end)
        parts[rows] = torch.where(mask[rows], 3, 0)
        parts[rows, :sink_end] = torch.where(mask[rows, :sink_end], 1, 0)
        parts[rows, local_start:] = torch.where(mask[rows, local_start:], 2, 0)
    return parts


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    stripe, block = example_plans()
    fig, (left, right) = plt.subplots(1, 2, figsize=(8.4, 4.2), dpi=110)
    colours = ListedColormap(["#f4f4f4", "#e07b39", "#3b75af", "#2a9d4b"])
    left.imshow(stripe_parts(stripe), cmap=colours, vmin=0, vmax=3, interpolation="nearest")
    left.set_title(f"StripePlan: density {stripe.density():.2f}\nwindows + selected keys per group of 8 rows",
                   fontsize=9)
    legend = [Patch(color=colours(i), label=label)
              for i, label in ((1, "initial window (sink)"), (2, "local window / kept block"), (3, "selected key"))]
    fig.legend(handles=legend, loc="lower center", ncol=3, fontsize=8, frameon=False)
    right.imshow(block.to_dense()[0, 0].long() * 2, cmap=colours, vmin=0, vmax=3, interpolation="nearest")
    right.set_title(f"BlockPlan: density {block.density():.2f}\nkey blocks per query block of 8 rows", fontsize=9)
    for axis in (left, right):
        axis.set_xlabel("key position")
        axis.set_ylabel("query position")
        for edge in range(8, 64, 8):  # the query groups / blocks
            axis.axhline(edge - 0.5, color="white", linewidth=0.6)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT)
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
