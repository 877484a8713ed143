"""Registered patterns beside dense SDPA, at their defaults and at anchor's recall: identify/execute time, recall.

Each pattern runs at its published defaults and (``--match-recall``) at the least dense setting of
its sweep that reaches anchor's recall; identification and execution are timed apart and together.

    python benchmarks/patterns_gpu.py --match-recall --out patterns_gpu.json --commit $(git rev-parse HEAD)
    python benchmarks/patterns_gpu.py --pattern anchor --pattern "flexprefill gamma=0.95" --out p.json
    python benchmarks/patterns_gpu.py --match-recall --qk captured.pt --out real.json   # real q, k, v
    python benchmarks/patterns_gpu.py --device cpu --lengths 1024 --hq 4 --hkv 2 --d 32 --out smoke.json

Inputs: the real-calibrated structured inputs of ``speed.py`` (Llama-3.1-8B attention shape by
default: 32 query heads, 8 KV heads, head dim 128, bf16), or with ``--qk`` a saved dict
``{"q", "k", "v"}`` of [B, H, N, D] tensors (each length takes the first N tokens: a causal prefix).
Patterns: every built-in one (``--pattern`` picks others, plugins included, with settings).

Per pattern, length and setting: the plan's kind and density; identification alone
(``identify_ms``), execution of that plan alone on the executor the dispatcher picks
(``execute_ms``), the whole call (``call_ms``, ``sparse_attention``: identification, execution and,
when the plan passes the default plan budget, head chunks); ``identify_over_execute`` (issue 14's
target: at most 0.1 at 128k); ||O - O_SDPA|| / ||O_SDPA||; dense SDPA's time.

Recall is the exact softmax mass inside the plan, on a sample of query rows:
:func:`~sparse_prefill.evaluation.recall.sampled_attention_recall` (the last ``--recall-rows`` rows
before ``--recall-windows`` evenly spaced ends, the last at N; every head). ``attention_recall``
reads every row and the plan group by group on the host: hours at 128k. ``--match-recall`` takes
anchor's recall at its defaults (``--target``) as the target and, per pattern, identifies each setting of its
sweep (``SWEEPS``) on the same inputs, keeping the least dense whose recall reaches the target (the
densest when none does, flagged ``reached: false``); that setting is then timed. A markdown table
"time at equal recall" is printed and stored in the JSON (``--out``, written after every row).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
import transformers

import speed
from sparse_prefill.dispatch import default_plan_budget, select_executor, sparse_attention
from sparse_prefill.evaluation.recall import sampled_attention_recall
from sparse_prefill.evaluation.synthetic import structured_qkv
from sparse_prefill.interfaces import AttentionContext, PlanBudgetExceeded
from sparse_prefill.plan import plan_nbytes
from sparse_prefill.registry import available_patterns, get_pattern

# Knob settings tried by --match-recall, sparse to dense; a pattern without one is measured at its defaults only.
SWEEPS: dict[str, list[dict[str, Any]]] = {
    "streaming": [{"local": n} for n in (1024, 2048, 4096, 8192, 16384, 32768)],
    "vertical-slash": [{"vertical": v, "slash": s} for v, s in
                       ((500, 1000), (1000, 2000), (1000, 6096), (2000, 8000), (4000, 16000), (8000, 32000))],
    "flexprefill": [{"gamma": g} for g in (0.8, 0.9, 0.95, 0.98, 0.99)],
    "xattention": [{"threshold": t} for t in (0.8, 0.9, 0.95, 0.98)],
    "flashprefill": [{"alpha": a} for a in (0.3, 0.18, 0.1, 0.05, 0.02)],
    "block-topk": [{"blocks": b} for b in (50, 100, 200, 400, 800)],
}


def _pattern(text: str) -> tuple[str, dict]:
    """'name key=value ...' -> (name, parameters), values read as YAML scalars."""
    name, *assignments = text.split()
    get_pattern(name)  # an unknown name gets the registry's message
    return name, speed.assignments(assignments)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _bench(fn: Callable[[], Any], device: torch.device) -> float:
    """Median milliseconds with ``speed.bench`` on a GPU; on a CPU (smoke runs, not a measurement) one call."""
    if device.type == "cuda":
        return speed.bench(fn)
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def _inputs(args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
            ) -> Callable[[int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """length -> (q, k, v): a prefix of the --qk tensors, or synthetic structured inputs."""
    if args.qk:
        saved = torch.load(args.qk, map_location="cpu")
        q, k, v = (saved[name] for name in ("q", "k", "v"))

        def prefix(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            if n > q.shape[2]:
                raise SystemExit(f"--qk holds {q.shape[2]} tokens, fewer than the length {n}")
            return tuple(x[:, :, :n].to(device=device, dtype=dtype).contiguous() for x in (q, k, v))
        return prefix
    return lambda n: structured_qkv(n, args.hq, args.hkv, args.d, device=device, dtype=dtype, strength=0.8,
                                    heavy_fraction=0.055)


class _Measure:
    """One length's inputs, dense reference and the measurements of any setting on them."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, args: argparse.Namespace) -> None:
        self.q, self.k, self.v, self.args = q, k, v, args
        self.ctx = AttentionContext.for_inputs(q, k)
        self.device = q.device
        dense = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
        self.dense_out, self.dense_ms = dense(), _bench(dense, q.device)

    def selection(self, name: str, params: dict) -> dict:
        """Plan kind, density and sampled recall of one setting (identified once)."""
        plan = get_pattern(name).build(**params).identify(self.q, self.k, self.ctx)
        recall = sampled_attention_recall(self.q, self.k, plan, self.ctx.scale, self.args.recall_windows,
                                          self.args.recall_rows)
        return dict(plan=type(plan).__name__, density=plan.density(), recall=recall, plan_bytes=plan_nbytes(plan))

    def timing(self, name: str, params: dict) -> dict:
        """Identification, execution and the whole call apart, their ratio, and the output's error."""
        q, k, v, ctx = self.q, self.k, self.v, self.ctx
        identifier = get_pattern(name).build(**params)
        if self.device.type == "cuda":
            plan, first_identify_s = speed.timed_once(lambda: identifier.identify(q, k, ctx))
        else:
            plan, first_identify_s = identifier.identify(q, k, ctx), None
        executor = select_executor(q, plan)
        try:
            identifier.identify(q, k, dataclasses.replace(ctx, plan_budget=default_plan_budget(q, k, v)))
            chunked = False
        except PlanBudgetExceeded:
            chunked = True
        out, _ = sparse_attention(q, k, v, identifier, ctx)
        row = dict(executor=executor.name, chunked_call=chunked, first_identify_s=first_identify_s,
                   identify_ms=_bench(lambda: identifier.identify(q, k, ctx), self.device),
                   execute_ms=_bench(lambda: executor(q, k, v, plan, ctx), self.device),
                   call_ms=_bench(lambda: sparse_attention(q, k, v, identifier, ctx), self.device),
                   rel_err_vs_dense=speed.relative_error(out, self.dense_out),
                   finite=bool(torch.isfinite(out).all()), dense_ms=self.dense_ms)
        row["identify_over_execute"] = row["identify_ms"] / row["execute_ms"]
        row["call_over_dense"] = row["call_ms"] / self.dense_ms
        return row


def _matched(measure: _Measure, name: str, base: dict, target: float) -> tuple[dict, dict, bool, list[dict]]:
    """(setting, its selection, reached, every setting tried): the least dense setting of the sweep
    reaching ``target`` recall, or the one of highest recall when none does."""
    tried = [({**base, **change}, measure.selection(name, {**base, **change})) for change in SWEEPS[name]]
    sweep = [dict(params=params, **found) for params, found in tried]
    reaching = [(params, found) for params, found in tried if found["recall"] >= target]
    if reaching:
        return (*min(reaching, key=lambda pair: pair[1]["density"]), True, sweep)
    return (*max(tried, key=lambda pair: pair[1]["recall"]), False, sweep)


def _equal_recall(rows: list[dict], target: str) -> list[dict]:
    """The rows of the comparison at equal recall: the target at its setting, each pattern at its matched one."""
    return [r for r in rows if r["mode"] == "equal recall" or (r["pattern"] == target and r["mode"] == "defaults")]


def _table(rows: list[dict]) -> str:
    """Markdown: one line per length, pattern and mode."""
    lines = ["| N | pattern | mode | setting | plan | density | recall | identify ms | execute ms | call ms "
             "| identify/execute | rel. err. | call/dense |", "|" + " --- |" * 13]
    for r in rows:
        setting = " ".join(f"{key}={value}" for key, value in r["params"].items()) or "defaults"
        mode = r["mode"] + ("" if r.get("reached", True) else " (not reached)")
        lines.append(f"| {r['seq_len']} | {r['pattern']} | {mode} | {setting} | {r['plan']} | {r['density']:.3f} "
                     f"| {r['recall']:.3f} | {r['identify_ms']:.2f} | {r['execute_ms']:.2f} | {r['call_ms']:.2f} "
                     f"| {r['identify_over_execute']:.3f} | {r['rel_err_vs_dense']:.4f} | {r['call_over_dense']:.2f} |")
    return "\n".join(lines)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or 'unknown'})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pattern", action="append", type=_pattern, metavar="'NAME KEY=VALUE ...'",
                        help="a pattern and settings (repeatable); default: every built-in pattern at its defaults")
    parser.add_argument("--match-recall", action="store_true",
                        help="also time each pattern at the least dense setting of SWEEPS reaching --target's recall")
    parser.add_argument("--target", default=("anchor", {}), type=_pattern, metavar="'NAME KEY=VALUE ...'",
                        help="the setting whose recall --match-recall matches (default: anchor at its defaults)")
    parser.add_argument("--lengths", default=None, help="comma-separated; default 32768,131072 (--qk: its length)")
    parser.add_argument("--qk", default=None, help='torch.save\'d dict {"q", "k", "v"} of [B, H, N, D] tensors')
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default=None, help="bfloat16 on a GPU, float32 on a CPU unless given")
    parser.add_argument("--hq", type=int, default=32)
    parser.add_argument("--hkv", type=int, default=8)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--recall-windows", type=int, default=16)
    parser.add_argument("--recall-rows", type=int, default=64)
    parser.add_argument("--out", required=True)
    parser.add_argument("--commit", default="unknown")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    patterns = args.pattern or [(info.name, {}) for info in available_patterns() if info.plugin == "builtin"]
    inputs = _inputs(args, device, dtype)
    lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else (
        [torch.load(args.qk, map_location="cpu")["q"].shape[2]] if args.qk else [32768, 131072])
    versions = dict(torch=torch.__version__, transformers=transformers.__version__)
    try:
        import triton
        versions["triton"] = triton.__version__
    except ImportError:
        pass
    result = dict(gpu=_device_name(device), versions=versions, commit=args.commit, dtype=str(dtype),
                  target=dict(pattern=args.target[0], params=args.target[1]) if args.match_recall else None,
                  inputs=args.qk or f"structured_qkv(strength=0.8, heavy_fraction=0.055), hq={args.hq}, "
                                    f"hkv={args.hkv}, d={args.d}",
                  recall=f"sampled_attention_recall(windows={args.recall_windows}, rows={args.recall_rows})",
                  rows=[])
    for n in lengths:
        measure = _Measure(*inputs(n), args)
        target = measure.selection(*args.target)["recall"] if args.match_recall else None
        for name, params in patterns:
            runs = [("defaults", params, measure.selection(name, params), True, [])]
            if args.match_recall and name in SWEEPS:
                runs.append(("equal recall", *_matched(measure, name, params, target)))
            for mode, setting, selection, reached, sweep in runs:
                row = dict(pattern=name, mode=mode, params=setting, seq_len=n, target_recall=target,
                           reached=reached, **selection, **measure.timing(name, setting), sweep=sweep)
                print(json.dumps(row), flush=True)
                result["rows"].append(row)
                result["table_markdown"] = _table(result["rows"])
                if args.match_recall:
                    result["equal_recall_markdown"] = _table(_equal_recall(result["rows"], args.target[0]))
                with open(args.out, "w") as fh:  # after every row: a run cut short keeps what it measured
                    json.dump(result, fh, indent=2)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        del measure
    print("\n## Every setting\n\n" + result["table_markdown"])
    if args.match_recall:
        print(f"\n## Time at equal recall ({args.target[0]}'s recall)\n\n" + result["equal_recall_markdown"])


if __name__ == "__main__":
    main()
