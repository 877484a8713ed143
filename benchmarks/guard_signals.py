"""What a run-time guard could read, layer by layer, on a real model: the evidence behind ErrorGuard's rule.

    python benchmarks/guard_signals.py --model MODEL.gguf --tokenizer TOKENIZER --out guard_signals.json

One forward captures every layer's post-RoPE q, k and v on essay text (by default the calibration's:
32752 tokens from token 65536). Each layer's anchor plan (the pattern's defaults unless --params) is
judged per KV group on three sets of query rows: the guard's 64 and 256 sampled rows, and the last 1024
rows (the positions `eval` scores). Per row: attention recall (softmax mass the plan keeps) and the
relative error of the attention output, ||O_plan - O|| / ||O||. Kept per KV group: mean, 10th
percentile and minimum recall; mean, 90th percentile and maximum error. Also timed per layer (CUDA
events): SDPA, the identification, the plan's execution and the guard's test. Compare with a
calibration record's per-layer KL (`calibrate --record`) to choose what the guard should read.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from sparse_prefill.dispatch import sparse_attention
from sparse_prefill.guard import ErrorGuard
from sparse_prefill.interfaces import AttentionContext
from sparse_prefill.plan import DensePlan, causal_rows_mask
from sparse_prefill.registry import get_pattern


def _timed(fn, repeats: int = 5) -> float:
    """Mean milliseconds of ``fn`` after one warm-up call (CUDA events)."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def _row_signals(q, k, v, plan, scale: float, rows: torch.Tensor) -> dict[str, list[float]]:
    """Per KV group: recall and output-error statistics over ``rows`` (all query heads of the group pooled)."""
    num_q, num_kv = q.shape[1], k.shape[1]
    group = num_q // num_kv
    mask = plan.rows_mask(rows)
    per_query_head = mask.shape[1] == num_q
    causal = causal_rows_mask(rows, q.shape[2])
    stats: dict[str, list[float]] = {name: [] for name in
                                     ("recall_mean", "recall_p10", "recall_min", "error_mean", "error_p90", "error_max")}
    for kv in range(num_kv):
        scores = q[:, kv * group:(kv + 1) * group, rows].float() @ k[:, kv].float().transpose(-1, -2).unsqueeze(1)
        p = torch.softmax((scores * scale).masked_fill(~causal, float("-inf")), dim=-1)
        selected = mask[:, kv * group:(kv + 1) * group] if per_query_head else mask[:, kv:kv + 1]
        kept_p = p * selected
        recall = kept_p.sum(-1)
        values = v[:, kv].float().unsqueeze(1)
        dense_out = p @ values
        plan_out = (kept_p @ values) / recall.unsqueeze(-1)
        error = (plan_out - dense_out).norm(dim=-1) / dense_out.norm(dim=-1).clamp_min(1e-6)
        recall, error = recall.flatten(), error.flatten()
        stats["recall_mean"].append(float(recall.mean()))
        stats["recall_p10"].append(float(recall.quantile(0.1)))
        stats["recall_min"].append(float(recall.min()))
        stats["error_mean"].append(float(error.mean()))
        stats["error_p90"].append(float(error.quantile(0.9)))
        stats["error_max"].append(float(error.max()))
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--tokens", type=int, default=32752)
    parser.add_argument("--text-offset", type=int, default=65536)
    parser.add_argument("--params", default="", help="anchor parameters, e.g. 'theta=6 local=1024'")
    parser.add_argument("--out", required=True)
    parser.add_argument("--commit", default="unknown")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from sparse_prefill.evaluation.models import essay_token_ids, load_model
    from sparse_prefill.evaluation.recall import capture_qk

    model, tokenizer = load_model(args.model, dtype=torch.bfloat16, device="cuda")
    if args.tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    ids = essay_token_ids(tokenizer, args.tokens, args.text_offset).cuda()
    layers = range(model.config.num_hidden_layers)
    captured = capture_qk(model, ids, layers, values=True)
    del model
    params = {key: float(value) if "." in value or "e" in value else int(value)
              for key, value in (item.split("=") for item in args.params.split())}
    identifier = get_pattern("anchor").build(**params)
    n = ids.shape[1]
    result = dict(model=args.model, tokens=n, text_offset=args.text_offset, params=params, commit=args.commit,
                  gpu=torch.cuda.get_device_name(), torch=torch.__version__, layers=[])
    for layer, (q, k, v) in captured.items():
        ctx = AttentionContext.for_inputs(q, k, layer_idx=layer)
        plan = identifier.identify(q, k, ctx)
        row = dict(layer=layer, density=plan.density(), dense_plan=isinstance(plan, DensePlan))
        row["sdpa_ms"] = _timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
        row["identify_ms"] = _timed(lambda: identifier.identify(q, k, ctx))
        row["call_ms"] = _timed(lambda: sparse_attention(q, k, v, identifier, ctx))
        if not isinstance(plan, DensePlan):
            guard = ErrorGuard(0.5, 64)
            out = sparse_attention(q, k, v, identifier, ctx)[0]
            row["guard_ms"] = _timed(lambda: guard.dense_kv_heads(q, k, v, out, ctx.scale))
            row["guarded_call_ms"] = _timed(lambda: sparse_attention(q, k, v, identifier, ctx, guard=guard))
            for name, rows in (("guard64", ErrorGuard(rows=64).sample_rows(n, q.device)),
                               ("guard256", ErrorGuard(rows=256).sample_rows(n, q.device)),
                               ("scored", torch.arange(n - 1024, n, device=q.device))):
                row[name] = _row_signals(q, k, v, plan, ctx.scale, rows)
        result["layers"].append(row)
        print(json.dumps({key: value for key, value in row.items() if not isinstance(value, dict)}), flush=True)
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
