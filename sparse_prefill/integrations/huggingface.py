"""Hugging Face transformers integration: a thin layer that translates, never decides sparsity.

:func:`apply` registers one attention function and one mask function per model under a fresh
name in transformers' ``AttentionInterface`` / ``AttentionMaskInterface`` and switches the
model to it. The mask function hands the attention function a :class:`DeferredMask`: the 2-D
padding mask (no S x S tensor is built for the sparse path) plus a recipe for the exact mask the
model's previous implementation would have built (a prefill into an empty static cache is such a
prefill: see :mod:`.masks`). Whenever a call is not a plain causal prefill
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
from typing import Any, Callable

import torch

from sparse_prefill.dispatch import sparse_attention
from sparse_prefill.guard import GuardMemory
from sparse_prefill.integrations.head_groups import kv_aligned_chunks
from sparse_prefill.integrations.masks import DeferredMask, PrefillMasksInForward, _make_mask_function
from sparse_prefill.integrations.prefill_stats import (
    _DECODE,
    _MIN_LENGTH,
    _POLICY_DENSE,
    _WINDOW,
    PrefillStats,
    _notice_level,
)
from sparse_prefill.integrations.tensor_parallel import (
    _model_head_offset,
    tp_head_offset,
)
from sparse_prefill.interfaces import AttentionContext, output_like
from sparse_prefill.plan import DensePlan, Plan
from sparse_prefill.policy import PatternChoice, Policy, PolicySource, load_policy
from sparse_prefill.registry import get_pattern

# The other jobs live beside this module: masks.py (the deferred mask), prefill_stats.py (what ran),
# tensor_parallel.py (which heads a rank holds), head_groups.py (GQA-aligned head calls). Their public
# names are re-exported here, where code written before the split imports them.
__all__ = ["SparsePrefillHandle", "DeferredMask", "PrefillStats", "apply", "remove", "tp_head_offset"]

_HANDLE_ATTR = "_sparse_prefill_handle"
_logger = logging.getLogger(__name__)  # a child of "sparse_prefill": one name silences the library

_names = itertools.count()
# Patched models per registered name: a deep copy of a patched model shares its original's name, so
# remove() on one must leave the name registered while the other still runs under it.
_name_users: collections.Counter[str] = collections.Counter()


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
    # The guard's remembered rejections (policy guard with remember > 0): one memory per patched model.
    guard_memory: GuardMemory | None = None
    time_calls: bool = False  # each call bracketed in ``stats.times`` (CUDA events on a GPU: no wait in the forward)
    _told: set[str] = field(default_factory=set, init=False, repr=False)  # reasons logged: each is told once

    def remove(self) -> None:
        remove(self.model)

    def summary(self) -> str:
        """What ran under this handle, in one paragraph: :meth:`PrefillStats.summary` headed by the policy."""
        return f"{self.policy.source}: {self.stats.summary()}"

    def _ran_dense(self, reason: str, fallback: bool, layer: int | None = None) -> None:
        """Count one call (``fallback``: it ran the previous implementation) or plan that ran dense, and log
        ``reason`` the first time this handle meets it: a notice per layer per call would bury the one that matters."""
        if fallback:
            self.stats.record_fallback(reason)
        else:
            self.stats.record_dense_plan(reason, layer)
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
                                     self.head_offset, self.stats, self.guard_memory, self.time_calls)
        _name_users[self.name] += 1
        return copied


def _transformers_interfaces() -> tuple[Any, Any]:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS, ALL_MASK_ATTENTION_FUNCTIONS


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


def _sparse_prefill(handle: SparsePrefillHandle, layer: int | None, q: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor, scale: float) -> torch.Tensor:
    """Sparse attention of one unpadded batch, head groups dispatched by the policy."""
    hq, hkv, offset = q.shape[1], k.shape[1], handle.head_offset
    assignments = handle.policy.call_groups(layer, hq, offset)
    if len(assignments) == 1:
        ctx = AttentionContext.for_inputs(q, k, scale, layer_idx=layer, head_offset=offset)
        identifier = handle.policy.identifier(assignments[0].choice)
        return sparse_attention(q, k, v, identifier, ctx, on_plan=_plan_observer(handle, assignments[0].choice),
                                guard=handle.policy.guard, guard_memory=handle.guard_memory)[0]
    out = output_like(q)
    for assignment in assignments:
        identifier = handle.policy.identifier(assignment.choice)
        on_plan = _plan_observer(handle, assignment.choice)
        for q_heads, kv_heads in kv_aligned_chunks(assignment.heads, hq // hkv):
            handle.stats.head_group_calls += 1
            q_sub, k_sub, v_sub = q[:, q_heads], k[:, kv_heads], v[:, kv_heads]
            ctx = AttentionContext.for_inputs(q_sub, k_sub, scale, layer_idx=layer, head_offset=offset + q_heads[0])
            out[:, q_heads] = sparse_attention(q_sub, k_sub, v_sub, identifier, ctx, on_plan=on_plan,
                                               guard=handle.policy.guard, guard_memory=handle.guard_memory)[0]
    return out


def _plan_observer(handle: SparsePrefillHandle, choice: PatternChoice) -> Callable[[Plan, AttentionContext], None]:
    """What sees each plan: a dense plan is told with its reason, the policy's own dense pattern included, so
    the summary names every layer that ran dense (a type check, no host sync); densities are recorded only
    when collecting statistics (each costs a host sync)."""
    def observe(plan: Plan, ctx: AttentionContext) -> None:
        if isinstance(plan, DensePlan):
            if choice.pattern == "dense":
                reason = _POLICY_DENSE
            else:
                limit = choice.as_dict().get("dense_above")
                reason = plan.reason or (f"made dense by the {choice.pattern} pattern" if limit is None
                                         else f"denser than the {choice.pattern} pattern's dense_above {limit}")
            handle._ran_dense(reason, fallback=False, layer=ctx.layer_idx)
        if handle.collect_stats:
            handle.stats.record(plan, ctx)

    return observe


def _dense_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Exact causal attention of one unpadded sequence shorter than the policy's min_length: the
    registered dense pattern, dispatched like any other plan."""
    return sparse_attention(q, k, v, get_pattern("dense").build(), AttentionContext.for_inputs(q, k, scale))[0]


def _prefill_keys(key: torch.Tensor, value: torch.Tensor, mask: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values a fresh prefill attends: a preallocated (static) cache's buffer holds more,
    which its causal mask never reaches (views, no copy)."""
    if isinstance(mask, DeferredMask) and key.shape[2] > mask.key_length:
        return key[:, :, : mask.key_length], value[:, :, : mask.key_length]
    return key, value


def _attention_function(handle: SparsePrefillHandle) -> Callable[..., Any]:
    def timed(module: Any, query: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        started = handle.stats.times.start(query)
        result = attention(module, query, *args, **kwargs)
        handle.stats.times.stop(getattr(module, "layer_idx", None), started)
        return result

    def attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        prefill_key, prefill_value = _prefill_keys(key, value, attention_mask)
        reason = _previous_reason(handle, module, query, prefill_key, prefill_value, attention_mask, kwargs)
        if reason is not None:  # the previous implementation gets what it was handed: a static cache's buffer
            mask = attention_mask.materialize() if isinstance(attention_mask, DeferredMask) else attention_mask
            handle._ran_dense(reason, fallback=True)
            return handle.previous_attention(module, query, key, value, mask, **kwargs)
        key, value = prefill_key, prefill_value
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

    return timed if handle.time_calls else attention


def apply(model: Any, policy: PolicySource, *, collect_stats: bool = False,
          time_calls: bool = False) -> SparsePrefillHandle:
    """Switch a Hugging Face causal LM to sparse prefill under ``policy`` (YAML path, dict or Policy).

    Decode, chunked prefill, cached prefixes and sliding-window layers keep the model's previous
    attention implementation. ``collect_stats`` records every plan's density (costs a host sync).
    Calls that run dense are counted whatever ``collect_stats`` and told once per reason on the
    ``sparse_prefill`` logger (see the module's docstring); ``handle.summary()`` says what ran.
    ``time_calls`` brackets every attention call, the model's own included (``handle.stats.layer_seconds()``
    after the forward; CUDA events on a GPU, so the forward never waits).
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
    guard = resolved.guard
    memory = GuardMemory(guard.remember) if guard is not None and guard.remember else None
    handle = SparsePrefillHandle(model, resolved, name, previous, _previous_attention(model, previous), collect_stats,
                                 head_offset, guard_memory=memory, time_calls=time_calls)
    attention_functions.register(name, _attention_function(handle))
    mask_functions.register(name, _make_mask_function(mask_functions[previous]))
    model.set_attn_implementation(name)
    PrefillMasksInForward.install(model)
    setattr(model, _HANDLE_ATTR, handle)
    _name_users[name] += 1
    return handle


def remove(model: Any) -> None:
    """Undo :func:`apply`: the model's previous attention implementation is restored."""
    handle: SparsePrefillHandle | None = getattr(model, _HANDLE_ATTR, None)
    if handle is None:
        raise RuntimeError("sparse prefill is not applied to this model")
    model.set_attn_implementation(handle.previous_implementation)
    PrefillMasksInForward.uninstall(model)
    delattr(model, _HANDLE_ATTR)
    _name_users[handle.name] -= 1
    if _name_users[handle.name] <= 0:  # no deep copy still runs under this name
        del _name_users[handle.name]
        attention_functions, mask_functions = _transformers_interfaces()
        for interface in (attention_functions, mask_functions):
            interface._global_mapping.pop(handle.name, None)
