"""Anchor's theta (and local window) per (layer, KV group) for a mean recall target: spend density where it
buys recall.

One theta per layer (:mod:`sparse_prefill.evaluation.calibrate`) makes every layer reach the target
on its own, so a layer whose heads keep 0.99 at theta 5 and one that needs theta 9.5 for 0.95 are
both held to the same line. What a user pays for is the mean: the least mean density at which the
mean recall over every head reaches the target. Measured once per (layer, KV group) and setting (the
KV group is the unit of anchor's shared key lists), the choice is a multiple-choice knapsack;
here it is solved by a Lagrangian sweep (each group takes the setting maximising recall - lambda *
density) followed by a greedy pass that spends the slack left above the target, and the result is
never denser than the best single setting on the same measurements. ``min_head_recall`` keeps every
query head of a group at or above a floor (the worst head's recall), at some density.

Dense is always one of a group's options, and a group that takes it is written as ``pattern: dense``, never
as the theta whose selection happened to pass ``dense_above`` on the calibration text: on other text the
same theta can select less, run sparse, and lose what the calibration never measured (on
Qwen2.5-Coder-0.5B at 8k, layer 3 written that way cost KL 0.01 alone).
Measured on SmolLM2-135M: docs/benchmarks/recall.md.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from sparse_prefill.evaluation.calibrate import check_calibration_base, policy_file_text
from sparse_prefill.evaluation.recall import head_recalls
from sparse_prefill.patterns.anchor.reference import anchor_identify_reference
from sparse_prefill.policy import Policy, selector_items

__all__ = ["DEFAULT_THETAS", "GroupOption", "GroupChoice", "Allocation", "measure_group_options",
           "one_setting_per_layer", "allocate_settings", "allocate_one_call_per_layer", "group_calibrated_policy",
           "options_record", "options_from_record"]

DEFAULT_THETAS = (4.0, 5.0, 6.0, 7.0, 7.7, 8.5, 9.5, 11.0, 13.0, 16.0)
"""Thetas each KV group may take by default: the range from the sparsest useful to nearly dense."""


@dataclass(frozen=True)
class GroupOption:
    """What one KV group keeps at one setting (theta, local window): each of its query heads' recall and the
    group's density. ``dense``: the group runs the model's own attention (recall 1, density 1), either chosen
    as such or because this setting's selection passed ``dense_above``."""

    theta: float
    local: int
    head_recalls: tuple[float, ...]
    density: float
    dense: bool = False

    @property
    def recall(self) -> float:
        return sum(self.head_recalls) / len(self.head_recalls)

    @property
    def worst_head(self) -> float:
        return min(self.head_recalls)


@dataclass(frozen=True)
class GroupChoice:
    """The setting chosen for the query heads ``heads`` (global indices, one KV group) of ``layer``."""

    layer: int
    heads: range
    option: GroupOption


@dataclass(frozen=True)
class Allocation:
    """Every group's choice with the means it gives; ``reached``: the mean recall target (and floor) is met."""

    groups: list[GroupChoice]
    reached: bool

    @property
    def recall(self) -> float:
        return _mean([g.option.recall for g in self.groups])

    @property
    def density(self) -> float:
        return _mean([g.option.density for g in self.groups])

    @property
    def worst_head(self) -> float:
        return min(g.option.worst_head for g in self.groups)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def measure_group_options(qk: Mapping[int, tuple[torch.Tensor, torch.Tensor]], params: dict[str, Any],
                          thetas: Sequence[float], locals_: Sequence[int] | None = None,
                          progress: Callable[[Iterable[Any]], Iterable[Any]] = iter,
                          ) -> dict[tuple[int, int], list[GroupOption]]:
    """(layer, KV group) -> its :class:`GroupOption` per (local window, theta), on captured fp32 q [B, Hq, N, D]
    and k [B, Hkv, N, D] (``locals_`` None: ``params["local"]`` alone). Options are what a group's own call runs,
    so a selection denser than ``params["dense_above"]`` counts as the dense call that replaces it (recall 1,
    density 1, ``dense``). Every group also gets an explicit dense option (theta +inf) unless a setting ran
    dense already, so a floor no theta meets is met by staying dense."""
    settings = [(local, theta) for local in sorted(set(locals_ or [params["local"]])) for theta in sorted(set(thetas))]
    dense_above = params.get("dense_above", 1.0)
    options: dict[tuple[int, int], list[GroupOption]] = {}
    for layer in progress(sorted(qk)):
        q, k = qk[layer]
        scale = q.shape[-1] ** -0.5
        plans = [anchor_identify_reference(q, k, scale=scale,
                                           **{**params, "theta": theta, "local": local, "dense_above": 1.0})
                 for local, theta in settings]
        recalls = head_recalls(q, k, plans, scale)  # [settings, Hq]
        num_kv, per_kv = k.shape[1], q.shape[1] // k.shape[1]
        for group in range(num_kv):
            choices = []
            for i, ((local, theta), plan) in enumerate(zip(settings, plans)):
                density = _group_density(plan, group, num_kv)
                if density > dense_above:
                    choices.append(GroupOption(theta, local, (1.0,) * per_kv, 1.0, dense=True))
                else:
                    heads = recalls[i, group * per_kv:(group + 1) * per_kv]
                    choices.append(GroupOption(theta, local, tuple(float(r) for r in heads), density))
            if not any(option.dense for option in choices):
                choices.append(_stay_dense(params["local"], per_kv))
            options[(layer, group)] = choices
    return options


def _stay_dense(local: int, heads: int) -> GroupOption:
    """The explicit dense option (theta +inf): the model's own attention for ``heads`` query heads."""
    return GroupOption(math.inf, local, (1.0,) * heads, 1.0, dense=True)


def _group_density(plan: Any, group: int, num_kv: int) -> float:
    """Density of the plan heads KV group ``group`` reads (one, or its query heads' own lists)."""
    per_kv = plan.plan_heads // num_kv
    return plan.select_heads(group * per_kv, (group + 1) * per_kv).density()


def options_record(options: Mapping[tuple[int, int], Sequence[GroupOption]], about: Mapping[str, Any]) -> dict:
    """A JSON-ready record of every measured option, with ``about`` (what was measured and how), so other targets,
    floors and allocations can be chosen later without the model (``calibrate --from-record``)."""
    return {**about, "options": [{"layer": layer, "group": group, "theta": o.theta if math.isfinite(o.theta) else None,
                                  "local": o.local, "head_recalls": list(o.head_recalls), "density": o.density,
                                  "dense": o.dense}
                                 for (layer, group), choices in sorted(options.items()) for o in choices]}


def options_from_record(record: Mapping[str, Any]) -> dict[tuple[int, int], list[GroupOption]]:
    """The options :func:`options_record` wrote (theta null: the explicit dense option, +inf)."""
    options: dict[tuple[int, int], list[GroupOption]] = {}
    for row in record["options"]:
        theta = math.inf if row["theta"] is None else float(row["theta"])
        options.setdefault((int(row["layer"]), int(row["group"])), []).append(
            GroupOption(theta, int(row["local"]), tuple(float(r) for r in row["head_recalls"]), float(row["density"]),
                        bool(row["dense"])))
    return options


def one_setting_per_layer(options: Mapping[tuple[int, int], Sequence[GroupOption]]
                          ) -> dict[tuple[int, int], list[GroupOption]]:
    """Each layer's options when all its KV groups take the same setting, keyed (layer, 0): one attention call
    per layer, where groups with different settings run as a call each (on Qwen2.5-Coder-0.5B at 32k on the
    H200 the split made a calibrated policy at density 0.34 slower than dense, docs/benchmarks/whole_model.md).

    A setting joins the layer's options when every group ran it sparse (its heads' recalls side by side, the
    groups' mean density, which stays under ``dense_above`` as each did) or every group ran it dense. Where some
    groups passed ``dense_above`` and others did not, the setting is left out: one call judges ``dense_above``
    on its whole plan, so those groups could run sparse with a recall counted as 1. Dense is always an option."""
    layers: dict[int, list[Sequence[GroupOption]]] = {}
    for (layer, _group), choices in sorted(options.items()):
        layers.setdefault(layer, []).append(choices)
    merged: dict[tuple[int, int], list[GroupOption]] = {}
    for layer, groups in layers.items():
        settings = [(o.theta, o.local) for o in groups[0] if math.isfinite(o.theta)]
        choices = []
        for theta, local in settings:
            ran = [next((o for o in group if (o.theta, o.local) == (theta, local)), None) for group in groups]
            if any(o is None for o in ran):
                raise ValueError(f"layer {layer}: its KV groups were measured at different settings")
            if all(o.dense for o in ran):
                choices.append(GroupOption(theta, local, tuple(r for o in ran for r in o.head_recalls), 1.0, True))
            elif not any(o.dense for o in ran):
                choices.append(GroupOption(theta, local, tuple(r for o in ran for r in o.head_recalls),
                                           _mean([o.density for o in ran])))
        if not any(o.dense for o in choices):
            heads = sum(len(group[0].head_recalls) for group in groups)
            choices.append(_stay_dense(groups[0][0].local, heads))
        merged[(layer, 0)] = choices
    return merged


def allocate_settings(options: Mapping[tuple[int, int], Sequence[GroupOption]], group_size: int,
                      target_recall: float, min_head_recall: float = 0.0) -> Allocation:
    """The least mean density whose mean recall over every group reaches ``target_recall`` with every head
    at or above ``min_head_recall``. A group that cannot meet the floor takes its option with the best worst
    head; when the target cannot be met, every group takes its admissible option of most recall and
    ``reached`` is False."""
    if not 0 < target_recall <= 1 or not 0 <= min_head_recall <= 1:
        raise ValueError(f"target_recall must be in (0, 1] and min_head_recall in [0, 1], got {target_recall} "
                         f"and {min_head_recall}")
    if not options or any(not choices for choices in options.values()):
        raise ValueError("every group needs at least one measured option")
    keys = sorted(options)
    admissible = {key: [o for o in options[key] if o.worst_head >= min_head_recall]
                  or [max(options[key], key=lambda o: (o.worst_head, o.recall, -o.density))] for key in keys}
    floor_met = all(any(o.worst_head >= min_head_recall for o in options[key]) for key in keys)
    best = {key: max(admissible[key], key=lambda o: (o.recall, -o.density)) for key in keys}
    if _mean([best[key].recall for key in keys]) < target_recall:
        return _allocation(best, group_size, reached=False)
    chosen = _spend_slack(_lagrangian(admissible, keys, target_recall) or best, admissible, target_recall)
    uniform = _best_single_setting(admissible, keys, target_recall)
    if uniform is not None and _mean([uniform[k].density for k in keys]) < _mean([chosen[k].density for k in keys]):
        chosen = uniform
    return _allocation(chosen, group_size, reached=floor_met)


def allocate_one_call_per_layer(options: Mapping[tuple[int, int], Sequence[GroupOption]], group_size: int,
                                target_recall: float, min_head_recall: float = 0.0) -> Allocation:
    """:func:`allocate_settings` with each layer kept to one attention call: its KV groups all dense, or all
    sparse with one local window, each group at its own theta (one call takes a theta per head). A dense group
    beside sparse ones is what splits a layer into calls.

    Layer by layer, where the free allocation mixes, the layer is fixed to the mode (dense, or sparse at one
    window whose every group meets the floor) whose allocation of the rest is least dense, and the rest is
    allocated again: greedy, so it is also compared with :func:`one_setting_per_layer` (one setting for all of
    a layer's groups), and the less dense of the two that reach the target is returned."""
    modes: dict[tuple[int, int], Sequence[GroupOption]] = dict(options)
    allocation = allocate_settings(modes, group_size, target_recall, min_head_recall)
    while mixed := _mixed_layers(allocation):
        tries = [_restrict(modes, mixed[0], mode) for mode in _layer_modes(modes, mixed[0], min_head_recall)]
        modes, allocation = min(((tried, allocate_settings(tried, group_size, target_recall, min_head_recall))
                                 for tried in tries), key=lambda pair: _allocation_cost(pair[1], target_recall))
    per_layer = allocate_settings(one_setting_per_layer(options), group_size * _groups_per_layer(options),
                                  target_recall, min_head_recall)
    if _allocation_cost(per_layer, target_recall) < _allocation_cost(allocation, target_recall):
        return _split_layers(per_layer, group_size)
    return allocation


def _mode(option: GroupOption) -> int | None:
    """What a group's option asks of its layer's one call: None for dense, else its local window."""
    return None if option.dense else option.local


def _mixed_layers(allocation: Allocation) -> list[int]:
    modes: dict[int, set[int | None]] = {}
    for group in allocation.groups:
        modes.setdefault(group.layer, set()).add(_mode(group.option))
    return [layer for layer, seen in sorted(modes.items()) if len(seen) > 1]


def _layer_modes(options: Mapping[tuple[int, int], Sequence[GroupOption]], layer: int,
                 floor: float) -> list[int | None]:
    """Dense, and each local window at which every group of ``layer`` has a sparse option meeting ``floor``."""
    groups = [choices for (at, _group), choices in options.items() if at == layer]
    windows = set.intersection(*({o.local for o in choices if not o.dense and o.worst_head >= floor}
                                 for choices in groups))
    return [None, *sorted(windows)]


def _restrict(options: Mapping[tuple[int, int], Sequence[GroupOption]], layer: int,
              mode: int | None) -> dict[tuple[int, int], Sequence[GroupOption]]:
    restricted = dict(options)
    for key, choices in options.items():
        if key[0] == layer:
            restricted[key] = [o for o in choices if _mode(o) == mode]
    return restricted


def _allocation_cost(allocation: Allocation, target: float) -> tuple[bool, float, float]:
    """Order allocations: those reaching the target (and floor) first, then by density, then by recall."""
    return (not (allocation.reached and allocation.recall >= target), allocation.density, -allocation.recall)


def _groups_per_layer(options: Mapping[tuple[int, int], Sequence[GroupOption]]) -> int:
    return max(group for _layer, group in options) + 1


def _split_layers(allocation: Allocation, group_size: int) -> Allocation:
    """A per-layer allocation (:func:`one_setting_per_layer`'s keys) as one choice per KV group."""
    groups = []
    for choice in allocation.groups:
        option = choice.option
        for start in range(choice.heads.start, choice.heads.stop, group_size):
            heads = range(start, start + group_size)
            recalls = option.head_recalls[start - choice.heads.start:start - choice.heads.start + group_size]
            groups.append(GroupChoice(choice.layer, heads, dataclasses.replace(option, head_recalls=recalls)))
    return Allocation(groups, allocation.reached)


def _lagrangian(admissible: Mapping[tuple[int, int], list[GroupOption]], keys: list[tuple[int, int]],
                target: float) -> dict[tuple[int, int], GroupOption] | None:
    """The choices at the largest price of density (lambda) whose mean recall still reaches ``target``."""
    def pick(price: float) -> dict[tuple[int, int], GroupOption]:
        return {key: max(admissible[key], key=lambda o: (o.recall - price * o.density, -o.density)) for key in keys}

    low, high = 0.0, 1.0
    while _mean([o.recall for o in pick(high).values()]) >= target and high < 1e6:
        low, high = high, high * 2
    for _ in range(60):  # recall falls as the price rises: bisect to the last price that meets the target
        middle = (low + high) / 2
        if _mean([o.recall for o in pick(middle).values()]) >= target:
            low = middle
        else:
            high = middle
    choice = pick(low)
    return choice if _mean([o.recall for o in choice.values()]) >= target else None


def _spend_slack(chosen: dict[tuple[int, int], GroupOption], admissible: Mapping[tuple[int, int], list[GroupOption]],
                 target: float) -> dict[tuple[int, int], GroupOption]:
    """Greedily move groups to less dense options while the mean recall stays at or above ``target``."""
    chosen = dict(chosen)
    total_recall = sum(o.recall for o in chosen.values())
    needed = target * len(chosen)
    while True:
        moves = [(chosen[key].density - o.density, key, o) for key in chosen for o in admissible[key]
                 if o.density < chosen[key].density and total_recall - chosen[key].recall + o.recall >= needed]
        if not moves:
            return chosen
        _, key, option = max(moves, key=lambda move: move[0])
        total_recall += option.recall - chosen[key].recall
        chosen[key] = option


def _best_single_setting(admissible: Mapping[tuple[int, int], list[GroupOption]], keys: list[tuple[int, int]],
                         target: float) -> dict[tuple[int, int], GroupOption] | None:
    """The least dense choice giving every group the same (theta, local) that reaches ``target``, if any."""
    shared = set.intersection(*({(o.theta, o.local) for o in admissible[key]} for key in keys))
    best = None
    for setting in shared:
        choice = {key: next(o for o in admissible[key] if (o.theta, o.local) == setting) for key in keys}
        if _mean([o.recall for o in choice.values()]) >= target:
            if best is None or _mean([o.density for o in choice.values()]) < _mean([o.density for o in best.values()]):
                best = choice
    return best


def _allocation(chosen: Mapping[tuple[int, int], GroupOption], group_size: int, reached: bool) -> Allocation:
    groups = [GroupChoice(layer, range(group * group_size, (group + 1) * group_size), option)
              for (layer, group), option in sorted(chosen.items())]
    return Allocation(groups, reached)


def group_calibrated_policy(base: Policy, allocation: Allocation, header: str) -> str:
    """YAML of ``base`` (an anchor default) with each (layer, KV group)'s theta and local window as an override,
    or ``pattern: dense`` for a group whose choice ran dense; the KV groups of one layer that share a setting
    share an override. Layers not measured keep the largest theta and window chosen for a sparse group."""
    check_calibration_base(base)
    if not allocation.groups:
        raise ValueError("no calibrated groups")
    params = base.default.as_dict()
    sparse = [g.option for g in allocation.groups if not g.option.dense]
    default = {"pattern": "anchor", **params, "theta": max((o.theta for o in sparse), default=params["theta"]),
               "local": max((o.local for o in sparse), default=params["local"])}
    by_layer: dict[int, dict[tuple[float, int] | None, list[range]]] = {}
    for group in allocation.groups:
        setting = None if group.option.dense else (group.option.theta, group.option.local)
        by_layer.setdefault(group.layer, {}).setdefault(setting, []).append(group.heads)
    overrides = []
    for layer, settings in sorted(by_layer.items()):
        for setting, ranges in settings.items():
            override: dict[str, Any] = {"layers": layer}
            if len(settings) > 1:
                override["heads"] = selector_items(head for r in ranges for head in r)
            if setting is None:
                overrides.append({**override, "pattern": "dense"})
            else:
                overrides.append({**override, "pattern": "anchor", **params, "theta": setting[0], "local": setting[1]})
    summary = (f"  mean recall {allocation.recall:.4f}, mean density {allocation.density:.4f}, worst head "
               f"{allocation.worst_head:.3f}{'' if allocation.reached else ' (target not reached)'}")
    rows = [f"  layer {g.layer} heads {g.heads.start}-{g.heads.stop - 1}: {_setting_text(g.option)}, recall "
            f"{g.option.recall:.3f} (worst head {g.option.worst_head:.3f}), density {g.option.density:.3f}"
            for g in allocation.groups]
    return policy_file_text({"min_length": base.min_length, "default": default, "overrides": overrides},
                            [*header.splitlines(), summary, *rows])


def _setting_text(option: GroupOption) -> str:
    return "dense" if option.dense else f"theta {option.theta:g}, local {option.local}"
