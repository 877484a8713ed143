"""Time to first token of a Llama-3.1-8B-shaped model (32 layers, bf16, random weights): dense vs ``anchor.yaml``.

    python benchmarks/ttft_8b.py --out ttft_8b_h200.json                      # 32k, 64k, 128k on one GPU
    python benchmarks/ttft_8b.py --tiny --device cpu --lengths 384 512 --out ttft_tiny.json   # the code path, on CPU

What it measures: for each length, one forward ``model(ids, use_cache=False, logits_to_keep=1)``
under ``torch.inference_mode()`` (the prefill that yields the first token), the median of
``--repeats`` after one warm-up, synchronised (``whole_model.prefill_ms``). Unpatched (SDPA) and
patched in the same process on the same token ids, against issue 16's targets: at most 0.8x
dense at 32k, 0.55x at 64k, 0.4x at 128k.

Method (random weights give near-uniform attention, so anchor's plans pass ``dense_above`` and
run dense): every attention layer identifies on calibrated synthetic queries and keys of its
own shape and executes that plan on its real q, k and v. ``structured_qkv(N, 32, 8, 128,
strength=0.8, heavy_fraction=0.055, seed=0)`` (the real-calibrated inputs of
docs/benchmarks/calibration.md) is generated once per length in the model's dtype on its
device, and this one set serves every layer (per-layer seeds would cost 1.25 GiB and seconds of
CPU sampling per layer at 128k, for plans that differ only by noise). The pattern
``anchor-on-synthetic``, registered here with ``register_plugin`` like any third-party pattern,
wraps anchor's identifier and swaps in the synthetic tensors for the heads of the call (a shape,
dtype or device that differs raises). Its policy is ``anchor.yaml``'s: the same anchor
parameters, ``min_length`` and ``dense_above``. So identification costs what it costs at that
shape, the plans have the densities calibrated inputs give, and the library's executor runs
them on the model's own tensors. ``anchor.yaml`` on the raw random-weight inputs is timed too
(``--raw-lengths``): what random weights alone give, the dense fallback. When the policy has a guard,
``anchor-on-synthetic`` is timed once more with the guard's test on every call and a ``max_error`` no
plan reaches (``GUARD_TESTED``): the test's cost in the forward (the decisions themselves would compare
plans made on synthetic inputs with the random model's attention and reject them all; on the synthetic
inputs, benchmarks/guard_cost.py reports the errors the shipped max_error judges). On CUDA, dense SDPA and
anchor-on-synthetic attention of one layer are timed alone (attention's share of the forward).

Timed runs do not collect statistics (that syncs the host on every plan); one more forward
with ``collect_stats=True`` gives the densities, calls and fallbacks. The JSON is rewritten
after each length, so a run cut short keeps what it finished.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys

import torch
import torch.nn.functional as F

import sparse_prefill
from hf_prefill import random_llama
from sparse_prefill import AttentionContext, Identifier, PatternSpec, Plan, Policy
from sparse_prefill.evaluation.report import environment
from sparse_prefill.evaluation.synthetic import structured_qkv
from sparse_prefill.evaluation.whole_model import prefill_ms
from sparse_prefill.hookspecs import hookimpl
from sparse_prefill.patterns.anchor import ANCHOR

PATTERN = "anchor-on-synthetic"
REAL_CALIBRATED = dict(strength=0.8, heavy_fraction=0.055)  # docs/benchmarks/calibration.md
TARGETS = {32768: 0.8, 65536: 0.55, 131072: 0.4}  # issue 16: at most this fraction of dense's time to first token
# --tiny: the test's Llama (2 layers, hidden 64, 4 query / 2 KV heads of dim 16) and anchor.yaml scaled to it:
# 16-row blocks and windows instead of 128, min_length 0, and theta 3.0 because at head dim 16 the synthetic
# logits span a few units, so 7.7 keeps nearly every key (density 0.97 at 512 tokens; 3.0 gives 0.25).
TINY_MODEL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  vocab_size=256)
TINY_ANCHOR = dict(theta=3.0, block=16, sink=16, local=16, dense_tail=16)
GUARD_TESTED = f"{PATTERN} + guard test"
METHOD = "Method " + __doc__.split("Method ", 1)[1].split("\n\n", 1)[0].replace("\n", " ")


class SyntheticIdentification:
    """Plugin providing the pattern ``anchor-on-synthetic``: anchor's identifier on held synthetic q and k.

    :meth:`hold` sets the tensors (q [1, Hq, N, D], k [1, Hkv, N, D]) that every identification
    reads until :meth:`release`; the pattern's parameters are anchor's.
    """

    def __init__(self) -> None:
        self.q: torch.Tensor | None = None
        self.k: torch.Tensor | None = None

    @hookimpl
    def sparse_prefill_patterns(self) -> list[PatternSpec]:
        return [PatternSpec(name=PATTERN, description="anchor's identifier on held synthetic q/k (benchmarks/ttft_8b.py)",
                            parameters=ANCHOR.parameters, make_identifier=self._identifier)]

    def _identifier(self, **params) -> Identifier:
        return _OnSynthetic(ANCHOR.build(**params), self)

    def hold(self, q: torch.Tensor, k: torch.Tensor) -> None:
        self.q, self.k = q, k

    def release(self) -> None:
        self.q = self.k = None

    def inputs_for(self, q: torch.Tensor, k: torch.Tensor, ctx: AttentionContext) -> tuple[torch.Tensor, torch.Tensor]:
        """The held q and k of this call's heads (``ctx.head_offset``: the dispatcher may split a layer's heads)."""
        if self.q is None or self.k is None:
            raise RuntimeError(f"{PATTERN}: no synthetic inputs held; call SYNTHETIC.hold(q, k) before the forward")
        start = ctx.head_offset
        kv_start = start // (self.q.shape[1] // self.k.shape[1])
        held_q, held_k = self.q[:, start:start + q.shape[1]], self.k[:, kv_start:kv_start + k.shape[1]]
        if (held_q.shape, held_k.shape, held_q.dtype, held_q.device) != (q.shape, k.shape, q.dtype, q.device):
            raise ValueError(
                f"{PATTERN}: the layer's q {tuple(q.shape)} and k {tuple(k.shape)} ({q.dtype}, {q.device}, heads from "
                f"{start}) do not match the held synthetic q {tuple(self.q.shape)} and k {tuple(self.k.shape)} "
                f"({self.q.dtype}, {self.q.device}); hold structured_qkv of the model's length, heads, head dim, "
                "dtype and device"
            )
        return held_q, held_k


class _OnSynthetic(Identifier):
    """Anchor's identifier, run on the held synthetic tensors instead of the layer's own q and k."""

    def __init__(self, anchor: Identifier, held: SyntheticIdentification) -> None:
        self.anchor, self.held = anchor, held

    def identify(self, q: torch.Tensor, k: torch.Tensor, ctx: AttentionContext) -> Plan:
        return self.anchor.identify(*self.held.inputs_for(q, k, ctx), ctx)


SYNTHETIC = SyntheticIdentification()


def register() -> None:
    """Register :data:`SYNTHETIC` once per process (a second registration of the name would be refused)."""
    if PATTERN not in {info.name for info in sparse_prefill.available_patterns()}:
        sparse_prefill.register_plugin(SYNTHETIC, name=PATTERN)
    if getattr(sparse_prefill.get_pattern(PATTERN).make_identifier, "__self__", None) is not SYNTHETIC:
        raise RuntimeError(f"pattern {PATTERN!r} is registered by another plugin; its held inputs are not SYNTHETIC's")


def anchor_policy(source: str, pattern: str, min_length: int | None = None, guard_tested: bool = False,
                  **params) -> Policy | None:
    """``source`` (a policy of one anchor default) with ``pattern`` in anchor's place; ``min_length`` and
    ``params`` replace the file's when given (the tiny path), everything else is kept but the guard: it would
    compare plans made on the synthetic inputs with this random model's own attention, and reject them all.
    ``guard_tested``: keep the guard's test (its ``rows``) with a max_error no plan reaches, to time it; None
    when the file has no guard."""
    base = sparse_prefill.load_policy(source)
    if base.default.pattern != "anchor" or base.overrides:
        raise ValueError(f"{base.source}: expected one anchor default and no overrides, got\n{base.describe()}")
    if guard_tested and base.guard is None:
        return None
    guard = {"guard": {"max_error": 1e9, "rows": base.guard.rows}} if guard_tested and base.guard else {}
    return sparse_prefill.load_policy({"min_length": base.min_length if min_length is None else min_length,
                                       "default": {**base.default.as_dict(), **params, "pattern": pattern}, **guard})


def measure(model, ids: torch.Tensor, policy: Policy | None, repeats: int) -> dict:
    """Time to first token (ms) unpatched (``policy`` None) or under ``policy``, with the patched forward's
    statistics from one more, untimed, forward."""
    if policy is None:
        return {"ms": prefill_ms(model, ids, repeats)}
    sparse_prefill.apply(model, policy)
    try:
        ms = prefill_ms(model, ids, repeats)
    finally:
        sparse_prefill.remove(model)
    handle = sparse_prefill.apply(model, policy, collect_stats=True)
    try:
        with torch.inference_mode():
            logits = model(ids, use_cache=False, logits_to_keep=1).logits
    finally:
        sparse_prefill.remove(model)
    stats = handle.stats
    return {"ms": ms, "mean_density": stats.mean_density(),
            "layer_densities": {str(layer): d for layer, d in stats.layer_densities().items()},
            "sparse_calls": stats.sparse_calls, "fallbacks": dict(stats.fallbacks),
            "logits_finite": bool(torch.isfinite(logits).all())}


def attention_ms(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, policy: Policy) -> dict:
    """One layer's attention alone on the synthetic tensors (CUDA): dense SDPA, and ``policy``'s identifier
    (identification + execution), median ms."""
    import triton.testing

    identifier = policy.identifier(policy.default)
    runs = {"dense": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
            PATTERN: lambda: sparse_prefill.sparse_attention(q, k, v, identifier)}
    return {name: float(triton.testing.do_bench(fn, warmup=1, rep=500, return_mode="median"))
            for name, fn in runs.items()}


def run_length(model, length: int, policies: dict[str, Policy], repeats: int, raw: bool) -> dict:
    """Every measurement at one length; the synthetic tensors live only while it runs."""
    config, device = model.config, model.device
    ids = torch.randint(0, config.vocab_size, (1, length), device=device,
                        generator=torch.Generator(device=device).manual_seed(length))
    q, k, v = structured_qkv(length, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                             dtype=model.dtype, device=device, **REAL_CALIBRATED)
    SYNTHETIC.hold(q, k)
    try:
        row = {"length": length, "target": TARGETS.get(length), "dense": measure(model, ids, None, repeats),
               PATTERN: measure(model, ids, policies[PATTERN], repeats)}
        if policies.get(GUARD_TESTED) is not None:
            row[GUARD_TESTED] = measure(model, ids, policies[GUARD_TESTED], repeats)
        if raw:
            row["anchor_yaml_raw_inputs"] = measure(model, ids, policies["anchor"], repeats)
        if device.type == "cuda":
            row["attention_per_layer_ms"] = per_layer = attention_ms(q, k, v, policies[PATTERN])
            saved = config.num_hidden_layers * (per_layer["dense"] - per_layer[PATTERN])
            row["attention_share_of_dense"] = config.num_hidden_layers * per_layer["dense"] / row["dense"]["ms"]
            row["ratio_if_only_attention_changed"] = 1 - saved / row["dense"]["ms"]
    finally:
        SYNTHETIC.release()
    for name in (PATTERN, GUARD_TESTED, "anchor_yaml_raw_inputs"):
        if name in row:
            row[name]["ratio_vs_dense"] = row[name]["ms"] / row["dense"]["ms"]
    if row["target"] is not None:
        row["target_met"] = row[PATTERN]["ratio_vs_dense"] <= row["target"]
    return row


def _number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(rows: list[dict]) -> str:
    lines = ["| N | dense ms | anchor-on-synthetic ms | ratio | target | met | density (layers min-max) | sparse calls "
             "| fallbacks | attention share of dense | with the guard's test: ms, ratio "
             "| anchor.yaml on raw inputs: ms, ratio, density |",
             "|" + "---|" * 12]
    for row in rows:
        s = row[PATTERN]
        layers = list(s["layer_densities"].values()) or [None]
        raw = row.get("anchor_yaml_raw_inputs")
        raw_text = ", ".join((_number(raw["ms"], 0), _number(raw["ratio_vs_dense"]), _number(raw["mean_density"]))) \
            if raw else "-"
        tested = row.get(GUARD_TESTED)
        tested_text = f"{_number(tested['ms'], 0)}, {_number(tested['ratio_vs_dense'])}" if tested else "-"
        met = {True: "yes", False: "NO"}.get(row.get("target_met"), "-")
        lines.append(f"| {row['length']} | {_number(row['dense']['ms'], 0)} | {_number(s['ms'], 0)} | "
                     f"{_number(s['ratio_vs_dense'])} | {_number(row['target'], 2)} | {met} | "
                     f"{_number(s['mean_density'])} ({_number(min(layers, key=_order))}-{_number(max(layers, key=_order))}) | "
                     f"{s['sparse_calls']} | {s['fallbacks'] or '-'} | {_number(row.get('attention_share_of_dense'))} | "
                     f"{tested_text} | {raw_text} |")
    return "\n".join(lines)


def _order(density: float | None) -> float:
    return -1.0 if density is None else density


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536, 131072])
    parser.add_argument("--raw-lengths", type=int, nargs="*", default=None,
                        help="lengths at which anchor.yaml also runs on the raw inputs (default: the first length)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 32; 2 with --tiny)")
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards per setting, after one warm-up")
    parser.add_argument("--policy", default="anchor.yaml", help="a policy of one anchor default (no overrides)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the test's tiny Llama and anchor scaled to it")
    parser.add_argument("--commit", help="the commit to record where the run has no git checkout")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    args.layers = args.layers or (2 if args.tiny else 32)
    args.raw_lengths = args.lengths[:1] if args.raw_lengths is None else args.raw_lengths
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    register()
    changes = (dict(min_length=0, **TINY_ANCHOR) if args.tiny else {})
    policies = {pattern: anchor_policy(args.policy, pattern, **changes) for pattern in (PATTERN, "anchor")}
    policies[GUARD_TESTED] = anchor_policy(args.policy, PATTERN, guard_tested=True, **changes)
    torch.manual_seed(0)
    model = random_llama(args.layers, device.type, **(TINY_MODEL if args.tiny else {}))
    result = {**environment(device), "model": "Llama-3.1-8B shape, random weights, bf16" + (" (tiny)" if args.tiny else ""),
              "config": {key: getattr(model.config, key) for key in ("num_hidden_layers", "hidden_size",
                         "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim")},
              "policy_source": args.policy, "policy": policies[PATTERN].describe(), "synthetic": dict(REAL_CALIBRATED, seed=0, shared_by_layers=True),
              "repeats": args.repeats, "method": METHOD, "lengths": []}
    result["commit"] = args.commit or result["commit"]
    for length in args.lengths:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        row = run_length(model, length, policies, args.repeats, raw=length in args.raw_lengths)
        gc.collect()
        if device.type == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.empty_cache()
        result["lengths"].append(row)
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
        print(f"N={length}: dense {row['dense']['ms']:.0f} ms, {PATTERN} {row[PATTERN]['ms']:.0f} ms "
              f"({row[PATTERN]['ratio_vs_dense']:.3f})", file=sys.stderr, flush=True)
    print(f"{result['device']}, {result['versions']}, commit {result['commit']}\n{result['policy']}\n")
    print(table(result["lengths"]))
    return result


if __name__ == "__main__":
    main()
