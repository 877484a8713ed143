"""Join the per-length results of benchmarks/eval_gpu.sh into one record, and draw its plots.

    python benchmarks/merge_eval.py --model gemma-3-270m --commit 3a45c88 \
        --out docs/benchmarks/eval_gemma3_270m_h200 RUN/gemma/16384 RUN/gemma/24576 ...

Writes OUT.json (the runs of every folder, each folder's settings beside its results; a folder whose
eval was cut off by its time limit says so with ``complete: false``), OUT_quality.png (KL and
perplexity vs mean density, one curve per policy and length) and OUT_needle.png. Each folder
measured dense itself (for its KL); the first dense per length is kept. A folder whose
name ends in ``-SUFFIX`` gets SUFFIX added to its policy labels, so a second sweep of one policy
(``anchor.yaml`` with ``local=4096``) draws its own curve. ``--commit`` names the commit the GPU
ran: its copy of the tree carries no git history.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from sparse_prefill.evaluation import BASELINE_LABEL
from sparse_prefill.evaluation.plots import plot_needle_heatmap, plot_quality_vs_density
from sparse_prefill.evaluation.report import read_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--model", required=True, help="the model's name, for the record and the plot titles")
    parser.add_argument("--commit", required=True)
    parser.add_argument("--out", required=True, type=Path, help="path prefix of the JSON and the two plots")
    args = parser.parse_args()
    runs, results, env = [], [], None
    for folder in args.folders:
        report, measured = read_report(folder / "results.json")
        suffix = folder.name.partition("-")[2]
        for m in measured:
            if suffix and m.label != BASELINE_LABEL:
                base, bracket, rest = m.label.partition("[")
                m.label = f"{base}+{suffix}{bracket}{rest}"
        # Each folder measured dense again (its KL reference): keep the first dense per length.
        seen = {m.length for m in results if m.label == BASELINE_LABEL}
        measured = [m for m in measured if m.label != BASELINE_LABEL or m.length not in seen]
        env = env or {key: report[key] for key in ("device", "versions", "dtype")}
        runs.append({"folder": folder.name, "complete": report.get("complete", False),
                     "settings": report["settings"], "policies": report["policies"]})
        results += measured
    record = {"model": args.model, "commit": args.commit, **env, "runs": runs,
              "results": [dataclasses.asdict(m) for m in results]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    title = f"{args.model}, {env['device']}, commit {args.commit}"
    plot_quality_vs_density(results, args.out.with_name(args.out.name + "_quality.png"), title)
    plot_needle_heatmap(results, args.out.with_name(args.out.name + "_needle.png"), title)


if __name__ == "__main__":
    main()
