"""Policies: which pattern, with which parameters, runs on each layer and head.

A policy is UTF-8 YAML (loaded with ``yaml.safe_load`` only, after a check that no key repeats) or
a dict of the same shape::

    min_length: 8192          # shorter prefills stay dense (optional, default 0)
    default:                  # the pattern for every layer and head not overridden
      pattern: anchor
      theta: 5.0
    overrides:                # optional; later entries win over earlier ones
      - layers: [0, 1]        # an index, "a-b" (inclusive), or a list of them; omitted: all
        heads: "0-7"          # global query-head indices, same forms; omitted: all
        pattern: dense
    guard:                    # optional: a run-time test of every sparse call's output (sparse_prefill.guard)
      max_error: 0.5          # KV groups whose sampled rows' output errs more (90th percentile) run dense
      rows: 64                # query rows sampled per call
      remember: 0             # calls a rejected KV group then runs dense untested (0: test every call)

Every key is checked: unknown keys, wrong types and out-of-range values raise
:class:`PolicyError` naming the file, the key path and what is allowed. Layer and head indices
have no upper bound in the file (it does not know the model); :meth:`Policy.check_model` checks
them against one.
"""

from __future__ import annotations

import os
import re
import reprlib
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any, Iterable, Mapping, Union

import yaml

from sparse_prefill.guard import ErrorGuard, guard_setting_problem
from sparse_prefill.interfaces import HeadValues, Identifier, PatternSpec
from sparse_prefill.registry import get_pattern, get_registry

__all__ = ["Policy", "PolicyError", "PatternChoice", "HeadAssignment", "load_policy", "shipped_policies"]

PolicySource = Union[str, os.PathLike, Mapping[str, Any], "Policy"]

_TOP_KEYS = ("min_length", "default", "overrides", "guard")
_SELECTOR_KEYS = ("layers", "heads")
# ASCII digits only: str.isdigit() also accepts "²", which int() then rejects.
_RANGE = re.compile(r"\s*([0-9]+)\s*-\s*([0-9]+)\s*", re.ASCII)


class PolicyError(ValueError):
    """A policy is invalid; the message says where (file and key path) and what is allowed."""


@dataclass(frozen=True)
class PatternChoice:
    """A pattern name with its full, validated parameters (defaults filled in)."""

    pattern: str
    params: tuple[tuple[str, Any], ...]

    def as_dict(self) -> dict[str, Any]:
        return dict(self.params)

    def __str__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.params)
        return f"{self.pattern}({args})"


@dataclass(frozen=True)
class HeadAssignment:
    """Local query-head indices of one attention call that share one pattern choice."""

    heads: tuple[int, ...]
    choice: PatternChoice


def _merged(group: list[HeadAssignment], num_heads: int, head_offset: int) -> HeadAssignment:
    """One assignment for head groups of one pattern: parameters they share stay values, the others become
    :class:`HeadValues` over the call's heads (None where another group's choice runs)."""
    per_head: list[dict[str, Any] | None] = [None] * num_heads
    for assignment in group:
        for head in assignment.heads:
            per_head[head] = assignment.choice.as_dict()
    params = []
    for name, value in group[0].choice.params:
        if all(a.choice.as_dict()[name] == value for a in group):
            params.append((name, value))
        else:
            params.append((name, HeadValues(head_offset, tuple(None if p is None else p[name] for p in per_head))))
    heads = tuple(sorted(head for assignment in group for head in assignment.heads))
    return HeadAssignment(heads, PatternChoice(group[0].choice.pattern, tuple(params)))


def index_runs(indices: Iterable[int]) -> list[tuple[int, int]]:
    """Distinct indices as inclusive runs of consecutive values, in order: {0, 1, 2, 5} -> [(0, 2), (5, 5)];
    the "a-b" ranges a policy's layers and heads are written in."""
    runs: list[tuple[int, int]] = []
    for index in sorted(set(indices)):
        if runs and index == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], index)
        else:
            runs.append((index, index))
    return runs


def selector_items(indices: Iterable[int]) -> list[int | str]:
    """Indices as a policy file writes its layers and heads: runs as "a-b", single indices as ints:
    [0, 1, 2, 5] -> ["0-2", 5]."""
    return [f"{a}-{b}" if b > a else a for a, b in index_runs(indices)]


@dataclass(frozen=True)
class _Selector:
    """Layer or head indices as sorted, disjoint ranges, so that "0-20000000" stays two numbers."""

    ranges: tuple[range, ...]

    def __contains__(self, index: int) -> bool:
        return any(index in r for r in self.ranges)

    def __str__(self) -> str:
        return ",".join(str(r.start) if len(r) == 1 else f"{r.start}-{r[-1]}" for r in self.ranges)

    def first_at_or_above(self, bound: int) -> int | None:
        """The smallest selected index >= bound (one the model lacks when bound is its size), or None."""
        return next((max(r.start, bound) for r in self.ranges if r.stop > bound), None)


@dataclass(frozen=True)
class _Override:
    layers: _Selector | None
    heads: _Selector | None
    choice: PatternChoice


@dataclass
class Policy:
    """A validated policy. Build it with :func:`load_policy`."""

    default: PatternChoice
    overrides: tuple[_Override, ...] = ()
    min_length: int = 0
    source: str = "<dict>"
    guard: ErrorGuard | None = None
    # Caches, not state: init=False, so a dataclasses.replace() copy starts empty instead of sharing stale ones.
    _identifiers: dict[PatternChoice, Identifier] = field(init=False, default_factory=dict, repr=False,
                                                          compare=False)
    _assignments: dict[tuple, list[HeadAssignment]] = field(init=False, default_factory=dict, repr=False,
                                                            compare=False)
    _call_groups: dict[tuple, list[HeadAssignment]] = field(init=False, default_factory=dict, repr=False,
                                                            compare=False)

    def choice_for(self, layer: int | None, head: int) -> PatternChoice:
        """The pattern choice of one (layer, global query head)."""
        choice = self.default
        for override in self.overrides:
            layer_ok = override.layers is None or (layer is not None and layer in override.layers)
            head_ok = override.heads is None or head in override.heads
            if layer_ok and head_ok:
                choice = override.choice
        return choice

    def assign_heads(self, layer: int | None, num_heads: int, head_offset: int = 0) -> list[HeadAssignment]:
        """Group the local heads [0, num_heads) of one call by pattern choice (first-seen order).

        Computed once per (layer, num_heads, head_offset): attention calls it on every prefill.
        """
        key = (layer, num_heads, head_offset)
        if key not in self._assignments:
            groups: dict[PatternChoice, list[int]] = {}
            for local in range(num_heads):
                groups.setdefault(self.choice_for(layer, head_offset + local), []).append(local)
            self._assignments[key] = [HeadAssignment(tuple(heads), choice) for choice, heads in groups.items()]
        return self._assignments[key]

    def call_groups(self, layer: int | None, num_heads: int, head_offset: int = 0) -> list[HeadAssignment]:
        """The head groups of one call as attention runs them: :meth:`assign_heads`, with the groups of one
        pattern whose choices differ only in its ``per_head`` parameters merged into one group, whose choice
        holds those parameters as :class:`~sparse_prefill.interfaces.HeadValues`.

        A per-KV-group calibration then runs each layer as one call (one identification, one launch)
        instead of one per group. The selection is the same; ``dense_above``-like tests see the merged
        call's plan, as they see any single-setting layer's.
        """
        key = (layer, num_heads, head_offset)
        if key not in self._call_groups:
            alike: dict[tuple, list[HeadAssignment]] = {}
            for assignment in self.assign_heads(layer, num_heads, head_offset):
                spec = get_pattern(assignment.choice.pattern)
                fixed = tuple((name, value) for name, value in assignment.choice.params
                              if not spec.parameters[name].per_head)
                alike.setdefault((assignment.choice.pattern, fixed), []).append(assignment)
            self._call_groups[key] = [group[0] if len(group) == 1 else _merged(group, num_heads, head_offset)
                                      for group in alike.values()]
        return self._call_groups[key]

    def identifier(self, choice: PatternChoice) -> Identifier:
        """The identifier for a choice, built once and reused."""
        if choice not in self._identifiers:
            self._identifiers[choice] = get_pattern(choice.pattern).build(**choice.as_dict())
        return self._identifiers[choice]

    def check_model(self, num_layers: int, num_heads: int) -> None:
        """Raise PolicyError if an override selects a layer or query head the model lacks.

        Loading cannot know the model, and an index past its end would otherwise be silently unused.
        ``num_heads`` counts the query heads of one attention layer (all of them, not one TP rank's).
        """
        for i, override in enumerate(self.overrides):
            self._check_selector(override.layers, f"overrides[{i}].layers", "layer", num_layers)
            self._check_selector(override.heads, f"overrides[{i}].heads", "query head", num_heads)

    def _check_selector(self, selector: _Selector | None, path: str, noun: str, count: int) -> None:
        missing = None if selector is None else selector.first_at_or_above(count)
        if missing is not None:
            raise PolicyError(f"{self.source}: {path}: selects {noun} {missing}, but the model has {count} "
                              f"{noun}s; allowed: 0..{count - 1}")

    def describe(self) -> str:
        lines = [f"policy from {self.source}", f"  min_length: {self.min_length}", f"  default: {self.default}"]
        if self.guard is not None:
            lines.append(f"  guard: KV groups whose output on {self.guard.rows} sampled rows errs more than "
                         f"{self.guard.max_error} run dense" + (
                             f"; a rejected group then runs dense for {self.guard.remember} calls before a new test"
                             if self.guard.remember else ""))
        for o in self.overrides:
            layers = "all" if o.layers is None else o.layers
            heads = "all" if o.heads is None else o.heads
            lines.append(f"  layers {layers}, heads {heads}: {o.choice}")
        return "\n".join(lines)


def _reject_repeated_keys(node: yaml.Node | None) -> None:
    """Raise on a key given twice in one mapping (PyYAML would silently keep the last one).

    Works on the composed node graph, which builds no Python objects, so loading itself stays
    ``yaml.safe_load``.
    """
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            # `<<` merge keys may repeat (and local keys may override merged ones); non-scalar keys
            # are left to safe_load, which rejects what it cannot hash.
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"repeated key {key_node.value!r}; each key may appear once per mapping",
                        key_node.start_mark)
                seen.add(key_node.value)
            _reject_repeated_keys(value_node)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _reject_repeated_keys(item)


class _Validator:
    """Walks a raw policy mapping and raises PolicyError with file and key path."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, path: str, message: str) -> PolicyError:
        return PolicyError(f"{self.source}: {path}: {message}" if path else f"{self.source}: {message}")

    def mapping(self, value: Any, path: str) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.fail(path, f"expected a mapping, got {type(value).__name__} {value!r}")
        for key in value:
            if not isinstance(key, str):
                raise self.fail(path, f"keys must be strings, got {key!r}")
        return value

    def policy(self, raw: Any) -> Policy:
        raw = self.mapping(raw, "")
        unknown = sorted(set(raw) - set(_TOP_KEYS))
        if unknown:
            raise self.fail(unknown[0], f"unknown key; allowed: {', '.join(_TOP_KEYS)}")
        if "default" not in raw:
            raise self.fail("default", "missing; give at least `default: {pattern: <name>}`")
        min_length = raw.get("min_length", 0)
        if isinstance(min_length, bool) or not isinstance(min_length, int) or min_length < 0:
            raise self.fail("min_length", f"expected an integer >= 0, got {min_length!r}")
        default = self.choice(self.mapping(raw["default"], "default"), "default", allow_selectors=False)
        overrides_raw = raw.get("overrides")
        if overrides_raw is None:  # missing or null; `{}`, `false` and the like are mistakes, not "none"
            overrides_raw = []
        if not isinstance(overrides_raw, list):
            raise self.fail("overrides", f"expected a list of overrides (or null for none), got "
                                         f"{type(overrides_raw).__name__} {overrides_raw!r}")
        overrides = tuple(self.override(item, f"overrides[{i}]") for i, item in enumerate(overrides_raw))
        guard = None if raw.get("guard") is None else self.guard(raw["guard"])
        return Policy(default=default, overrides=overrides, min_length=min_length, source=self.source, guard=guard)

    def guard(self, raw: Any) -> ErrorGuard:
        raw = self.mapping(raw, "guard")
        for key, value in raw.items():
            problem = guard_setting_problem(key, value)
            if problem is not None:
                raise self.fail(f"guard.{key}", problem)
        return ErrorGuard(**raw)

    def override(self, raw: Any, path: str) -> _Override:
        raw = self.mapping(raw, path)
        return _Override(
            layers=self.indices(raw["layers"], f"{path}.layers") if "layers" in raw else None,
            heads=self.indices(raw["heads"], f"{path}.heads") if "heads" in raw else None,
            choice=self.choice(raw, path, allow_selectors=True),
        )

    def choice(self, raw: Mapping[str, Any], path: str, allow_selectors: bool) -> PatternChoice:
        patterns = get_registry().patterns()
        name = raw.get("pattern")
        if name is None:
            raise self.fail(f"{path}.pattern", f"missing; available patterns: {', '.join(sorted(patterns))}")
        if not isinstance(name, str) or name not in patterns:
            raise self.fail(f"{path}.pattern", f"unknown pattern {name!r}; available: {', '.join(sorted(patterns))}")
        spec: PatternSpec = patterns[name][0]
        allowed = ("pattern", *(_SELECTOR_KEYS if allow_selectors else ()), *spec.parameters)
        params = {key: parameter.default for key, parameter in spec.parameters.items()}
        for key, value in raw.items():
            if key not in allowed:
                raise self.fail(f"{path}.{key}", f"unknown key for pattern {name!r}; allowed: {', '.join(allowed)}")
            if key in spec.parameters:
                params[key] = self.parameter(spec, key, value, f"{path}.{key}")
        return PatternChoice(name, tuple(sorted(params.items())))

    def parameter(self, spec: PatternSpec, key: str, value: Any, path: str) -> Any:
        try:
            return spec.parameters[key].coerce(value)
        except ValueError as exc:
            raise self.fail(path, str(exc)) from None

    def indices(self, raw: Any, path: str) -> _Selector:
        items = raw if isinstance(raw, list) else [raw]
        if not items:
            raise self.fail(path, "empty list; omit the key to mean all")
        merged: list[range] = []
        for item in sorted((self.index_item(item, path) for item in items), key=lambda r: r.start):
            if merged and item.start <= merged[-1].stop:
                merged[-1] = range(merged[-1].start, max(merged[-1].stop, item.stop))
            else:
                merged.append(item)
        return _Selector(tuple(merged))

    def index_item(self, item: Any, path: str) -> range:
        allowed = 'an integer >= 0, a range "a-b" (inclusive), or a list of them'
        if isinstance(item, int) and not isinstance(item, bool) and item >= 0:
            return range(item, item + 1)
        match = _RANGE.fullmatch(item) if isinstance(item, str) else None
        if match and int(match[1]) <= int(match[2]):
            return range(int(match[1]), int(match[2]) + 1)
        raise self.fail(path, f"expected {allowed}, got {item!r}")


def shipped_policies() -> list[str]:
    """Names of the policies that ship with sparse-prefill (usable by bare name)."""
    return sorted(entry.name for entry in files("sparse_prefill").joinpath("policies").iterdir()
                  if entry.name.endswith(".yaml"))


def load_policy(source: PolicySource) -> Policy:
    """A validated :class:`Policy` from a YAML path, a shipped policy's name (``"anchor.yaml"``),
    a dict, or a Policy (returned as is). A file in the working directory wins over a shipped name.
    Anything else is a PolicyError (not pathlib's TypeError) saying what is accepted."""
    if isinstance(source, Policy):
        return source
    if isinstance(source, Mapping):
        return _Validator("<dict>").policy(source)
    if not isinstance(source, (str, os.PathLike)):
        raise PolicyError(
            f"cannot load a policy from {type(source).__name__} {reprlib.repr(source)}; give a YAML path (str or "
            f"os.PathLike), the name of a shipped policy ({', '.join(shipped_policies())}), a mapping of the "
            f"policy's shape ({{'default': {{'pattern': ...}}, ...}}), or a Policy"
        )
    path = Path(source)
    if not path.is_file() and path.name == str(source) and path.name in shipped_policies():
        path = Path(str(files("sparse_prefill").joinpath("policies", path.name)))
    if not path.is_file():
        raise PolicyError(f"{path}: no such policy file (shipped policies: {', '.join(shipped_policies())})")
    return _Validator(str(path)).policy(_read_yaml(path))


def _read_yaml(path: Path) -> Any:
    """The file's YAML; any failure to read or parse it is a PolicyError that names the file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        text = data.decode("utf-8")  # whole file at once, so the error's offset is the file's
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise PolicyError(f"{path}: line {line}: not UTF-8 text ({exc.reason}); save it as UTF-8") from exc
    try:
        _reject_repeated_keys(yaml.compose(text, Loader=yaml.SafeLoader))
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PolicyError(f"{path}: not valid YAML: {exc}") from exc
