"""Policies: which pattern, with which parameters, runs on each layer and head.

A policy is YAML (loaded with ``yaml.safe_load`` only) or a dict of the same shape::

    min_length: 8192          # shorter prefills stay dense (optional, default 0)
    default:                  # the pattern for every layer and head not overridden
      pattern: anchor
      theta: 5.0
    overrides:                # optional; later entries win over earlier ones
      - layers: [0, 1]        # an index, "a-b" (inclusive), or a list of them; omitted: all
        heads: "0-7"          # global query-head indices, same forms; omitted: all
        pattern: dense

Every key is checked: unknown keys, wrong types and out-of-range values raise
:class:`PolicyError` naming the file, the key path and what is allowed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any, Iterable, Mapping, Union

import yaml

from sparse_prefill.interfaces import Identifier, PatternSpec
from sparse_prefill.registry import get_pattern, get_registry

__all__ = ["Policy", "PolicyError", "PatternChoice", "HeadAssignment", "load_policy", "shipped_policies"]

PolicySource = Union[str, os.PathLike, Mapping[str, Any], "Policy"]

_TOP_KEYS = ("min_length", "default", "overrides")
_SELECTOR_KEYS = ("layers", "heads")


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


@dataclass(frozen=True)
class _Override:
    layers: frozenset[int] | None
    heads: frozenset[int] | None
    choice: PatternChoice


@dataclass
class Policy:
    """A validated policy. Build it with :func:`load_policy`."""

    default: PatternChoice
    overrides: tuple[_Override, ...] = ()
    min_length: int = 0
    source: str = "<dict>"
    _identifiers: dict[PatternChoice, Identifier] = field(default_factory=dict, repr=False, compare=False)
    _assignments: dict[tuple, list[HeadAssignment]] = field(default_factory=dict, repr=False, compare=False)

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

    def identifier(self, choice: PatternChoice) -> Identifier:
        """The identifier for a choice, built once and reused."""
        if choice not in self._identifiers:
            self._identifiers[choice] = get_pattern(choice.pattern).build(**choice.as_dict())
        return self._identifiers[choice]

    def describe(self) -> str:
        lines = [f"policy from {self.source}", f"  min_length: {self.min_length}", f"  default: {self.default}"]
        for o in self.overrides:
            layers = "all" if o.layers is None else _format_indices(o.layers)
            heads = "all" if o.heads is None else _format_indices(o.heads)
            lines.append(f"  layers {layers}, heads {heads}: {o.choice}")
        return "\n".join(lines)


def _format_indices(indices: Iterable[int]) -> str:
    return ",".join(str(i) for i in sorted(indices))


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
        overrides_raw = raw.get("overrides") or []
        if not isinstance(overrides_raw, list):
            raise self.fail("overrides", f"expected a list of overrides, got {type(overrides_raw).__name__}")
        overrides = tuple(self.override(item, f"overrides[{i}]") for i, item in enumerate(overrides_raw))
        return Policy(default=default, overrides=overrides, min_length=min_length, source=self.source)

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
        if name not in patterns:
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
        parameter = spec.parameters[key]
        expected = parameter.type if isinstance(parameter.type, tuple) else (parameter.type,)
        if float in expected and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if (isinstance(value, bool) and bool not in expected) or not isinstance(value, expected):
            names = " or ".join(t.__name__ for t in expected)
            raise self.fail(path, f"expected {names} ({parameter.help}), got {value!r}")
        if parameter.check is not None and (problem := parameter.check(value)):
            raise self.fail(path, f"{problem} (got {value!r})")
        return value

    def indices(self, raw: Any, path: str) -> frozenset[int]:
        items = raw if isinstance(raw, list) else [raw]
        if not items:
            raise self.fail(path, "empty list; omit the key to mean all")
        result: set[int] = set()
        for item in items:
            result.update(self.index_item(item, path))
        return frozenset(result)

    def index_item(self, item: Any, path: str) -> range:
        allowed = 'an integer >= 0, a range "a-b" (inclusive), or a list of them'
        if isinstance(item, int) and not isinstance(item, bool) and item >= 0:
            return range(item, item + 1)
        if isinstance(item, str):
            first, sep, last = item.partition("-")
            if sep and first.strip().isdigit() and last.strip().isdigit() and int(first) <= int(last):
                return range(int(first), int(last) + 1)
        raise self.fail(path, f"expected {allowed}, got {item!r}")


def shipped_policies() -> list[str]:
    """Names of the policies that ship with sparse-prefill (usable by bare name)."""
    return sorted(entry.name for entry in files("sparse_prefill").joinpath("policies").iterdir()
                  if entry.name.endswith(".yaml"))


def load_policy(source: PolicySource) -> Policy:
    """A validated :class:`Policy` from a YAML path, a shipped policy's name (``"anchor.yaml"``),
    a dict, or a Policy (returned as is). A file in the working directory wins over a shipped name."""
    if isinstance(source, Policy):
        return source
    if isinstance(source, Mapping):
        return _Validator("<dict>").policy(source)
    path = Path(source)
    if not path.is_file() and path.name == str(source) and path.name in shipped_policies():
        path = Path(str(files("sparse_prefill").joinpath("policies", path.name)))
    if not path.is_file():
        raise PolicyError(f"{path}: no such policy file (shipped policies: {', '.join(shipped_policies())})")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise PolicyError(f"{path}: not valid YAML: {exc}") from exc
    return _Validator(str(path)).policy(raw)
