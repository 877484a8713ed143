"""Plot a speed.py result: time vs length, dense SDPA vs anchor, one panel per input strength.

    python benchmarks/plot_speed.py docs/benchmarks/speed_h200.json docs/benchmarks/speed_h200.png
"""

from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src: str, dst: str) -> None:
    result = json.load(open(src))
    strengths = sorted({row["strength"] for row in result["rows"]})
    fig, axes = plt.subplots(1, len(strengths), figsize=(6 * len(strengths), 4.5), squeeze=False)
    for ax, strength in zip(axes[0], strengths):
        rows = [r for r in result["rows"] if r["strength"] == strength]
        n = [r["seq_len"] // 1024 for r in rows]
        ax.plot(n, [r["dense_ms"] for r in rows], "o-", label="dense SDPA")
        ax.plot(n, [r["anchor_ms"] for r in rows], "s-", label="anchor: identify + execute")
        ax.plot(n, [r["identify_ms"] for r in rows], "^--", label="anchor: identify")
        ax.plot(n, [r["policy_ms"] for r in rows], "k:", label=f"anchor.yaml (dense below {result['min_length'] // 1024}k)")
        for r, x in zip(rows, n):
            ax.annotate(f"d={r['density']:.3f}\nerr={r['rel_err_vs_dense']:.3f}", (x, r["anchor_ms"]),
                        textcoords="offset points", xytext=(4, -22), fontsize=7)
        ax.set(xscale="log", yscale="log", xlabel="sequence length (k tokens)", ylabel="ms (median)",
               title=f"synthetic strength {strength}" + "".join(f", {k} {v}" for k, v in result.get("synthetic", {}).items()))
        ax.set_xticks(n, [str(x) for x in n])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    shape = result["shape"]
    fig.suptitle(f"{result['gpu']}, {shape['q_heads']}q/{shape['kv_heads']}kv heads, d={shape['head_dim']}, "
                 f"bf16, commit {result['commit'].split()[0]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="a speed.py result (JSON)")
    parser.add_argument("dst", help="the picture to write (PNG)")
    args = parser.parse_args()
    main(args.src, args.dst)
