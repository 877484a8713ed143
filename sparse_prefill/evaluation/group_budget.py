"""A KL budget per (layer, KV group), each layer still one attention call.

:mod:`.layer_budget` gives a layer one setting. A layer's KV groups differ as much as its layers do: on
SmolLM2-135M at 4k the same greedy over (layer, KV group) units reached the same KL with 10-14% less
density (docs/benchmarks/whole_model.md, "Per KV group instead of per layer"). Here each KV group runs
each option alone (the rest of the model dense); its KL and density are the unit's costs.

A dense group beside sparse ones, or groups with different local windows, make a layer two attention
calls, which cost more time than their density saved on Qwen2.5-Coder-0.5B at 32k (8 split layers 0.84-0.86x
dense, one call per layer 0.82-0.84x at a little more density; same page). So a layer's groups are all
dense or all sparse in one *call mode*: the same pattern and the same values of its parameters that cannot
differ per head, so that the groups' choices, differing only in ``per_head`` parameters (anchor's theta),
run as one call.

Per layer and call mode the groups' options are combined: the cheapest combinations for each KL lie
on the Minkowski sum of the groups' lower convex hulls of (KL, density), which is walked by taking the
groups' hull steps in the order of the density they save per nat of KL. Each combination (summed KL,
head-weighted mean density) is one :class:`~.layer_budget.LayerOption`, and the per-layer knapsack,
its check on the whole model and the written policy are :mod:`.layer_budget`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from sparse_prefill.evaluation.dense_prefix import replaying
from sparse_prefill.evaluation.layer_budget import (
    DENSE,
    LayerOption,
    alone_policy,
    dense_prefix,
    lower_chain,
    saving_rate,
    worst_on_texts,
)
from sparse_prefill.evaluation.whole_model import kl_per_position, policy_logprobs
from sparse_prefill.policy import PatternChoice, Policy
from sparse_prefill.registry import get_pattern

__all__ = ["GroupKL", "kv_group_heads", "measure_group_kl", "measure_groups_on_texts", "layer_combinations"]


@dataclass(frozen=True)
class GroupKL:
    """One option on one KV group's query heads, measured with the rest of the model dense."""

    layer: int
    heads: range  # the group's global query heads
    label: str
    choice: PatternChoice
    kl: float  # mean KL(dense || this) per scored position, nats
    density: float  # the group's own attention density
    time: None = None  # never measured: a group measured alone is not the policy's call (as LayerOption.time)

    @property
    def cost(self) -> float:
        """What the knapsack spends: the density (groups are not timed apart)."""
        return self.density

    @property
    def key(self) -> tuple[int, int, str]:
        return self.layer, self.heads.start, self.label


def kv_group_heads(num_heads: int, num_kv_heads: int) -> list[range]:
    """The query heads of each KV group: consecutive runs of num_heads / num_kv_heads, as attention maps them."""
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads do not split into {num_kv_heads} KV groups")
    size = num_heads // num_kv_heads
    return [range(start, start + size) for start in range(0, num_heads, size)]


def measure_group_kl(model: Any, input_ids: torch.Tensor, base: Policy, options: Mapping[str, PatternChoice],
                     layers: Sequence[int], groups: Sequence[range], score_last: int, reference: torch.Tensor,
                     progress: Callable[[Iterable[Any]], Iterable[Any]] = iter) -> tuple[list[GroupKL], list[int]]:
    """(each option on each KV group of each layer with everything else dense, layers that made no sparse
    plan). ``groups`` partition one layer's query heads; the group's density is read from its layer's,
    the other heads counting 1.0 (they run dense)."""
    num_heads = sum(len(heads) for heads in groups)
    measured: list[GroupKL] = []
    planned: set[int] = set()
    units = [(layer, heads, label) for layer in layers for heads in groups for label in options]
    prefix = dense_prefix(model, input_ids, base, layers, score_last)
    for layer, heads, label in progress(units):
        others = tuple((other, None) for other in groups if other != heads)
        setting = ((heads, options[label]), *others)
        policy = alone_policy(base, layer, setting, f"layer {layer} heads {heads} {label}")
        with replaying(prefix, layer):
            logprobs, stats = policy_logprobs(model, input_ids, policy, score_last)
        density = stats.layer_densities().get(layer)
        if density is None:
            continue
        planned.add(layer)
        own = (density * num_heads - (num_heads - len(heads))) / len(heads)
        kl = float(kl_per_position(reference, logprobs).mean())
        measured.append(GroupKL(layer, heads, label, options[label], kl, min(max(own, 0.0), 1.0)))
    return measured, [layer for layer in layers if layer not in planned]


def measure_groups_on_texts(model: Any, input_ids: Sequence[torch.Tensor], base: Policy,
                            options: Mapping[str, PatternChoice], layers: Sequence[int], groups: Sequence[range],
                            score_last: int, progress: Callable[[Iterable[Any]], Iterable[Any]] = iter,
                            ) -> tuple[list[GroupKL], list[int], list[torch.Tensor]]:
    """(:func:`measure_group_kl` on each text, each unit costing its worst KL over them; the layers skipped;
    each text's dense log-probabilities at the scored positions)."""
    return worst_on_texts(model, input_ids, score_last, lambda ids, reference: measure_group_kl(
        model, ids, base, options, layers, groups, score_last, reference, progress))


def _call_mode(choice: PatternChoice) -> tuple[str, tuple[tuple[str, Any], ...]]:
    """What choices must share to run as one call: the pattern and its parameters that are not per head."""
    parameters = get_pattern(choice.pattern).parameters
    return choice.pattern, tuple((name, value) for name, value in choice.params if not parameters[name].per_head)


def _combination(layer: int, picks: Sequence[GroupKL]) -> LayerOption:
    heads = sum(len(o.heads) for o in picks)
    label = "; ".join(f"heads {o.heads.start}-{o.heads.stop - 1} {o.label}" for o in picks)
    density = sum(o.density * len(o.heads) for o in picks) / heads
    return LayerOption(layer, label, None, sum(max(o.kl, 0.0) for o in picks), density,
                       groups=tuple((o.heads, o.choice) for o in picks))


def layer_combinations(measured: Sequence[GroupKL]) -> list[LayerOption]:
    """Per layer: dense, then for each call mode every KV group measured in, the combinations on the
    Minkowski sum of the groups' lower hulls (one group's hull step at a time, the step saving the most
    density per nat first). At most 1 + sum of the hull steps per mode; the knapsack needs no others."""
    by_layer: dict[int, dict[int, list[GroupKL]]] = {}
    for option in measured:
        by_layer.setdefault(option.layer, {}).setdefault(option.heads.start, []).append(option)
    combined: list[LayerOption] = []
    for layer, per_group in by_layer.items():
        combined.append(LayerOption(layer, DENSE, None, 0.0, 1.0))
        modes = set.intersection(*({_call_mode(o.choice) for o in options} for options in per_group.values()))
        for mode in sorted(modes, key=repr):
            chains = [lower_chain([o for o in options if _call_mode(o.choice) == mode])
                      for _, options in sorted(per_group.items())]
            picks = [chain[0] for chain in chains]
            combined.append(_combination(layer, picks))
            steps = sorted(((saving_rate(chain[i], chain[i + 1]), g, i) for g, chain in enumerate(chains)
                            for i in range(len(chain) - 1)), key=lambda step: (-step[0], step[2], step[1]))
            for _, g, i in steps:
                picks[g] = chains[g][i + 1]
                combined.append(_combination(layer, picks))
    return combined
