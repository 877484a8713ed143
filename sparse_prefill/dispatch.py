"""Runs an identifier's plan on the best executor that can take it."""

from __future__ import annotations

import dataclasses
import itertools
import logging
from typing import Callable, Iterator

import torch

from sparse_prefill.guard import ErrorGuard, GuardMemory
from sparse_prefill.interfaces import AttentionContext, Executor, Identifier, PlanBudgetExceeded, output_like
from sparse_prefill.plan import DensePlan, PendingPlan, Plan
from sparse_prefill.registry import get_registry
from sparse_prefill.validation import validate_attention_inputs

__all__ = ["NoCapableExecutorError", "default_plan_budget", "select_executor", "sparse_attention"]

_logger = logging.getLogger(__name__)  # a child of "sparse_prefill": one name silences the library


class NoCapableExecutorError(RuntimeError):
    """No registered executor supports the inputs; the message lists every executor's reasons."""


def select_executor(q: torch.Tensor, plan: Plan, executors: list[Executor] | None = None) -> Executor:
    """The highest-priority executor that supports (q, plan)."""
    candidates = get_registry().executors() if executors is None else executors
    refusals = []
    for executor in candidates:
        reasons = executor.not_supported_reasons(q, plan)
        if not reasons:
            return executor
        refusals.append(f"  {executor.name}: {'; '.join(reasons)}")
    raise NoCapableExecutorError(
        f"no executor supports {type(plan).__name__} with q of shape {tuple(q.shape)}, dtype {q.dtype} "
        f"on {q.device.type}:\n" + ("\n".join(refusals) or "  (no executors registered)")
    )


# The plans alive at once may take this fraction of q, k and v's bytes (see sparse_attention): 0.2
# leaves the identifier's own buffers room under a quarter (H200, diffuse 128k: plan 25.0% + 0.5% at 0.25).
PLAN_BUDGET_FRACTION = 0.2


def default_plan_budget(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    """Bytes the plans of one call may hold at once: PLAN_BUDGET_FRACTION of the inputs' bytes."""
    return int(PLAN_BUDGET_FRACTION * sum(t.numel() * t.element_size() for t in (q, k, v)))


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    identifier: Identifier,
    ctx: AttentionContext | None = None,
    *,
    executor: Executor | None = None,
    return_lse: bool = False,
    on_plan: Callable[[Plan, AttentionContext], None] | None = None,
    max_plan_bytes: int | None = None,
    guard: ErrorGuard | None = None,
    guard_memory: GuardMemory | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal prefill attention over the keys ``identifier`` selects.

    q: [B, Hq, N, D]; k, v: [B, Hkv, N, D] (GQA is read in place, never expanded). Returns
    (output [B, Hq, N, D], log-sum-exp [B, Hq, N] float32 if ``return_lse``). ``on_plan``
    sees each plan before execution with the context of the heads it covers (statistics, debugging).

    Memory: a plan's size is known only once identified, and on diffuse attention a long
    sequence's key lists can outgrow q, k and v together. The identifier gets a budget
    (``max_plan_bytes``, default :func:`default_plan_budget`) in ``ctx.plan_budget``; one that
    would pass it raises :class:`PlanBudgetExceeded` with its size per KV head, and the heads
    then run in chunks that fit (whole KV groups, or the query heads of one group when the
    identifier allows), each identified, executed into the shared output and freed before the
    next. Identifiers that ignore the budget run in one call.

    ``guard`` (a :class:`~sparse_prefill.guard.ErrorGuard`): after a sparse plan runs, the KV groups
    whose output on a few sampled query rows is too far from exact attention run dense again;
    ``on_plan`` then sees the plan of the heads that stayed sparse and a :class:`DensePlan` with the
    guard's ``reason`` for the others, each with the context of its heads. ``guard_memory`` (a
    :class:`~sparse_prefill.guard.GuardMemory`, with a guard and ``ctx.layer_idx``): the KV groups it
    remembers as rejected run dense at once (``on_plan`` sees a DensePlan with the guard's
    ``remembered_reason``), the others as above, and this call's rejections are remembered.

    Gradients: identification runs under ``torch.no_grad()`` (selection is not differentiable; the
    plan is integers). When q, k or v require grad under grad mode, the chosen executor must have a
    backward (``supports_backward``, as the reference and dense SDPA executors do) or the call raises
    :class:`NoCapableExecutorError`: the Triton kernels are forward only, and neither a silently
    detached output nor a silent switch to the much slower reference is an answer.

    Equivalent PyTorch code for a plan's mask ``M`` (for testing only; O(N^2))::

        scores = (q @ k.repeat_interleave(Hq // Hkv, 1).transpose(-1, -2)) * scale
        out = scores.masked_fill(~M, -inf).softmax(-1) @ v.repeat_interleave(Hq // Hkv, 1)
    """
    validate_attention_inputs(q, k, v)
    ctx = ctx or AttentionContext.for_inputs(q, k)
    memory = guard_memory if guard is not None else None
    if memory is not None:
        known = memory.known_dense(ctx.layer_idx, _kv_range(ctx, k.shape[1]), q.shape[2])
        if any(known):
            return _run_remembered(q, k, v, identifier, ctx, known, executor=executor, return_lse=return_lse,
                                   on_plan=on_plan, max_plan_bytes=max_plan_bytes, guard=guard, guard_memory=memory)
    budget = default_plan_budget(q, k, v) if max_plan_bytes is None else max_plan_bytes
    done, chunks = None, None
    try:
        with torch.no_grad():
            plan = identifier.identify(q, k, dataclasses.replace(ctx, plan_budget=budget, defer_sizing=True))
        if isinstance(plan, PendingPlan):
            plan, done = _run_pending(q, k, v, plan, ctx, executor, return_lse)
    except PlanBudgetExceeded as exceeded:
        chunks = _head_chunks(exceeded, q.shape[1] // k.shape[1], budget)
        _logger.debug("layer %s: the plan of %d query heads needs %.1f MiB, over the plan budget of %.1f MiB: "
                      "its heads run as %d calls, each identified apart", ctx.layer_idx, q.shape[1],
                      sum(exceeded.kv_head_bytes) / 2**20, budget / 2**20, len(chunks))
    if chunks is not None:
        # Outside the except block: its traceback holds the frames that hold a pending plan's key buffer (up to
        # the budget), which must be freed before the chunks' plans take the budget again.
        plan = done = None
        return _run_in_chunks(q, k, v, identifier, ctx, chunks, executor=executor, return_lse=return_lse,
                              on_plan=on_plan, guard=guard, guard_memory=memory)
    return _guarded(q, k, v, plan, ctx, executor, return_lse, on_plan, guard, guard_memory=memory, done=done)


def _run_pending(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pending: PendingPlan, ctx: AttentionContext,
                 executor: Executor | None, return_lse: bool,
                 ) -> tuple[Plan, tuple[torch.Tensor, torch.Tensor | None] | None]:
    """Launches a pending plan on an executor that reads its verdict, then resolves it (the host sync, the GPU
    busy meanwhile): (the plan it became, its output, or None when that plan has yet to run). An executor that
    cannot read verdicts gets the resolved plan. Raises PlanBudgetExceeded as identify would have."""
    try:
        chosen = executor or select_executor(q, pending.plan)
    except NoCapableExecutorError:  # the resolved plan may still run (a DensePlan), or raise as it would have
        return pending.resolve(), None
    reads_verdict = getattr(chosen, "reads_verdict", False)  # duck-typed plugin executors may omit it
    if not reads_verdict or chosen.not_supported_reasons(q, pending.plan) or _needs_grad(q, k, v):
        return pending.resolve(), None
    result = chosen(q, k, v, pending.plan, ctx, return_lse=return_lse, verdict=pending.verdict)
    plan = pending.resolve()
    return plan, (None if isinstance(plan, DensePlan) else result)


def _kv_range(ctx: AttentionContext, num_kv: int) -> range:
    """The global indices of this call's KV heads."""
    first = ctx.head_offset // ctx.gqa_group_size
    return range(first, first + num_kv)


def _run_remembered(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, identifier: Identifier, ctx: AttentionContext,
    known: list[bool], *, executor: Executor | None, return_lse: bool,
    on_plan: Callable[[Plan, AttentionContext], None] | None, max_plan_bytes: int | None, guard: ErrorGuard,
    guard_memory: GuardMemory,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Runs of KV groups: dense at once where ``known`` says the memory holds a rejection, the usual guarded
    call on the others (whose memory entries ``known_dense`` has already cleared)."""
    out = output_like(q)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device) if return_lse else None
    for remembered, kv, heads, part_ctx in _kv_runs(known, q.shape[1] // k.shape[1], ctx):
        if remembered:
            _run_dense(q, k, v, kv, heads, part_ctx, guard.remembered_reason(), executor, on_plan, out, lse)
            continue
        out[:, heads], part_lse = sparse_attention(
            q[:, heads], k[:, kv], v[:, kv], identifier, part_ctx, executor=executor, return_lse=return_lse,
            on_plan=on_plan, max_plan_bytes=max_plan_bytes, guard=guard, guard_memory=guard_memory)
        if lse is not None:
            lse[:, heads] = part_lse
    return out, lse


def _kv_runs(flags: list[bool], group: int, ctx: AttentionContext
             ) -> Iterator[tuple[bool, slice, slice, AttentionContext]]:
    """Runs of consecutive KV groups with equal ``flags``: (flag, their KV heads, their query heads, the context
    of those heads)."""
    for flag, run in itertools.groupby(range(len(flags)), key=flags.__getitem__):
        kv_heads = list(run)
        start, stop = kv_heads[0], kv_heads[-1] + 1
        heads = slice(start * group, stop * group)
        part_ctx = dataclasses.replace(ctx, num_q_heads=(stop - start) * group, num_kv_heads=stop - start,
                                       head_offset=ctx.head_offset + heads.start)
        yield flag, slice(start, stop), heads, part_ctx


def _run_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: slice, heads: slice, ctx: AttentionContext,
               reason: str, executor: Executor | None, on_plan: Callable[[Plan, AttentionContext], None] | None,
               out: torch.Tensor, lse: torch.Tensor | None) -> None:
    """Dense attention of query heads ``heads`` (KV heads ``kv``) into ``out`` and ``lse``, reported with ``reason``."""
    plan = DensePlan(q.shape[0], ctx.num_q_heads, q.shape[2], reason=reason)
    if on_plan is not None:
        on_plan(plan, ctx)
    part_lse = _execute(q[:, heads], k[:, kv], v[:, kv], plan, ctx, executor, lse is not None, out=out[:, heads])[1]
    if lse is not None:
        lse[:, heads] = part_lse


def _head_chunks(exceeded: PlanBudgetExceeded, group: int, budget: int) -> list[tuple[slice, slice]]:
    """(query heads, KV heads) per call: consecutive whole KV groups packed greedily while their plans
    fit ``budget``; a group too large alone is split into runs of its query heads when the identifier
    allows it (``query_head_bytes``), else runs alone."""
    chunks: list[tuple[slice, slice]] = []
    start, size = 0, 0  # the open run of whole KV groups [start, kv)
    for kv, nbytes in enumerate(exceeded.kv_head_bytes):
        if kv > start and size + nbytes > budget:
            chunks.append((slice(start * group, kv * group), slice(start, kv)))
            start, size = kv, 0
        if nbytes > budget and exceeded.query_head_bytes is not None and group > 1:
            heads = exceeded.query_head_bytes[kv * group:(kv + 1) * group]
            chunks += [(slice(kv * group + run.start, kv * group + run.stop), slice(kv, kv + 1))
                       for run in _greedy_runs(heads, budget)]
            start, size = kv + 1, 0
        else:
            size += nbytes
    if start < len(exceeded.kv_head_bytes):
        chunks.append((slice(start * group, len(exceeded.kv_head_bytes) * group), slice(start, None)))
    return chunks


def _greedy_runs(sizes: list[int], budget: int) -> list[slice]:
    """Consecutive items packed greedily into runs whose sizes sum within ``budget`` (an item over it
    alone gets a run of its own)."""
    runs, start, total = [], 0, 0
    for i, size in enumerate(sizes):
        if i > start and total + size > budget:
            runs.append(slice(start, i))
            start, total = i, 0
        total += size
    runs.append(slice(start, len(sizes)))
    return runs


def _run_in_chunks(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, identifier: Identifier, ctx: AttentionContext,
    chunks: list[tuple[slice, slice]], *, executor: Executor | None, return_lse: bool,
    on_plan: Callable[[Plan, AttentionContext], None] | None, guard: ErrorGuard | None = None,
    guard_memory: GuardMemory | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Identify and execute each (query heads, KV heads) chunk into one output; a chunk's plan is
    freed before the next is built."""
    out = output_like(q)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device) if return_lse else None
    for q_heads, kv_heads in chunks:
        chunk_q, chunk_k, chunk_v = q[:, q_heads], k[:, kv_heads], v[:, kv_heads]
        # The whole call's plan passed the budget, so it was not dense: no chunk may turn dense.
        chunk_ctx = dataclasses.replace(
            ctx, num_q_heads=chunk_q.shape[1], num_kv_heads=chunk_k.shape[1],
            head_offset=ctx.head_offset + q_heads.start, plan_budget=None, dense_fallback=False, defer_sizing=False,
        )
        with torch.no_grad():
            plan = identifier.identify(chunk_q, chunk_k, chunk_ctx)
        # The KV heads by the whole call's group size: a chunk may hold some query heads of one group.
        first_kv = _kv_range(ctx, k.shape[1]).start + (kv_heads.start or 0)
        chunk_lse = _guarded(chunk_q, chunk_k, chunk_v, plan, chunk_ctx, executor, return_lse, on_plan, guard,
                             out=out[:, q_heads], guard_memory=guard_memory,
                             kv_range=range(first_kv, first_kv + chunk_k.shape[1]))[1]
        if lse is not None:
            lse[:, q_heads] = chunk_lse
        del plan
    return out, lse


def _guarded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Plan, ctx: AttentionContext,
             executor: Executor | None, return_lse: bool, on_plan: Callable[[Plan, AttentionContext], None] | None,
             guard: ErrorGuard | None, out: torch.Tensor | None = None, guard_memory: GuardMemory | None = None,
             kv_range: range | None = None, done: tuple[torch.Tensor, torch.Tensor | None] | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Runs ``plan`` (unless ``done`` holds its output already), then runs dense again the KV groups whose
    output ``guard`` rejects (remembered in ``guard_memory`` when given); ``on_plan`` sees what each group's
    output came from."""
    result, lse = done if done is not None else _execute(q, k, v, plan, ctx, executor, return_lse, out=out)
    with torch.no_grad():
        dense = [] if guard is None or isinstance(plan, DensePlan) else guard.dense_kv_heads(q, k, v, result, ctx.scale)
    if guard_memory is not None and any(dense):
        kv_heads = _kv_range(ctx, k.shape[1]) if kv_range is None else kv_range
        guard_memory.record(ctx.layer_idx, kv_heads, q.shape[2], dense)
    if not any(dense):
        if on_plan is not None:
            on_plan(plan, ctx)
        return result, lse
    assert guard is not None
    for run_dense, kv, heads, part_ctx in _kv_runs(dense, q.shape[1] // k.shape[1], ctx):
        if run_dense:
            _run_dense(q, k, v, kv, heads, part_ctx, guard.reason(), executor, on_plan, result, lse)
        elif on_plan is not None:
            on_plan(_kv_heads_of(plan, kv.start, kv.stop, k.shape[1]), part_ctx)
    return result, lse


def _kv_heads_of(plan: Plan, start: int, stop: int, num_kv: int) -> Plan:
    """The part of ``plan`` that KV heads [start, stop) read, for reporting; a plan kind without
    ``select_heads`` (a plugin's) is reported whole."""
    plan_heads = getattr(plan, "plan_heads", getattr(plan, "heads", None))
    if not hasattr(plan, "select_heads") or not isinstance(plan_heads, int):
        return plan
    per_kv = plan_heads // num_kv  # 1, or the group size when each query head has its own list
    return plan.select_heads(start * per_kv, stop * per_kv)


def _execute(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Plan, ctx: AttentionContext,
             executor: Executor | None, return_lse: bool, out: torch.Tensor | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Runs ``plan`` on ``executor`` (or the best capable one), writing into ``out`` when given."""
    if executor is not None and (reasons := executor.not_supported_reasons(q, plan)):
        raise NoCapableExecutorError(f"executor {executor.name} cannot run these inputs: {'; '.join(reasons)}")
    chosen = executor or select_executor(q, plan)
    if _needs_grad(q, k, v) and not getattr(chosen, "supports_backward", False):  # duck-typed plugins may omit it
        raise NoCapableExecutorError(_no_backward_message(chosen, q, plan))
    return chosen(q, k, v, plan, ctx, return_lse=return_lse, out=out)


def _needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd would record this call: grad mode on and some input requires grad."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _no_backward_message(chosen: Executor, q: torch.Tensor, plan: Plan) -> str:
    """What went wrong and the two ways out, naming the executors that could differentiate this plan."""
    able = [f"{type(e).__module__}.{type(e).__name__}" for e in get_registry().executors()
            if getattr(e, "supports_backward", False) and not e.not_supported_reasons(q, plan)]
    alternative = f"pass executor={' or '.join(f'{name}()' for name in able)} (slower)" if able else (
        f"no registered executor has a backward for {type(plan).__name__}")
    return (f"executor {chosen.name} has no backward, but q, k or v require grad with grad mode on; run under "
            f"torch.inference_mode() or torch.no_grad() (prefill needs no gradients), or {alternative}")
