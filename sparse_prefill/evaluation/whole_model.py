"""Whole-model evaluation: what a policy changes in a model's answers, and what it saves in prefill time.

For each prompt length, the unpatched model runs first (the baseline, labelled ``dense``), then
every policy on the same tokens, the model restored after each:

- the next-token distributions at the last ``score_last`` positions of real text: perplexity, and
  the mean KL divergence KL(dense || policy) per position, the most sensitive model-level measure
  (perplexity can hide changes that cancel out);
- what ran: mean attention density per layer, and the calls that stayed on the model's own
  attention with the reason; with ``recall``, the softmax mass each layer's plans keep
  (:mod:`~sparse_prefill.evaluation.layer_recall`);
- time to first token of the whole model (one forward that keeps one position's logits), the
  median of ``repeats`` after a warm-up that compiles and tunes the kernels; a policy's ratio is
  against a dense median timed right after it (``dense_prefill_ms``), not the dense run's of the
  start: a GPU that slows as it warms up (on an H100, dense 184.6 ms first and 186.7-187.5 ms later in
  one process) would otherwise charge the policies for it;
- needle in a haystack: whether greedy decoding returns a number hidden at each depth;
- RULER tasks (:mod:`~sparse_prefill.evaluation.ruler`): the share of expected strings in greedy answers,
  every label on the same samples.

Everything runs on the device the model is on; on a CPU the sparse path is the PyTorch reference,
so the times there say nothing about a GPU.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import yaml

from sparse_prefill.evaluation import BASELINE_LABEL
from sparse_prefill.evaluation.ruler import RulerSample, build_samples
from sparse_prefill.evaluation.ruler import check_tasks as check_ruler_tasks
from sparse_prefill.guard import ErrorGuard, guard_setting_problem
from sparse_prefill.integrations.huggingface import PrefillStats, apply, remove
from sparse_prefill.policy import PatternChoice, Policy, PolicyError, load_policy
from sparse_prefill.registry import get_pattern

__all__ = [
    "EvalSettings",
    "Measurement",
    "evaluate",
    "greedy_answer",
    "kl_per_position",
    "next_token_logprobs",
    "attention_seconds",
    "parse_sweep",
    "perplexity_of",
    "policy_logprobs",
    "ruler_score",
    "sweep_policies",
]


@dataclass(frozen=True)
class EvalSettings:
    """What :func:`evaluate` measures. Needle depths empty: no needle; ``repeats`` 0: no timing; RULER tasks
    empty: no RULER (``ruler_samples`` samples of each task at each length otherwise)."""

    lengths: tuple[int, ...]
    score_last: int = 1024
    needle_depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    needle_new_tokens: int = 12
    repeats: int = 3
    recall: bool = False  # per-layer attention recall of each policy's plans (one dense capture per length)
    layer_kl: bool = False  # each layer's KL with the policy on it alone (one forward per layer that made a plan)
    ruler_tasks: tuple[str, ...] = ()
    ruler_samples: int = 5

    def __post_init__(self) -> None:
        if not self.lengths or any(n < 2 for n in self.lengths):
            raise ValueError(f"lengths must be one or more token counts >= 2, got {self.lengths}")
        if not 0 < self.score_last < min(self.lengths):
            raise ValueError(f"score_last must be in [1, {min(self.lengths) - 1}] (below the shortest length), "
                             f"got {self.score_last}")
        if any(not 0.0 <= d <= 1.0 for d in self.needle_depths):
            raise ValueError(f"needle depths must be in [0, 1], got {self.needle_depths}")
        if self.needle_new_tokens < 1 or self.repeats < 0:
            raise ValueError(f"needle_new_tokens must be >= 1 and repeats >= 0, got {self.needle_new_tokens} "
                             f"and {self.repeats}")
        check_ruler_tasks(self.ruler_tasks)
        if len(set(self.ruler_tasks)) < len(self.ruler_tasks):
            raise ValueError(f"RULER tasks given twice: {', '.join(self.ruler_tasks)}")
        if self.ruler_samples < 1:
            raise ValueError(f"ruler_samples must be >= 1, got {self.ruler_samples}")


@dataclass
class Measurement:
    """One label (``dense`` or a policy) at one length."""

    label: str
    pattern: str  # the default pattern, so a sweep's points form one curve
    params: dict[str, Any]
    length: int
    perplexity: float
    perplexity_change: float  # perplexity / dense perplexity - 1
    kl: float  # mean over scored positions of KL(dense || this), nats
    kl_max: float
    top1_agreement: float  # scored positions whose most likely next token is dense's
    density: float | None  # mean over every sparse plan (heads weighted); None: nothing ran sparse
    layer_density: dict[str, float] = field(default_factory=dict)
    layer_recall: dict[str, float] = field(default_factory=dict)  # EvalSettings.recall: mass each layer's plans keep
    recall: float | None = None  # mean of layer_recall
    layer_worst_head: dict[str, float] = field(default_factory=dict)  # EvalSettings.recall: each layer's lowest head
    worst_head: float | None = None  # lowest of layer_worst_head
    layer_kl: dict[str, float] = field(default_factory=dict)  # EvalSettings.layer_kl: KL, the policy on one layer
    sparse_calls: int = 0
    fallbacks: dict[str, int] = field(default_factory=dict)
    prefill_ms: float | None = None
    prefill_vs_dense: float | None = None  # prefill_ms / dense_prefill_ms
    dense_prefill_ms: float | None = None  # a policy's: dense, timed right after it (the ratio's denominator)
    # With timing: each layer's attention calls in one more forward (dense: the dense pattern, SDPA), ms, and
    # their sum: how much of prefill_ms is attention, and which layers cost what (:func:`attention_seconds`).
    layer_attention_ms: dict[str, float] = field(default_factory=dict)
    attention_ms: float | None = None
    needle: dict[str, bool] = field(default_factory=dict)
    summary: str = ""  # what ran in the quality run, for people (PrefillStats.summary); "" for dense
    guard: dict[str, Any] | None = None  # the policy's run-time guard (max_error, rows); None: none
    dense_plans: dict[str, int] = field(default_factory=dict)  # dense attention inside sparse calls, by reason
    ruler: dict[str, float] = field(default_factory=dict)  # task -> mean string_match_all over its samples


# ----------------------------------------------------------------------------------------------
# Metrics (each checked against brute force in tests/test_whole_model.py)

def next_token_logprobs(model: Any, input_ids: torch.Tensor, score_last: int) -> torch.Tensor:
    """log-softmax of the model's next-token logits at the last ``score_last`` predictions, float32
    [score_last, vocab]: row t predicts token ``input_ids[0, N - score_last + t]``."""
    n = input_ids.shape[1]
    if not 0 < score_last < n:
        raise ValueError(f"score_last must be in [1, {n - 1}] for {n} tokens, got {score_last}")
    ids = input_ids.to(_device_of(model))
    with torch.inference_mode():
        logits = model(ids, use_cache=False, logits_to_keep=score_last + 1).logits[0, -score_last - 1: -1]
    return torch.log_softmax(logits.float(), dim=-1)


def policy_logprobs(model: Any, input_ids: torch.Tensor, policy: Policy, score_last: int,
                    ) -> tuple[torch.Tensor, PrefillStats]:
    """(:func:`next_token_logprobs` with ``policy`` applied, what ran: densities per layer, fallbacks); the
    model is restored after."""
    handle = apply(model, policy, collect_stats=True)
    try:
        return next_token_logprobs(model, input_ids, score_last), handle.stats
    finally:
        remove(model)


def attention_seconds(model: Any, input_ids: torch.Tensor, policy: Policy, score_last: int,
                      ) -> dict[int | None, float]:
    """Seconds each layer's attention took in one forward under ``policy``, its calls timed as a user's run
    them: without statistics, whose densities would wait for the GPU inside the calls."""
    handle = apply(model, policy, time_calls=True)
    try:
        next_token_logprobs(model, input_ids, score_last)
        return handle.stats.layer_seconds()
    finally:
        remove(model)


def perplexity_of(logprobs: torch.Tensor, targets: torch.Tensor) -> float:
    """exp(mean negative log-likelihood of ``targets`` [T] under ``logprobs`` [T, vocab])."""
    picked = logprobs.gather(1, targets.to(logprobs.device).view(-1, 1)).squeeze(1)
    return math.exp(-float(picked.mean()))


def kl_per_position(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """KL(reference || other) per row of two log-probability tables [T, vocab], nats; 0 log 0 = 0.
    Rounding can make a sum of nearly equal rows slightly negative: KL is >= 0, so it is clamped."""
    p = reference.exp()
    terms = torch.where(p > 0, p * (reference - other), torch.zeros_like(p))
    return terms.sum(dim=-1).clamp_min(0.0)


# ----------------------------------------------------------------------------------------------
# Sweeps: a pattern's knob over several values, as policies

def parse_sweep(items: Iterable[str]) -> dict[tuple[str | None, str], list[Any]]:
    """``["theta=6,8", "flexprefill.gamma=0.8,0.9"]`` -> {(None, "theta"): [6, 8], ("flexprefill", "gamma"): [...]}.

    Values are read as YAML scalars (as in a policy file). A key without a pattern applies to every
    policy whose default pattern has that parameter.
    """
    sweep: dict[tuple[str | None, str], list[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        pattern, _, param = key.strip().rpartition(".")
        if not sep or not param or not values.strip():
            raise ValueError(f"--sweep {item!r}: expected PARAM=V1,V2,... or PATTERN.PARAM=V1,V2,...")
        parsed = [yaml.safe_load(value) for value in values.split(",")]
        sweep[(pattern or None, param)] = parsed
    return sweep


def sweep_policies(policies: Mapping[str, Policy], sweep: Mapping[tuple[str | None, str], list[Any]],
                   allow_guard: bool = True) -> dict[str, Policy]:
    """Each policy once per combination of the swept values of its default pattern's parameters
    (labelled ``label[theta=6]``); policies the sweep does not touch stay as they are.

    Only the default choice changes: per-layer or per-head overrides keep their own parameters.
    Every value is checked against the pattern's parameter, so a bad one fails before any model runs;
    a sweep key no policy can take is an error. Keys ``guard.max_error`` and ``guard.rows`` set the
    policy's run-time guard instead (every policy takes them; ``max_error`` ``none`` means no guard),
    so one eval compares a policy with and without it.
    """
    guard_keys = [key for key in sweep if key[0] == "guard"]
    if guard_keys and not allow_guard:
        raise PolicyError(f"{', '.join(f'guard.{name}' for _, name in guard_keys)}: the guard is not a "
                          "per-layer setting; calibration measures each layer without it")
    out: dict[str, Policy] = {}
    used: set[tuple[str | None, str]] = set(guard_keys)
    for label, policy in policies.items():
        pattern = policy.default.pattern
        spec = get_pattern(pattern)
        keys = [(p, name) for (p, name) in sweep if p in (None, pattern) and name in spec.parameters]
        if not keys and not guard_keys:
            out[label] = policy
            continue
        used.update(keys)
        for values in itertools.product(*(sweep[key] for key in keys + guard_keys)):
            params = policy.default.as_dict()
            for (_, name), value in zip(keys, values):
                try:
                    params[name] = spec.parameters[name].coerce(value)
                except ValueError as exc:
                    raise PolicyError(f"--sweep {pattern}.{name}={value!r}: {exc}") from None
            guard = _swept_guard(policy.guard, dict(zip((name for _, name in guard_keys), values[len(keys):])))
            tags = [f"{name}={params[name]}" for _, name in keys]
            tags += [f"guard.{name}={value}" for (_, name), value in zip(guard_keys, values[len(keys):])]
            tag = ",".join(tags)
            choice = PatternChoice(pattern, tuple(params.items()))
            out[f"{label}[{tag}]"] = dataclasses.replace(policy, default=choice, guard=guard,
                                                         source=f"{policy.source} [{tag}]")
    unused = [f"{p + '.' if p else ''}{name}" for (p, name) in sweep if (p, name) not in used]
    if unused:
        patterns = sorted({policy.default.pattern for policy in policies.values()})
        raise PolicyError(f"--sweep {', '.join(unused)}: no given policy's default pattern ({', '.join(patterns)}) "
                          "has that parameter; `sparse-prefill patterns` lists the patterns")
    return out


def _swept_guard(base: ErrorGuard | None, values: Mapping[str, Any]) -> ErrorGuard | None:
    """``base`` (or the default guard) with the swept ``max_error`` / ``rows``; ``max_error`` none: no guard."""
    if not values:
        return base
    if "max_error" in values and values["max_error"] in (None, "none", "off"):
        return None
    for key, value in values.items():
        problem = guard_setting_problem(key, value)
        if problem is not None:
            raise PolicyError(f"--sweep guard.{key}={value!r}: {problem}")
    return dataclasses.replace(base or ErrorGuard(), **values)


# ----------------------------------------------------------------------------------------------
# Running

def _device_of(model: Any) -> torch.device:
    return next(model.parameters()).device


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prefill_ms(model: Any, input_ids: torch.Tensor, repeats: int) -> float:
    """Median time (ms) of a whole-model prefill that keeps one position's logits, after one warm-up."""
    device = _device_of(model)
    ids = input_ids.to(device)
    times = []
    with torch.inference_mode():
        for i in range(repeats + 1):
            _synchronize(device)
            start = time.perf_counter()
            model(ids, use_cache=False, logits_to_keep=1)
            _synchronize(device)
            if i:  # the first call compiles and tunes kernels: not part of a prefill's time
                times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def greedy_answer(model: Any, tokenizer: Any, input_ids: torch.Tensor, new_tokens: int) -> str:
    """The text greedy decoding adds to ``input_ids`` [1, N], at most ``new_tokens`` tokens."""
    ids = input_ids.to(_device_of(model))
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def needle_found(model: Any, tokenizer: Any, length: int, depth: float, new_tokens: int) -> bool:
    """Whether greedy decoding answers the number hidden at ``depth`` of a ``length``-token prompt."""
    from sparse_prefill.evaluation.needle import build_needle_prompt

    prompt = build_needle_prompt(tokenizer, length, depth)
    return prompt.found_in(greedy_answer(model, tokenizer, prompt.input_ids, new_tokens))


def ruler_score(model: Any, tokenizer: Any, samples: Sequence[RulerSample]) -> float:
    """The mean over ``samples`` of RULER's string_match_all of the greedy answer."""
    scores = [sample.score(greedy_answer(model, tokenizer, sample.input_ids, sample.new_tokens)) for sample in samples]
    return sum(scores) / len(scores)


def _describe_policy(label: str, policy: Policy | None) -> tuple[str, dict[str, Any]]:
    if policy is None:
        return BASELINE_LABEL, {}
    return policy.default.pattern, policy.default.as_dict()


def evaluate(model: Any, tokenizer: Any, text_ids: Callable[[int], torch.Tensor], policies: Mapping[str, Policy],
             settings: EvalSettings, progress: Callable[[Iterable[Any]], Iterable[Any]] = lambda steps: steps,
             on_result: Callable[[list[Measurement]], None] | None = None) -> list[Measurement]:
    """Dense, then each labelled policy, at each length; the model is restored after every policy.

    ``on_result(results_so_far)`` runs after each measurement, so a long evaluation that is cut
    off (a time limit, an out-of-memory error) still leaves what it measured.

    ``text_ids(n)`` gives the [1, n] token ids of real text for the quality measures (for example
    :func:`~sparse_prefill.evaluation.models.essay_token_ids`). ``tokenizer`` builds the needle and RULER
    prompts (unused when ``settings.needle_depths`` and ``settings.ruler_tasks`` are empty); the RULER samples
    of a length are built once, so every label answers the same ones.
    """
    if BASELINE_LABEL in policies:
        raise ValueError(f"the label {BASELINE_LABEL!r} names the unpatched model; give the policy another")
    steps = [(n, label) for n in settings.lengths for label in (BASELINE_LABEL, *policies)]
    results: list[Measurement] = []
    dense: dict[int, tuple[torch.Tensor, Measurement]] = {}
    ids_by_length: dict[int, torch.Tensor] = {}
    qk: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # the dense model's q and k, one length at a time
    ruler_by_length: dict[int, dict[str, list[RulerSample]]] = {}
    for length, label in progress(steps):
        ids = ids_by_length.setdefault(length, text_ids(length))
        if length not in ruler_by_length:
            ruler_by_length[length] = {task: build_samples(tokenizer, task, length, settings.ruler_samples)
                                       for task in settings.ruler_tasks}
        policy = policies.get(label)
        results.append(_measure(model, tokenizer, ids, label, policy, settings, dense, ruler_by_length[length]))
        if settings.recall and policy is not None and results[-1].layer_density:
            if not qk or next(iter(qk.values()))[0].shape[2] != length:
                qk.clear()  # one length's capture held at a time
                qk.update(_capture_all_layers(model, ids))
            _add_recall(results[-1], qk, policy)
        if settings.layer_kl and policy is not None and results[-1].layer_density:
            _add_layer_kl(results[-1], model, ids, policy, settings.score_last, dense[length][0])
        if on_result is not None:
            on_result(results)
    return results


def _measure(model: Any, tokenizer: Any, ids: torch.Tensor, label: str, policy: Policy | None,
             settings: EvalSettings, dense: dict[int, tuple[torch.Tensor, Measurement]],
             ruler: Mapping[str, Sequence[RulerSample]]) -> Measurement:
    length = ids.shape[1]
    targets = ids[0, -settings.score_last:]

    def patched() -> None:
        if policy is not None:
            apply(model, policy)

    def restore() -> None:
        if policy is not None:
            remove(model)

    if policy is None:
        logprobs, stats = next_token_logprobs(model, ids, settings.score_last), PrefillStats()
    else:
        logprobs, stats = policy_logprobs(model, ids, policy, settings.score_last)
    pattern, params = _describe_policy(label, policy)
    ppl = perplexity_of(logprobs, targets)
    if policy is None:
        reference = logprobs
        base = None
    else:
        reference, base = dense[length]
    kl = kl_per_position(reference, logprobs)
    agreement = float((reference.argmax(-1) == logprobs.argmax(-1)).float().mean())
    measurement = Measurement(
        label=label, pattern=pattern, params=params, length=length, perplexity=ppl,
        perplexity_change=0.0 if base is None else ppl / base.perplexity - 1.0,
        kl=float(kl.mean()), kl_max=float(kl.max()), top1_agreement=agreement,
        density=1.0 if policy is None else stats.mean_density(),
        layer_density={str(layer): round(d, 5) for layer, d in stats.layer_densities().items()},
        sparse_calls=stats.sparse_calls, fallbacks=dict(stats.fallbacks),
        summary=stats.summary() if policy is not None else "",
        guard=None if policy is None or policy.guard is None else dataclasses.asdict(policy.guard),
        dense_plans=dict(stats.dense_plans),
    )
    if policy is None:
        dense[length] = (logprobs, measurement)
    del logprobs
    if settings.repeats:
        patched()
        try:
            measurement.prefill_ms = prefill_ms(model, ids, settings.repeats)
        finally:
            restore()
        if base is not None:
            measurement.dense_prefill_ms = prefill_ms(model, ids, settings.repeats)
            measurement.prefill_vs_dense = measurement.prefill_ms / measurement.dense_prefill_ms
        timed = attention_seconds(model, ids, policy or load_policy("dense.yaml"), settings.score_last)
        measurement.layer_attention_ms = {str(layer): round(s * 1e3, 4) for layer, s in timed.items()}
        measurement.attention_ms = round(sum(timed.values()) * 1e3, 4)
    for depth in settings.needle_depths:
        patched()
        try:
            measurement.needle[str(depth)] = needle_found(model, tokenizer, length, depth, settings.needle_new_tokens)
        finally:
            restore()
    for task, samples in ruler.items():
        patched()
        try:
            measurement.ruler[task] = ruler_score(model, tokenizer, samples)
        finally:
            restore()
    return measurement


def _capture_all_layers(model: Any, ids: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    from sparse_prefill.evaluation.recall import capture_qk

    return capture_qk(model, ids.to(_device_of(model)), range(model.config.get_text_config().num_hidden_layers))


def _add_layer_kl(measurement: Measurement, model: Any, ids: torch.Tensor, policy: Policy, score_last: int,
                  reference: torch.Tensor) -> None:
    """Each layer's share of the KL, for the layers that made plans in the measured run."""
    from sparse_prefill.evaluation.layer_share import layer_kl_shares

    layers = [int(layer) for layer in measurement.layer_density if layer.isdigit()]
    shares = layer_kl_shares(model, ids, policy, layers, score_last, reference)
    measurement.layer_kl = {str(layer): round(value, 6) for layer, value in shares.items()}


def _add_recall(measurement: Measurement, qk: Mapping[int, tuple[torch.Tensor, torch.Tensor]],
                policy: Policy) -> None:
    """Recall of the layers that made plans in the measured run (sliding-window layers, left to the model, did not)."""
    from sparse_prefill.evaluation.layer_recall import policy_layer_head_recalls

    layers = [int(layer) for layer in measurement.layer_density if layer.isdigit()]
    heads = policy_layer_head_recalls(qk, policy, layers)
    measurement.layer_recall = {str(layer): round(sum(r) / len(r), 5) for layer, r in heads.items()}
    measurement.layer_worst_head = {str(layer): round(min(r), 5) for layer, r in heads.items()}
    recall = [sum(r) / len(r) for r in heads.values()]
    measurement.recall = sum(recall) / len(recall) if recall else None
    measurement.worst_head = min(measurement.layer_worst_head.values()) if heads else None


def summary_table(results: Sequence[Measurement]) -> str:
    """A plain-text table, one row per label and length; labels in full (a sweep's labels differ at their end)."""
    width = max([34, *(len(m.label) for m in results)])
    header = (f"{'label':{width}} {'length':>7} {'density':>8} {'recall':>7} {'worst':>6} {'ppl':>9} "
              f"{'ppl vs dense':>12} {'KL':>8} {'top1':>6} {'prefill':>9} {'needle':>7} {'ruler':>6}")
    lines = [header]
    for m in results:
        density = "-" if m.density is None else f"{m.density:.3f}"
        prefill = "-" if m.prefill_vs_dense is None else f"{m.prefill_vs_dense:.2f}x"
        if m.label == BASELINE_LABEL and m.prefill_ms is not None:
            prefill = f"{m.prefill_ms:.0f}ms"
        needle = f"{sum(m.needle.values())}/{len(m.needle)}" if m.needle else "-"
        recall = "-" if m.recall is None else f"{m.recall:.3f}"
        worst = "-" if m.worst_head is None else f"{m.worst_head:.3f}"  # the lowest query head's recall
        ruler = f"{statistics.mean(m.ruler.values()):.2f}" if m.ruler else "-"  # mean over tasks
        lines.append(f"{m.label:{width}} {m.length:>7} {density:>8} {recall:>7} {worst:>6} {m.perplexity:>9.3f} "
                     f"{m.perplexity_change * 100:>+11.2f}% {m.kl:>8.4f} {m.top1_agreement:>6.3f} {prefill:>9} "
                     f"{needle:>7} {ruler:>6}")
    return "\n".join(lines)
