"""Hugging Face transformers integration: a thin layer that translates, never decides sparsity.

:func:`apply` registers one attention function and one mask function per model under a fresh
name in transformers' ``AttentionInterface`` / ``AttentionMaskInterface`` and switches the
model to it. The mask function hands the attention function a :class:`DeferredMask`: the 2-D
padding mask (no S x S tensor is built for the sparse path) plus a recipe for the exact mask the
model's previous implementation would have built. Whenever a call is not a plain causal prefill
at or above the policy's ``min_length`` the sparse path does not honour (decode, chunked
prefill, cached prefixes, sliding or chunked windows shorter than the input, soft-capping,
attention sinks and any other keyword it does not know, a value head dim other than the query's,
dropout or gradients in training, ``output_attentions``), the previous implementation runs with
that exact mask, so those paths behave as if the model were unpatched.

What ran is told once per reason per :func:`apply` on the ``sparse_prefill`` logger: WARNING when
the sparse path cannot honour something the model or caller asked for (gradients, an attention
keyword, padding with holes, ...), INFO when the policy chose dense (below ``min_length``, a plan
denser than its pattern's ``dense_above``, a window shorter than the input), DEBUG for decode and
chunked prefill, dense by design. ``logging.getLogger("sparse_prefill").setLevel(logging.ERROR)``
silences it; :meth:`SparsePrefillHandle.summary` counts every call.

Under transformers' tensor parallelism each rank's attention sees only its slice of the heads;
:func:`apply` reads which slice from the model's TP plan and mesh so that per-head policies,
written in global head indices, land on the right heads.
"""

from __future__ import annotations

import collections
import copy
import functools
import itertools
import logging
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from sparse_prefill.dispatch import sparse_attention
from sparse_prefill.interfaces import AttentionContext
from sparse_prefill.plan import DensePlan, Plan
from sparse_prefill.policy import PatternChoice, Policy, PolicySource, load_policy
from sparse_prefill.registry import get_pattern

__all__ = ["SparsePrefillHandle", "DeferredMask", "apply", "remove", "tp_head_offset"]

_HANDLE_ATTR = "_sparse_prefill_handle"
_logger = logging.getLogger(__name__)  # a child of "sparse_prefill": one name silences the library

# Why a call ran dense, where the level of its notice depends on it (see _notice_level).
_DECODE = "decode, chunked prefill or cached prefix (query shorter than keys)"
_MIN_LENGTH = "shorter than the policy's min_length"
_WINDOW = "sliding window shorter than the input"
_names = itertools.count()
# Patched models per registered name: a deep copy of a patched model shares its original's name, so
# remove() on one must leave the name registered while the other still runs under it.
_name_users: collections.Counter[str] = collections.Counter()

# Query projections of transformers' attention classes, and the TP styles that keep every head
# on every rank (the projection's output is gathered). A "colwise" rule on an unfused projection
# splits the heads; on a fused one (qkv) the head layout is model-specific.
_QUERY_PROJECTIONS = ("q_proj", "q_b_proj", "qkv_proj", "query_key_value")
_UNFUSED_QUERY_PROJECTIONS = ("q_proj", "q_b_proj")
_GATHERED_STYLES = ("colwise_gather_output", "colwise_rep")


@dataclass
class DeferredMask:
    """What the attention function receives on a fresh prefill.

    ``padding`` is the [B, N] boolean mask of real tokens, or None when nothing is padded;
    ``materialize()`` builds (once) the mask the previous implementation expects. Both derived
    values are computed once per forward and shared by every layer.
    """

    padding: torch.Tensor | None
    build: Callable[[], Any]

    def materialize(self) -> Any:
        return self._mask

    def sequence_ranges(self) -> list[tuple[int, int]] | None:
        """[start, end) of each sequence's real tokens, or None if some sequence has holes.

        One host sync per forward (not per layer): the ranges decide how the batch is split.
        """
        return self._ranges

    @functools.cached_property
    def _mask(self) -> Any:
        return self.build()

    @functools.cached_property
    def _ranges(self) -> list[tuple[int, int]] | None:
        return _valid_ranges(self.padding)


def _valid_ranges(padding: torch.Tensor) -> list[tuple[int, int]] | None:
    """Per row of ``padding`` [B, N], [first real, last real + 1) if the real tokens are contiguous."""
    real = padding.int()
    first = real.argmax(dim=1)
    end = padding.shape[1] - real.flip(1).argmax(dim=1)
    contiguous = (real.sum(dim=1) == end - first) & padding.any(dim=1)
    if not bool(contiguous.all()):
        return None
    return list(zip(first.tolist(), end.tolist()))


@dataclass
class PrefillStats:
    """What the attention function did: calls on each path, why calls ran the previous
    implementation, and the plans' densities when collected.

    A layer call can make several plans (per-head policies, memory-bounded head chunks):
    ``densities`` has one entry per plan, ``plan_heads`` the query heads each covered and
    ``plan_layers`` its layer. ``fallbacks`` counts the calls that ran the previous implementation
    by reason (decode steps and cached prefixes included: that is where they belong).
    ``dense_plans`` counts, by reason, the dense attention inside sparse calls: plans an identifier
    of a sparse pattern made dense (denser than its ``dense_above``) and padded sequences shorter
    than ``min_length``; those calls count in ``sparse_calls`` too.
    """

    sparse_calls: int = 0
    dense_calls: int = 0
    densities: list[float] = field(default_factory=list)
    plan_heads: list[int] = field(default_factory=list)
    plan_layers: list[int | None] = field(default_factory=list)
    fallbacks: collections.Counter[str] = field(default_factory=collections.Counter)
    dense_plans: collections.Counter[str] = field(default_factory=collections.Counter)

    def mean_density(self) -> float | None:
        """Density over every query head of every sparse call (plans weighted by their heads)."""
        heads = sum(self.plan_heads)
        return sum(d * h for d, h in zip(self.densities, self.plan_heads)) / heads if heads else None

    def layer_densities(self) -> dict[int | None, float]:
        """Mean density per layer, plans weighted by their heads (layers that made no plan are absent)."""
        totals: dict[int | None, list[float]] = {}
        for density, heads, layer in zip(self.densities, self.plan_heads, self.plan_layers):
            weighted = totals.setdefault(layer, [0.0, 0.0])
            weighted[0] += density * heads
            weighted[1] += heads
        return {layer: total / heads for layer, (total, heads) in sorted(totals.items(), key=lambda kv: str(kv[0]))}

    def record(self, plan: Plan, ctx: AttentionContext) -> None:
        self.densities.append(plan.density())
        self.plan_heads.append(ctx.num_q_heads)
        self.plan_layers.append(ctx.layer_idx)

    def record_fallback(self, reason: str) -> None:
        self.dense_calls += 1
        self.fallbacks[reason] += 1

    def reset(self) -> None:
        self.sparse_calls, self.dense_calls = 0, 0
        self.densities, self.plan_heads, self.plan_layers = [], [], []
        self.fallbacks, self.dense_plans = collections.Counter(), collections.Counter()

    def summary(self) -> str:
        """One paragraph for people: calls per path, mean density, and why calls or plans ran dense."""
        if not self.sparse_calls and not self.dense_calls:
            return "no attention call ran yet."
        density = self.mean_density()
        density_text = ("density not collected (apply(..., collect_stats=True))" if density is None
                        else f"mean density {density:.3f}")
        parts = [f"{self.sparse_calls} attention call(s) ran sparse"
                 + (f", {density_text}" if self.sparse_calls else "")]
        if self.dense_plans:
            parts.append(f"dense attention within them: {_by_reason(self.dense_plans, 'plan(s)')}")
        if self.dense_calls:
            parts.append(f"{self.dense_calls} call(s) ran the model's own attention: "
                         f"{_by_reason(self.fallbacks, 'call(s)')}")
        return "; ".join(parts) + "."


def _by_reason(counts: collections.Counter[str], noun: str) -> str:
    """``counts`` as "7 call(s) decode ... (dense by design), 2 call(s) shorter than ...", most first
    (every reason reads after "N calls")."""
    return ", ".join(f"{count} {noun} {reason}" + (" (dense by design)" if reason == _DECODE else "")
                     for reason, count in counts.most_common())


def _notice_level(reason: str, fallback: bool) -> int:
    """DEBUG where dense is by design, INFO where the policy chose it (a dense plan always is: the pattern chose
    it), WARNING where the sparse path could not honour what the model or the caller asked for (the caller may
    want to change something)."""
    if reason == _DECODE:
        return logging.DEBUG
    if not fallback or reason.startswith((_MIN_LENGTH, _WINDOW)):
        return logging.INFO
    return logging.WARNING


@dataclass
class SparsePrefillHandle:
    """Returned by :func:`apply`; keeps what :func:`remove` needs to undo it."""

    model: Any
    policy: Policy
    name: str
    previous_implementation: str
    previous_attention: Callable[..., Any]
    collect_stats: bool = False
    head_offset: int = 0  # global index of this rank's first query head (tensor parallelism)
    stats: PrefillStats = field(default_factory=PrefillStats)
    _told: set[str] = field(default_factory=set, init=False, repr=False)  # reasons logged: each is told once

    def remove(self) -> None:
        remove(self.model)

    def summary(self) -> str:
        """What ran under this handle, in one paragraph: :meth:`PrefillStats.summary` headed by the policy."""
        return f"{self.policy.source}: {self.stats.summary()}"

    def _ran_dense(self, reason: str, fallback: bool) -> None:
        """Count one call (``fallback``: it ran the previous implementation) or plan that ran dense, and log
        ``reason`` the first time this handle meets it: a notice per layer per call would bury the one that matters."""
        if fallback:
            self.stats.record_fallback(reason)
        else:
            self.stats.dense_plans[reason] += 1
        if reason not in self._told:
            self._told.add(reason)
            where = "ran the model's own attention" if fallback else "ran dense attention"
            _logger.log(_notice_level(reason, fallback), "sparse prefill under %s: a call %s: %s (told once per reason; "
                        "handle.summary() counts them)", self.policy.source, where, reason)

    def __deepcopy__(self, memo: dict[int, Any]) -> "SparsePrefillHandle":
        """``copy.deepcopy`` of a patched model: the copy runs under the same registered attention
        function (its config names it), so it shares this handle's policy and statistics, and
        :func:`remove` on either model leaves the other patched."""
        copied = SparsePrefillHandle(copy.deepcopy(self.model, memo), self.policy, self.name,
                                     self.previous_implementation, self.previous_attention, self.collect_stats,
                                     self.head_offset, self.stats)
        _name_users[self.name] += 1
        return copied


def _transformers_interfaces() -> tuple[Any, Any]:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS, ALL_MASK_ATTENTION_FUNCTIONS


def tp_head_offset(tp_plan: Mapping[str, str], tp_size: int, tp_rank: int, num_heads: int, num_kv_heads: int) -> int:
    """Global index of the first query head that tensor-parallel rank ``tp_rank`` holds.

    A "colwise" rule shards a projection's output features into ``tp_size`` contiguous slices in
    rank order, so with whole heads per slice rank r holds query heads [r*H/tp, (r+1)*H/tp) and
    the KV heads they read. Any layout this cannot vouch for raises: per-head policies would
    otherwise silently run on the wrong heads.
    """
    if tp_size == 1:
        return 0
    rules = {(key.rsplit(".", 1)[-1], style) for key, style in tp_plan.items()
             if key.rsplit(".", 1)[-1] in _QUERY_PROJECTIONS}
    if rules and all(style in _GATHERED_STYLES for _, style in rules):
        return 0
    if not rules or any(name not in _UNFUSED_QUERY_PROJECTIONS or style != "colwise" for name, style in rules):
        raise ValueError(
            f"cannot tell which attention heads tensor-parallel rank {tp_rank} holds: the TP plan's query-projection "
            f"rules are {sorted(rules) or 'missing'}; sparse prefill supports 'colwise' on "
            f"{' or '.join(_UNFUSED_QUERY_PROJECTIONS)} (heads split across ranks) or {' / '.join(_GATHERED_STYLES)} "
            "(every rank keeps every head)"
        )
    if num_heads % tp_size or num_kv_heads % tp_size:
        raise ValueError(
            f"{num_heads} query heads and {num_kv_heads} KV heads do not split evenly over tp_size={tp_size}; "
            "sparse prefill needs whole heads and whole GQA groups on every rank"
        )
    return tp_rank * (num_heads // tp_size)


def _model_head_offset(model: Any) -> int:
    """:func:`tp_head_offset` of this process for a model loaded with transformers' TP (0 without it)."""
    tp_size = getattr(model, "tp_size", None) or 1
    if tp_size == 1:
        return 0
    mesh = getattr(model, "_device_mesh", None)
    if mesh is None:
        raise ValueError(f"model reports tp_size={tp_size} but has no device mesh to read this process's TP rank from")
    tp_rank = mesh.get_local_rank("tp") if mesh.ndim > 1 else mesh.get_local_rank()
    config = model.config.get_text_config()
    num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return tp_head_offset(model.tp_plan or {}, tp_size, tp_rank, config.num_attention_heads, num_kv_heads)


def _previous_attention(model: Any, implementation: str) -> Callable[..., Any]:
    """The attention function the model used before :func:`apply`."""
    attention_functions, _ = _transformers_interfaces()
    if implementation in attention_functions:
        return attention_functions[implementation]
    if implementation == "eager":
        return _eager_attention
    raise ValueError(
        f"cannot find the model's current attention implementation {implementation!r}; "
        "load the model with attn_implementation='sdpa' or 'eager' before calling apply()"
    )


def _eager_attention(module: Any, *args: Any, **kwargs: Any) -> Any:
    """"eager": each attention class's own module's ``eager_attention_forward``, since a model can
    hold several (a vision tower's and the language model's differ in GQA and shapes)."""
    return _eager_attention_of(type(module))(module, *args, **kwargs)


@functools.cache
def _eager_attention_of(cls: type) -> Callable[..., Any]:
    eager = getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None)
    if eager is None:
        raise ValueError(f"{cls.__name__} has no eager_attention_forward in {cls.__module__}; load the model with "
                         "attn_implementation='sdpa' before calling apply()")
    return eager


def _is_fresh_prefill(q_length: int, kv_length: int, q_offset: Any, kv_offset: Any, allow_is_causal_skip: bool) -> bool:
    """A plain causal prefill with no cached prefix (custom mask overlays and packing disable the skip)."""
    offsets_zero = isinstance(q_offset, int) and isinstance(kv_offset, int) and q_offset == 0 and kv_offset == 0
    return offsets_zero and q_length == kv_length and allow_is_causal_skip


def _make_mask_function(previous_mask: Callable[..., Any]) -> Callable[..., Any]:
    def mask_function(
        batch_size: int,
        q_length: int,
        kv_length: int,
        q_offset: Any = 0,
        kv_offset: Any = 0,
        attention_mask: torch.Tensor | None = None,
        allow_is_causal_skip: bool = True,
        **kwargs: Any,
    ) -> Any:
        arguments = dict(
            batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
            kv_offset=kv_offset, attention_mask=attention_mask, allow_is_causal_skip=allow_is_causal_skip, **kwargs,
        )
        build = functools.partial(previous_mask, **arguments)
        if not _is_fresh_prefill(q_length, kv_length, q_offset, kv_offset, allow_is_causal_skip):
            return build()
        # Sliding and chunked layers pass their window here only (Llama 4, PhiMoE, Qwen2-MoE
        # never hand it to attention); a window at least as long as the keys is plain causal.
        local_size = kwargs.get("local_size")
        if local_size is not None and kv_length > local_size:
            return build()
        padding = None
        if attention_mask is not None:
            padding = attention_mask[:, -kv_length:].bool()
            if bool(padding.all()):
                padding = None
        return DeferredMask(padding=padding, build=build)

    return mask_function


# Keywords the sparse path honours, or that do not change attention's result. Any other one with
# a value (attention sinks ``s_aux``, ``position_bias``, DSA ``indices``, varlen ``cu_seq_lens_q``,
# ...) sends the call to the previous implementation: a model feature this layer does not know
# never gives a silently different answer.
_HONOURED_KWARGS = frozenset({
    "scaling", "dropout", "sliding_window", "is_causal", "position_ids", "cache_position", "use_cache",
    "past_key_values", "past_key_value", "cache",
})


def _previous_reason(handle: SparsePrefillHandle, module: Any, query: torch.Tensor, key: torch.Tensor,
                     value: torch.Tensor, mask: Any, kwargs: dict[str, Any]) -> str | None:
    """Why this call must run the previous implementation, or None when the sparse path may take it."""
    if query.shape[2] != key.shape[2]:
        return _DECODE
    # Before the mask's test: a sliding layer's mask is the window's, and the window is the better reason.
    window = kwargs.get("sliding_window")
    if window is not None and key.shape[2] > window:  # a window at least as long as the keys is causal
        return _WINDOW
    if not isinstance(mask, DeferredMask):
        return "not a fresh causal prefill (cached prefix, custom mask, packing or a local window)"
    if value.shape[-1] != query.shape[-1]:  # MLA (DeepSeek): the executors take one head dim
        return "value head dim differs from query head dim (MLA)"
    if kwargs.get("is_causal") is False or not getattr(module, "is_causal", True):
        return "not causal"
    # softcap, output_attentions=True, attention sinks, ...: what the sparse path does not honour.
    unknown = sorted(name for name, given in kwargs.items()
                     if name not in _HONOURED_KWARGS and given is not None and given is not False)
    if unknown:
        return f"unsupported attention keyword(s) {', '.join(unknown)}"
    if kwargs.get("dropout", 0.0) and module.training:
        return "dropout in training"
    if torch.is_grad_enabled() and query.requires_grad:  # the sparse kernels have no backward
        return "gradients recorded (prefill under torch.inference_mode())"
    if query.shape[2] < handle.policy.min_length:
        return _min_length_reason(handle)
    return None


def _min_length_reason(handle: SparsePrefillHandle) -> str:
    return f"{_MIN_LENGTH} {handle.policy.min_length}"


def _kv_aligned_chunks(heads: tuple[int, ...], group: int) -> list[tuple[list[int], list[int]]]:
    """Split query heads into (query heads, kv heads) chunks that keep GQA groups whole.

    Each run of adjacent complete KV groups is one call, so a chunk's heads are consecutive and its
    ``head_offset`` is exact; a KV group only partly in ``heads`` runs head by head against its
    single KV head (a view, never a copy per query head).
    """
    head_set = set(heads)
    runs: list[tuple[list[int], list[int]]] = []
    partial: list[tuple[list[int], list[int]]] = []
    for kv in sorted({h // group for h in heads}):
        members = list(range(kv * group, (kv + 1) * group))
        if not head_set.issuperset(members):
            partial.extend(([h], [kv]) for h in members if h in head_set)
        elif runs and runs[-1][1][-1] == kv - 1:
            runs[-1][0].extend(members)
            runs[-1][1].append(kv)
        else:
            runs.append((members, [kv]))
    return runs + partial


def _sparse_prefill(handle: SparsePrefillHandle, layer: int | None, q: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor, scale: float) -> torch.Tensor:
    """Sparse attention of one unpadded batch, head groups dispatched by the policy."""
    hq, hkv, offset = q.shape[1], k.shape[1], handle.head_offset
    assignments = handle.policy.assign_heads(layer, hq, offset)
    if len(assignments) == 1:
        ctx = AttentionContext.for_inputs(q, k, scale, layer_idx=layer, head_offset=offset)
        identifier = handle.policy.identifier(assignments[0].choice)
        return sparse_attention(q, k, v, identifier, ctx, on_plan=_plan_observer(handle, assignments[0].choice))[0]
    out = torch.empty_like(q)
    for assignment in assignments:
        identifier = handle.policy.identifier(assignment.choice)
        on_plan = _plan_observer(handle, assignment.choice)
        for q_heads, kv_heads in _kv_aligned_chunks(assignment.heads, hq // hkv):
            q_sub, k_sub, v_sub = q[:, q_heads], k[:, kv_heads], v[:, kv_heads]
            ctx = AttentionContext.for_inputs(q_sub, k_sub, scale, layer_idx=layer, head_offset=offset + q_heads[0])
            out[:, q_heads] = sparse_attention(q_sub, k_sub, v_sub, identifier, ctx, on_plan=on_plan)[0]
    return out


def _plan_observer(handle: SparsePrefillHandle, choice: PatternChoice) -> Callable[[Plan, AttentionContext], None]:
    """What sees each plan: a sparse pattern's dense plan is told (a type check, no host sync); densities
    are recorded only when collecting statistics (each costs a host sync)."""
    def observe(plan: Plan, ctx: AttentionContext) -> None:
        if isinstance(plan, DensePlan) and choice.pattern != "dense":
            limit = choice.as_dict().get("dense_above")
            reason = (f"made dense by the {choice.pattern} pattern" if limit is None
                      else f"denser than the {choice.pattern} pattern's dense_above {limit}")
            handle._ran_dense(reason, fallback=False)
        if handle.collect_stats:
            handle.stats.record(plan, ctx)

    return observe


def _dense_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Exact causal attention of one unpadded sequence shorter than the policy's min_length: the
    registered dense pattern, dispatched like any other plan."""
    return sparse_attention(q, k, v, get_pattern("dense").build(), AttentionContext.for_inputs(q, k, scale))[0]


def _attention_function(handle: SparsePrefillHandle) -> Callable[..., Any]:
    def attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        reason = _previous_reason(handle, module, query, key, value, attention_mask, kwargs)
        if reason is not None:
            mask = attention_mask.materialize() if isinstance(attention_mask, DeferredMask) else attention_mask
            handle._ran_dense(reason, fallback=True)
            return handle.previous_attention(module, query, key, value, mask, **kwargs)
        scale = kwargs.get("scaling")
        scale = query.shape[-1] ** -0.5 if scale is None else float(scale)
        layer = getattr(module, "layer_idx", None)
        padding = attention_mask.padding
        if padding is None:
            out = _sparse_prefill(handle, layer, query, key, value, scale)
        else:
            ranges = attention_mask.sequence_ranges()
            if ranges is None:  # holes inside a sequence: only the exact mask is right
                handle._ran_dense("padding with holes inside a sequence", fallback=True)
                return handle.previous_attention(module, query, key, value, attention_mask.materialize(), **kwargs)
            out = torch.zeros_like(query)
            for b, (start, end) in enumerate(ranges):
                q_b, k_b, v_b = (x[b : b + 1, :, start:end] for x in (query, key, value))
                # min_length holds per sequence, so a row's output never depends on its batch.
                if end - start < handle.policy.min_length:
                    handle._ran_dense(_min_length_reason(handle), fallback=False)
                    out[b : b + 1, :, start:end] = _dense_causal(q_b, k_b, v_b, scale)
                else:
                    out[b : b + 1, :, start:end] = _sparse_prefill(handle, layer, q_b, k_b, v_b, scale)
        handle.stats.sparse_calls += 1
        return out.transpose(1, 2).contiguous(), None

    return attention


def apply(model: Any, policy: PolicySource, *, collect_stats: bool = False) -> SparsePrefillHandle:
    """Switch a Hugging Face causal LM to sparse prefill under ``policy`` (YAML path, dict or Policy).

    Decode, chunked prefill, cached prefixes and sliding-window layers keep the model's previous
    attention implementation. ``collect_stats`` records every plan's density (costs a host sync).
    Calls that run dense are counted whatever ``collect_stats`` and told once per reason on the
    ``sparse_prefill`` logger (see the module's docstring); ``handle.summary()`` says what ran.
    Under tensor parallelism, call it on every rank: each finds its own slice of the heads.
    """
    if getattr(model, _HANDLE_ATTR, None) is not None:
        raise RuntimeError("sparse prefill is already applied to this model; call sparse_prefill.remove(model) first")
    if not hasattr(model, "set_attn_implementation") or not model._can_set_attn_implementation():
        raise TypeError(
            f"{type(model).__name__} does not support attention backends (transformers' AttentionInterface); "
            "sparse prefill needs a model class that does"
        )
    resolved = load_policy(policy)
    config = model.config.get_text_config()
    resolved.check_model(config.num_hidden_layers, config.num_attention_heads)  # overrides name real layers/heads
    head_offset = _model_head_offset(model)
    attention_functions, mask_functions = _transformers_interfaces()
    previous = model.config._attn_implementation
    if previous not in mask_functions:
        raise ValueError(f"model uses attention implementation {previous!r}, which has no mask function to defer to")
    name = f"sparse_prefill_{next(_names)}"
    handle = SparsePrefillHandle(model, resolved, name, previous, _previous_attention(model, previous), collect_stats,
                                 head_offset)
    attention_functions.register(name, _attention_function(handle))
    mask_functions.register(name, _make_mask_function(mask_functions[previous]))
    model.set_attn_implementation(name)
    setattr(model, _HANDLE_ATTR, handle)
    _name_users[name] += 1
    return handle


def remove(model: Any) -> None:
    """Undo :func:`apply`: the model's previous attention implementation is restored."""
    handle: SparsePrefillHandle | None = getattr(model, _HANDLE_ATTR, None)
    if handle is None:
        raise RuntimeError("sparse prefill is not applied to this model")
    model.set_attn_implementation(handle.previous_implementation)
    delattr(model, _HANDLE_ATTR)
    _name_users[handle.name] -= 1
    if _name_users[handle.name] <= 0:  # no deep copy still runs under this name
        del _name_users[handle.name]
        attention_functions, mask_functions = _transformers_interfaces()
        for interface in (attention_functions, mask_functions):
            interface._global_mapping.pop(handle.name, None)
