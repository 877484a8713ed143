"""The two roles of sparse prefill, and what passes between them.

An :class:`Identifier` looks at queries and keys and decides which keys each query needs (a
:mod:`~sparse_prefill.plan`); an :class:`Executor` computes attention over exactly those keys.
Splitting the two lets any identifier run on any executor that understands its plan kind, and
lets a faster kernel replace a slower one without touching selection logic.
"""

from __future__ import annotations

import abc
import math
import reprlib
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Callable, ClassVar, Mapping

import torch
import yaml

from sparse_prefill.plan import Plan

__all__ = ["AttentionContext", "HeadValues", "Identifier", "Executor", "Parameter", "PatternSpec", "PlanBudgetExceeded",
           "write_into"]


@dataclass(frozen=True)
class AttentionContext:
    """Facts about one attention call that identifiers and executors may need.

    ``head_offset`` is the global index of the first query head in this call, so per-head
    policies stay right when heads are split (a head subset of one layer, or tensor parallelism).
    ``plan_budget`` (bytes, or None for no limit): an identifier whose plan size grows with the
    input should raise :class:`PlanBudgetExceeded` before allocating a plan larger than this.
    ``dense_fallback``: whether the identifier may answer a dense-enough selection with a
    :class:`~sparse_prefill.plan.DensePlan`. The chunks of a call whose whole plan was already
    found sparse get False, so splitting the heads never changes the answer.
    ``defer_sizing``: the caller resolves a :class:`~sparse_prefill.plan.PendingPlan` (the dispatcher
    sets it with a ``plan_budget``): an identifier may return one instead of a plan, so that its
    write pass and the executor are queued before the host reads the plan's size.
    """

    scale: float
    num_q_heads: int
    num_kv_heads: int
    seq_len: int
    layer_idx: int | None = None
    head_offset: int = 0
    plan_budget: int | None = None
    dense_fallback: bool = True
    defer_sizing: bool = False

    def __post_init__(self) -> None:
        if self.num_kv_heads <= 0 or self.num_q_heads % self.num_kv_heads:
            raise ValueError(
                f"query heads ({self.num_q_heads}) must be a positive multiple of KV heads ({self.num_kv_heads})"
            )
        for name in ("dense_fallback", "defer_sizing"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        budget = self.plan_budget
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 0):
            raise ValueError(
                f"plan_budget (sparse_attention's max_plan_bytes) must be None (no limit) or an int >= 0 (bytes), "
                f"got {budget!r}"
            )

    @property
    def gqa_group_size(self) -> int:
        """Query heads that read one KV head."""
        return self.num_q_heads // self.num_kv_heads

    @classmethod
    def for_inputs(cls, q: torch.Tensor, k: torch.Tensor, scale: float | None = None, **kwargs: Any) -> "AttentionContext":
        """Context for q [B, Hq, N, D] and k [B, Hkv, N, D]; ``scale`` defaults to 1/sqrt(D)."""
        return cls(
            scale=q.shape[-1] ** -0.5 if scale is None else float(scale),
            num_q_heads=q.shape[1],
            num_kv_heads=k.shape[1],
            seq_len=q.shape[2],
            **kwargs,
        )


class PlanBudgetExceeded(Exception):
    """An identifier's plan would pass ``ctx.plan_budget``; raised once its size is known, before allocating.

    ``kv_head_bytes[i]`` is what the plan takes for KV head ``i`` of the call (with its query
    heads), so the dispatcher can split the heads into calls that fit. ``query_head_bytes``, when
    given, is the same per query head, and promises that a call on some query heads of one KV
    group selects exactly what the whole call would for them (one key list per query head), so
    a KV group too large alone may be split too.
    """

    def __init__(self, kv_head_bytes: list[int], budget: int, query_head_bytes: list[int] | None = None) -> None:
        super().__init__(f"the plan needs {sum(kv_head_bytes)} bytes, the budget is {budget}")
        self.kv_head_bytes = kv_head_bytes
        self.query_head_bytes = query_head_bytes
        self.budget = budget

    @classmethod
    def for_plan_heads(cls, plan_head_bytes: list[int], num_kv_heads: int, budget: int,
                       per_query_head: bool) -> "PlanBudgetExceeded":
        """From the bytes of each plan head's lists (plan heads are KV heads, or query heads when
        ``per_query_head``, each list then independent of the other heads of its group)."""
        per_kv = len(plan_head_bytes) // num_kv_heads
        kv_head_bytes = [sum(plan_head_bytes[h * per_kv:(h + 1) * per_kv]) for h in range(num_kv_heads)]
        return cls(kv_head_bytes, budget, plan_head_bytes if per_query_head else None)


class Identifier(abc.ABC):
    """Decides which keys each query attends: ``identify(q, k, ctx) -> Plan``.

    q is [B, Hq, N, D] after RoPE, k is [B, Hkv, N, D] (never expanded for GQA). An identifier
    may return a :class:`~sparse_prefill.plan.DensePlan` when sparsity would not pay (short input).
    """

    @abc.abstractmethod
    def identify(self, q: torch.Tensor, k: torch.Tensor, ctx: AttentionContext) -> Plan:
        ...


class Executor(abc.ABC):
    """Computes causal attention over the keys a plan selects.

    Subclasses declare their capabilities as class attributes; :meth:`not_supported_reasons`
    derives refusals from them, and the dispatcher picks the highest-priority capable executor,
    or raises an error that lists every executor's reasons.
    """

    name: ClassVar[str]
    plan_kinds: ClassVar[tuple[type, ...]]
    devices: ClassVar[frozenset[str]]
    dtypes: ClassVar[frozenset[torch.dtype]] = frozenset({torch.float16, torch.bfloat16, torch.float32})
    head_dims: ClassVar[frozenset[int] | None] = None  # None: any head dim
    priority: ClassVar[int] = 0  # higher wins
    # Whether outputs keep autograd's graph. False (forward-only kernels): the dispatcher refuses
    # inputs that require grad under grad mode instead of returning a detached output.
    supports_backward: ClassVar[bool] = False
    # Whether __call__ takes ``verdict=`` (see PendingPlan) and its kernels write nothing when it is 0:
    # the dispatcher then launches a pending plan before reading its size.
    reads_verdict: ClassVar[bool] = False

    def not_supported_reasons(self, q: torch.Tensor, plan: Plan) -> list[str]:
        """Why this executor cannot run these inputs (empty list: it can)."""
        reasons = []
        if not isinstance(plan, self.plan_kinds):
            kinds = ", ".join(kind.__name__ for kind in self.plan_kinds)
            reasons.append(f"plan kind {type(plan).__name__} not in ({kinds})")
        if not self.device_supported(q.device):
            reasons.append(f"device {q.device.type} not in {sorted(self.devices)}")
        if q.dtype not in self.dtypes:
            reasons.append(f"dtype {q.dtype} not in {sorted(str(d) for d in self.dtypes)}")
        if self.head_dims is not None and q.shape[-1] not in self.head_dims:
            reasons.append(f"head dim {q.shape[-1]} not in {sorted(self.head_dims)}")
        return reasons

    def device_supported(self, device: torch.device) -> bool:
        return device.type in self.devices

    @abc.abstractmethod
    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        plan: Plan,
        ctx: AttentionContext,
        return_lse: bool = False,
        out: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return (output [B, Hq, N, D] in q's dtype, log-sum-exp [B, Hq, N] float32 or None).

        With ``out`` (q's shape and dtype, possibly a strided view of a larger tensor) the output
        is written there and ``out`` returned: the dispatcher runs heads in chunks into one
        result. An executor that cannot write in place returns :func:`write_into` of its result. One
        that allocates its own output should take :func:`output_like` (q's memory layout), so that a
        model's transpose of the output back to [B, N, H, D] stays a view.
        """


def output_like(q: torch.Tensor) -> torch.Tensor:
    """An uninitialised attention output for ``q`` ([B, H, N, D]) that every executor can write into: laid out in
    memory as q is when q is dense with the head dim innermost, else contiguous.

    Why: a Hugging Face model hands its attention q as a [B, N, H, D] projection viewed as [B, H, N, D] and
    transposes the output back, a free view when the output shares that layout and a copy of the whole output in
    every layer when it is contiguous in [B, H, N, D] (1.6 ms of a 0.5B model's 32k prefill on an H100).
    """
    if q.stride(-1) == 1:
        return torch.empty_like(q)  # preserve_format: q's strides when q is non-overlapping and dense
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


def write_into(result: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """``result`` copied into ``out`` when the caller gave one, else ``result`` itself."""
    if out is None:
        return result
    out.copy_(result)
    return out


@dataclass(frozen=True)
class HeadValues:
    """One parameter's value per global query head: ``values[i]`` is head ``first + i``'s, None for a head
    that runs another choice (see :meth:`sparse_prefill.policy.Policy.call_groups`).

    Indexed by global head, not by position in a call, because the dispatcher may run a call's heads
    in chunks (a plan budget, the guard, tensor parallelism): an identifier asks :meth:`for_heads`
    with its ``ctx.head_offset`` and its q's head count.
    """

    first: int
    values: tuple[Any, ...]

    def for_heads(self, head_offset: int, count: int) -> tuple[Any, ...]:
        """The values of global heads [head_offset, head_offset + count); raises if one is not covered."""
        start = head_offset - self.first
        chosen = self.values[max(start, 0):start + count]
        if start < 0 or len(chosen) < count or any(value is None for value in chosen):
            raise ValueError(f"{self} has no value for some of query heads {head_offset}-{head_offset + count - 1}")
        return chosen

    def __str__(self) -> str:
        runs: list[tuple[Any, int, int]] = []
        for head, value in enumerate(self.values, self.first):
            if value is None:
                continue
            if runs and runs[-1][0] == value and runs[-1][2] == head - 1:
                runs[-1] = (value, runs[-1][1], head)
            else:
                runs.append((value, head, head))
        return "[" + ", ".join(f"{v} (heads {a}-{b})" if b > a else f"{v} (head {a})" for v, a, b in runs) + "]"


@dataclass(frozen=True)
class Parameter:
    """One parameter of a pattern, as a policy may set it.

    ``check`` returns an error message for a bad value (None when fine); the policy loader
    prefixes it with the file and key path. A check may carry ``allowed``, what it lets through
    in words (">= 0"), which :meth:`allowed` and ``sparse-prefill patterns NAME`` show.

    ``per_head``: the identifier also takes :class:`HeadValues` here, a value per query head. Head
    groups of one layer whose choices differ only in such parameters then run as one call (one
    identification and one executor launch) instead of a call per group.
    """

    type: type | tuple[type, ...]
    default: Any
    help: str
    check: Callable[[Any], str | None] | None = None
    per_head: bool = False

    def allowed(self) -> str:
        """The values this parameter takes, in words, for listings: its type and its check's ``allowed``."""
        types = self.type if isinstance(self.type, tuple) else (self.type,)
        names = " or ".join(t.__name__ for t in types)
        if self.check is None:
            return "true or false" if types == (bool,) else f"any {names}"
        rule = getattr(self.check, "allowed", None)
        return f"{names}, {rule}" if rule else f"{names}, as {getattr(self.check, '__name__', 'its check')} accepts"

    def coerce(self, value: Any) -> Any:
        """``value`` as this parameter takes it (an int where a float is expected becomes one).

        Raises ValueError saying what is allowed; the policy loader and :meth:`PatternSpec.build`
        both go through here, so a value is never accepted by one and refused by the other.
        """
        if self.per_head and isinstance(value, HeadValues):
            return HeadValues(value.first, tuple(None if v is None else self.coerce(v) for v in value.values))
        expected = self.type if isinstance(self.type, tuple) else (self.type,)
        if float in expected and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if (isinstance(value, bool) and bool not in expected) or not isinstance(value, expected):
            names = " or ".join(t.__name__ for t in expected)
            hint = _number_string_hint(value, expected) if isinstance(value, str) else ""
            raise ValueError(f"expected {names} ({self.help}), got {value!r}{hint}")
        if self.check is not None and (problem := self.check(value)):
            raise ValueError(f"{problem} (got {value!r})")
        return value


def _number_string_hint(value: str, expected: tuple[type, ...]) -> str:
    """Why a number arrived as a str, and how to spell it so it does not.

    PyYAML reads YAML 1.1, where a float needs a decimal point and a signed exponent: ``1e6`` and
    ``1.0e6`` are strings, ``1.0e+6`` is a float. Strings are still refused (a typo'd number must
    not pass silently); the message gives a spelling that loads as the number meant. Only text
    that YAML itself reads as a string gets the hint: a quoted ``"7.5"`` is another mistake.
    """
    try:
        number = float(value)
        if not isinstance(yaml.safe_load(value), str):
            return ""
    except (ValueError, yaml.YAMLError):
        return ""
    if float in expected:
        form = "with a decimal point and a signed exponent, " if math.isfinite(number) else ""
        spelling = _yaml_float(number)
    elif int in expected and number.is_integer():
        form, spelling = "", str(int(number))
    else:
        return ""
    return (f"; YAML 1.1 (how policy files are read) takes {value} for a string, not a number: "
            f"write it {form}as {spelling}")


def _yaml_float(number: float) -> str:
    """``number`` spelt so that ``yaml.safe_load`` reads it back as this float, e.g. ``1.0e+6``."""
    if math.isnan(number):
        return ".nan"
    if math.isinf(number):
        return "-.inf" if number < 0 else ".inf"
    mantissa, _, exponent = format(Decimal(repr(number)).normalize(), "e").partition("e")
    return f"{mantissa if '.' in mantissa else mantissa + '.0'}e{exponent}"


@dataclass(frozen=True)
class PatternSpec:
    """A named sparsity pattern: its parameters and how to build its identifier from them."""

    name: str
    description: str
    parameters: Mapping[str, Parameter]
    make_identifier: Callable[..., Identifier]

    def build(self, **params: Any) -> Identifier:
        """An identifier with the given parameters, checked as a policy checks them, defaults filled in.

        Raises TypeError when ``make_identifier`` returns something other than an :class:`Identifier`:
        checked here, where the identifier is made anyway, not when the registry collects the spec
        (building one there would run plugin code, maybe heavy or device-bound, just to list patterns).
        """
        unknown = sorted(set(params) - set(self.parameters))
        if unknown:
            raise ValueError(f"pattern {self.name!r} has no parameter {', '.join(map(repr, unknown))}; "
                             f"allowed: {', '.join(self.parameters)}")
        values = {key: spec.default for key, spec in self.parameters.items()}
        for key, value in params.items():
            try:
                values[key] = self.parameters[key].coerce(value)
            except ValueError as exc:
                raise ValueError(f"pattern {self.name!r}, parameter {key!r}: {exc}") from None
        identifier = self.make_identifier(**values)
        if not isinstance(identifier, Identifier):
            raise TypeError(f"pattern {self.name!r}: make_identifier {self.make_identifier!r} returned "
                            f"{type(identifier).__name__} {reprlib.repr(identifier)}, expected an Identifier instance; "
                            f"fix the plugin providing pattern {self.name!r}")
        return identifier
