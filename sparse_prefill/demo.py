"""The main job: one model, one long needle prompt, dense and sparse prefill side by side."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from sparse_prefill.evaluation import BASELINE_LABEL
from sparse_prefill.evaluation.needle import NeedlePrompt
from sparse_prefill.integrations.huggingface import apply, remove
from sparse_prefill.policy import Policy

__all__ = ["RunResult", "compare_dense_and_sparse", "format_side_by_side"]


@dataclass
class RunResult:
    label: str
    answer: str
    found: bool
    prefill_seconds: float
    density: float | None
    sparse_calls: int
    dense_calls: int
    summary: str = ""  # what ran under the policy (PrefillStats.summary); "" for the baseline


class _FirstTokenClock:
    """A logits processor that notes when the prefill's logits arrive (time to first token)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.start, self.first = device, 0.0, None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.first is None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.first = time.perf_counter() - self.start
        return scores


def _generate(model: Any, tokenizer: Any, prompt: NeedlePrompt, max_new_tokens: int) -> tuple[str, float]:
    from transformers import LogitsProcessorList

    device = next(model.parameters()).device
    clock = _FirstTokenClock(device)
    ids = prompt.input_ids.to(device)
    with torch.inference_mode():
        clock.start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, logits_processor=LogitsProcessorList([clock]),
                             pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip(), clock.first


def _warm_up(model: Any, tokenizer: Any, prompt: NeedlePrompt, policy: Policy | None = None) -> None:
    """One untimed prefill on a GPU, where the first call compiles (and tunes) the Triton kernels
    and warms cuBLAS: no part of a prefill's time. The CPU runs PyTorch code with nothing to
    compile, so nothing is done there. Not under the timed run's stats."""
    if next(model.parameters()).device.type != "cuda":
        return
    if policy is not None:
        apply(model, policy)
    try:
        _generate(model, tokenizer, prompt, 1)
    finally:
        if policy is not None:
            remove(model)


def compare_dense_and_sparse(model: Any, tokenizer: Any, prompt: NeedlePrompt, policies: dict[str, Policy],
                             max_new_tokens: int = 24) -> list[RunResult]:
    """Run the same prompt dense, then under each labelled policy; the model is restored after each.

    Takes a loaded model and a built prompt, so a caller can build (and check) the prompt with the
    tokenizer alone before spending a minute on the weights.
    """
    if BASELINE_LABEL in policies:
        raise ValueError(f"the label {BASELINE_LABEL!r} names the unpatched model's run; give the policy another")
    _warm_up(model, tokenizer, prompt)
    answer, seconds = _generate(model, tokenizer, prompt, max_new_tokens)
    results = [RunResult(BASELINE_LABEL, answer, prompt.found_in(answer), seconds, 1.0, 0, 0)]
    for label, policy in policies.items():
        _warm_up(model, tokenizer, prompt, policy)
        handle = apply(model, policy, collect_stats=True)
        try:
            answer, seconds = _generate(model, tokenizer, prompt, max_new_tokens)
        finally:
            remove(model)
        stats = handle.stats
        results.append(RunResult(label, answer, prompt.found_in(answer), seconds, stats.mean_density(),
                                 stats.sparse_calls, stats.dense_calls, stats.summary()))
    return results


def format_side_by_side(prompt: NeedlePrompt, results: list[RunResult]) -> str:
    """A table with one column per run; the first run is the unpatched baseline."""
    rows = [
        ("answer", [r.answer.replace("\n", " ")[:64] for r in results]),
        ("needle found", ["yes" if r.found else "no" for r in results]),
        ("prefill time (s)", [f"{r.prefill_seconds:.2f}" for r in results]),
        ("density", ["-" if r.density is None else f"{r.density:.3f}" for r in results]),
        ("attention calls sparse/previous", [f"{r.sparse_calls}/{r.dense_calls}" if i else "-"
                                             for i, r in enumerate(results)]),
    ]
    # Columns fit their widest cell or label, so long policy names never run into each other.
    width = max([len(cell) for _, cells in rows for cell in cells] + [len(r.label) for r in results]) + 2
    header = f"{'':34}" + "".join(f"{r.label:<{width}}" for r in results)
    lines = [f"prompt: {prompt.input_ids.shape[1]} tokens, needle {prompt.answer!r} at depth {prompt.depth}", header]
    lines += [f"{name:34}" + "".join(f"{cell:<{width}}" for cell in cells) for name, cells in rows]
    return "\n".join(lines)
