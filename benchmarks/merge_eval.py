"""Join the per-length results of benchmarks/eval_gpu.sh into one record, and draw its plots.

    python benchmarks/merge_eval.py --model gemma-3-270m --commit 3a45c88 \
        --out docs/benchmarks/eval_gemma3_270m_h200 RUN/gemma/16384 RUN/gemma/24576 ...

Writes OUT.json (the runs of every folder, each folder's settings and device beside its results; a folder whose
eval was cut off by its time limit says so with ``complete: false``), OUT_quality.png (KL and
perplexity vs mean density, one curve per policy and length), OUT_time.png (the same against prefill
time, where the runs timed it) and OUT_needle.png (where they ran the needle). Each folder
measured dense itself (for its KL); the first dense per length is kept. A folder whose
name ends in ``-SUFFIX`` gets SUFFIX added to its policy labels, so a second sweep of one policy
(``anchor.yaml`` with ``local=4096``) draws its own curve. ``--commit`` names the commit the GPU
ran: its copy of the tree carries no git history.

For benchmarks/kl_budget_gpu.sh: ``--calibration FOLDER/calibration.json`` stores what
``calibrate --kl-budget`` measured and chose beside the results (every (layer, option) once, each
budget's choice and checks), and the policies it wrote (``NAME-klB``) join one curve,
``NAME-kl[budget=B]``. ``--compare RECORD.json`` draws an earlier record's points in the plots
too (same model and text; the record names it), so the new points sit among the patterns' curves.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from sparse_prefill.evaluation import BASELINE_LABEL
from sparse_prefill.evaluation.plots import plot_needle_heatmap, plot_quality_vs_density, plot_quality_vs_time
from sparse_prefill.evaluation.report import read_report
from sparse_prefill.evaluation.whole_model import Measurement


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--model", required=True, help="the model's name, for the record and the plot titles")
    parser.add_argument("--commit", required=True)
    parser.add_argument("--out", required=True, type=Path,
                        help="the record's path (OUT.json; the plots go beside it as OUT_quality.png, OUT_needle.png)")
    parser.add_argument("--calibration", type=Path, default=None, help="calibration.json of calibrate --record")
    parser.add_argument("--compare", type=Path, action="append", default=[],
                        help="an earlier merged record whose points the plots also draw (repeatable)")
    args = parser.parse_args()
    if args.out.suffix == ".json":
        args.out = args.out.with_suffix("")
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
        runs.append({"folder": folder.name, "device": report["device"], "complete": report.get("complete", False),
                     "settings": report["settings"], "policies": report["policies"]})
        results += measured
    record = {"model": args.model, "commit": args.commit, **env, "runs": runs}
    if args.calibration is not None:
        record["calibration"] = _condensed_calibration(json.loads(args.calibration.read_text()))
        for m in results:
            m.label = _budget_curve_label(m.label, record["calibration"]["budgets"])
    compared = []
    for path in args.compare:
        earlier = json.loads(path.read_text())
        compared += [Measurement(**r) for r in earlier["results"] if r["label"] != BASELINE_LABEL]
        record.setdefault("compared_with", []).append(f"{path.name} (commit {earlier['commit']})")
    record["results"] = [dataclasses.asdict(m) for m in results]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    title = f"{args.model}, {env['device']}, commit {args.commit}"
    if compared:
        title += f" (+ {', '.join(path.stem for path in args.compare)})"
    plot_quality_vs_density([*compared, *results], args.out.with_name(args.out.name + "_quality.png"), title)
    if any(m.needle for m in results):  # a run without needle depths has no heatmap to draw
        plot_needle_heatmap(results, args.out.with_name(args.out.name + "_needle.png"), title)
    if any(m.prefill_vs_dense is not None for m in results):
        plot_quality_vs_time([*compared, *results], args.out.with_name(args.out.name + "_time.png"), title)


def _condensed_calibration(saved: dict) -> dict:
    """calibrate --record's file with the measurements once (every budget repeats them)."""
    budgets = saved.pop("budgets")
    measured = budgets[0]["measured"] if budgets else []
    return {**saved, "measured": measured,
            "budgets": [{key: value for key, value in b.items() if key != "measured"} for b in budgets]}


def _budget_curve_label(label: str, budgets: list[dict]) -> str:
    """``anchor-kl0.02`` -> ``anchor-kl[budget=0.02]`` for a policy calibrate wrote, so the budgets draw one curve."""
    for budget in budgets:
        stem = Path(budget["out"]).stem
        if label == stem:
            name, _, value = stem.rpartition("-kl")
            return f"{name}-kl[budget={value}]"
    return label


if __name__ == "__main__":
    main()
