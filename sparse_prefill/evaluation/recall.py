"""Selection quality on real attention: capture post-RoPE Q/K, measure how much softmax mass a plan keeps.

Attention recall of a plan is the mean, over batch, query heads and rows, of the exact softmax
probability mass that falls on the keys the plan selects. A plan with recall 1.0 changes nothing;
the identifier's job is high recall at low :meth:`StripePlan.density`.

The oracles give the best any selection of a given granularity can do: the smallest density at
which each query row (:func:`oracle_row_density`) or each 128-row query block with windows
(:func:`oracle_stripe_plan`) keeps a target recall, choosing keys greedily by softmax mass.

Nothing here builds an N x N score matrix for all heads at once: the exact softmax is computed one
query group at a time, on the device the tensors are on.
"""

from __future__ import annotations

import contextvars
from typing import Any, Iterable

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from sparse_prefill.plan import BlockPlan, DensePlan, StripePlan

__all__ = ["capture_qk", "attention_recall", "head_recalls", "causal_probabilities", "oracle_row_density",
           "oracle_stripe_plan", "plan_rows_mask", "sampled_attention_recall"]

_CAPTURE_IMPL = "sparse_prefill_capture"


class _StopForward(Exception):
    """Ends the forward after the last captured layer: later layers cannot change what was captured."""


_ACTIVE_CAPTURE: contextvars.ContextVar[dict[int, tuple[torch.Tensor, torch.Tensor]] | None] = (
    contextvars.ContextVar("sparse_prefill_active_capture", default=None)
)
_CAPTURE_LAYERS: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar(
    "sparse_prefill_capture_layers", default=frozenset()
)
_CAPTURE_VALUES: contextvars.ContextVar[bool] = contextvars.ContextVar("sparse_prefill_capture_values", default=False)


def _capturing_attention(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any
) -> tuple[torch.Tensor, None]:
    """SDPA that first records the post-RoPE query [B, Hq, N, D] and key [B, Hkv, N, D] of wanted layers."""
    captured, layers = _ACTIVE_CAPTURE.get(), _CAPTURE_LAYERS.get()
    layer = getattr(module, "layer_idx", None)
    if captured is not None and layer in layers:
        tensors = (query, key, value) if _CAPTURE_VALUES.get() else (query, key)
        captured[layer] = tuple(t.detach().clone() for t in tensors)
        if len(captured) == len(layers):
            raise _StopForward
    return sdpa_attention_forward(module, query, key, value, *args, **kwargs)


AttentionInterface.register(_CAPTURE_IMPL, _capturing_attention)
# Transformers builds masks only for names it knows: without this, sliding-window layers would attend the whole prefix.
AttentionMaskInterface.register(_CAPTURE_IMPL, sdpa_mask)


def capture_qk(
    model: PreTrainedModel, input_ids: torch.Tensor, layers: Iterable[int], values: bool = False
) -> dict[int, tuple[torch.Tensor, ...]]:
    """Post-RoPE (q [B, Hq, N, D], k [B, Hkv, N, D]) of each requested layer, from one causal forward;
    with ``values``, (q, k, v). ``input_ids`` move to the model's device."""
    wanted = frozenset(layers)
    num_layers = model.config.num_hidden_layers
    if not wanted or min(wanted) < 0 or max(wanted) >= num_layers:
        raise ValueError(f"layers must be a non-empty subset of [0, {num_layers}), got {sorted(wanted)}")
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    previous = model.config._attn_implementation
    tokens = (_ACTIVE_CAPTURE.set(captured), _CAPTURE_LAYERS.set(wanted), _CAPTURE_VALUES.set(values))
    model.set_attn_implementation(_CAPTURE_IMPL)
    try:
        with torch.inference_mode():
            model(input_ids=input_ids.to(model.get_input_embeddings().weight.device), use_cache=False)
    except _StopForward:
        pass
    finally:
        model.set_attn_implementation(previous)
        _ACTIVE_CAPTURE.reset(tokens[0])
        _CAPTURE_LAYERS.reset(tokens[1])
        _CAPTURE_VALUES.reset(tokens[2])
    return dict(sorted(captured.items()))


def plan_rows_mask(plan: StripePlan | BlockPlan | DensePlan, batch: int, plan_head: int, row_start: int,
                   row_end: int) -> torch.Tensor:
    """Boolean [rows, seq_len] on the CPU: which keys rows ``[row_start, row_end)`` attend under ``plan`` (causal)."""
    return _plan_rows(plan, batch, row_start, row_end, None)[plan_head].cpu()


def _plan_rows(plan: StripePlan | BlockPlan | DensePlan, batch: int, row_start: int, row_end: int,
               keys: int | None) -> torch.Tensor:
    """[plan heads, rows, keys] bool on the plan's device: the plan's ``rows_mask`` of rows [row_start, row_end)
    of one batch entry, its first ``keys`` columns (None: all)."""
    if not isinstance(plan, (StripePlan, BlockPlan, DensePlan)):
        raise TypeError(f"plan must be a StripePlan, BlockPlan or DensePlan, got {type(plan).__name__}")
    device = torch.device("cpu") if isinstance(plan, DensePlan) else plan.device
    return plan.rows_mask(torch.arange(row_start, row_end, device=device))[batch, :, :, :keys]


def causal_probabilities(q: torch.Tensor, k: torch.Tensor, row_start: int, row_end: int, scale: float) -> torch.Tensor:
    """Exact causal softmax of rows [row_start, row_end) over keys [0, row_end), fp32, [Hkv, Hq/Hkv, rows, keys]."""
    num_kv = k.shape[0]
    queries = q[:, row_start:row_end].float().unflatten(0, (num_kv, -1))
    keys = k[:, :row_end].float().unsqueeze(1)
    scores = scale * (queries @ keys.transpose(-1, -2))
    positions = torch.arange(row_end, device=q.device)
    causal = positions.unsqueeze(0) > positions[row_start:row_end].unsqueeze(1)
    return scores.masked_fill_(causal, float("-inf")).softmax(dim=-1)


def attention_recall(q: torch.Tensor, k: torch.Tensor, plan: StripePlan | BlockPlan | DensePlan, scale: float) -> float:
    """Mean over batch, query heads and rows of the exact softmax mass inside ``plan``'s selection.

    q is [B, Hq, N, D], k is [B, Hkv, N, D] (GQA: not expanded); query head ``h`` reads plan head
    ``h // (Hq / plan heads)``. Work goes one query group (or block) at a time, all heads together,
    on q's device, so memory is O(Hq * group_rows * N), never O(Hq * N^2). A DensePlan keeps 1.0.
    """
    return float(head_recalls(q, k, [plan], scale)[0].mean())


def head_recalls(q: torch.Tensor, k: torch.Tensor, plans: list[StripePlan | BlockPlan | DensePlan],
                 scale: float) -> torch.Tensor:
    """Each plan's recall per query head, float64 [len(plans), Hq]: as :func:`attention_recall`, whose value
    is the mean of a row. The exact softmax is computed once for all ``plans`` (a theta sweep measures
    many plans of the same q and k); their row groups must be equal (any DensePlan fits)."""
    if not plans:
        raise ValueError("head_recalls needs at least one plan")
    for plan in plans:
        _check_plan_fits(q, plan)
    sized = [plan for plan in plans if not isinstance(plan, DensePlan)]
    if not sized:
        return torch.ones(len(plans), q.shape[1], dtype=torch.float64)
    rows = {plan.group_rows if isinstance(plan, StripePlan) else plan.block_size for plan in sized}
    if len(rows) > 1:
        raise ValueError(f"plans measured together must share their query rows per group, got {sorted(rows)}")
    step, seq_len = rows.pop(), q.shape[2]
    return _recall_over(q, k, plans, scale, [(start, min(start + step, seq_len)) for start in range(0, seq_len, step)])


def sampled_attention_recall(q: torch.Tensor, k: torch.Tensor, plan: StripePlan | BlockPlan | DensePlan,
                             scale: float, windows: int = 16, rows: int = 64) -> float:
    """:func:`attention_recall` over a sample of query rows: the last ``rows`` rows before each of
    ``windows`` evenly spaced ends (the last at N), per batch, every query head.

    For long sequences, where every row costs O(N): only the sampled rows' exact softmax is computed
    ([Hq, rows, N] per window, on q's device). With windows covering every row it equals attention_recall.
    """
    _check_plan_fits(q, plan)
    seq_len = q.shape[2]
    ends = sorted({max(1, round(seq_len * (i + 1) / windows)) for i in range(windows)})
    return float(_recall_over(q, k, [plan], scale, [(max(0, end - rows), end) for end in ends])[0].mean())


def _check_plan_fits(q: torch.Tensor, plan: StripePlan | BlockPlan | DensePlan) -> None:
    batch, num_q, seq_len, _ = q.shape
    heads = plan.plan_heads if isinstance(plan, StripePlan) else plan.heads
    if (plan.batch, plan.seq_len) != (batch, seq_len) or num_q % heads:
        raise ValueError(f"plan (batch={plan.batch}, seq_len={plan.seq_len}, heads={heads}) does not fit "
                         f"q of shape {tuple(q.shape)}")


def _recall_over(q: torch.Tensor, k: torch.Tensor, plans: list[StripePlan | BlockPlan | DensePlan], scale: float,
                 windows: list[tuple[int, int]]) -> torch.Tensor:
    """Mean softmax mass inside each plan per query head, over the rows [start, end) of each window and every
    batch entry: float64 [len(plans), Hq]."""
    num_q = q.shape[1]
    mass = torch.zeros(len(plans), num_q, dtype=torch.float64)
    counted = 0
    for b in range(q.shape[0]):
        for row_start, row_end in windows:
            probs = causal_probabilities(q[b], k[b], row_start, row_end, scale).flatten(0, 1)
            counted += row_end - row_start
            for i, plan in enumerate(plans):
                if isinstance(plan, DensePlan):
                    continue
                heads = plan.plan_heads if isinstance(plan, StripePlan) else plan.heads
                selected = _plan_rows(plan, b, row_start, row_end, row_end).to(probs.device)
                selected = selected.repeat_interleave(num_q // heads, dim=0)
                mass[i] += torch.where(selected, probs, 0.0).sum(dim=(1, 2), dtype=torch.float64).cpu()
    recalls = mass / counted
    recalls[[isinstance(plan, DensePlan) for plan in plans]] = 1.0  # a dense plan keeps everything, exactly
    return recalls


_ORACLE_ROWS = 128  # rows per softmax chunk of oracle_row_density: bounds memory, any value gives the same result
_ORACLE_TOP = 256  # first top-k tried per row; grown 4x until every row of the chunk reaches the target


def _check_target(recall: float) -> None:
    if not 0.0 < recall <= 1.0:
        raise ValueError(f"recall must be in (0, 1], got {recall}")


def oracle_row_density(q: torch.Tensor, k: torch.Tensor, scale: float, recall: float = 0.95) -> float:
    """Density when every query row keeps its own highest-probability keys until their mass reaches ``recall``.

    The lower bound for any selection: a row's keys sorted by softmax probability, the fewest
    whose sum reaches ``recall``, summed over rows and heads, as a fraction of the causal matrix.
    q is [B, Hq, N, D], k is [B, Hkv, N, D]; one block of rows at a time, like :func:`attention_recall`.
    """
    _check_target(recall)
    batch, num_q, seq_len, _ = q.shape
    q, k = q.cpu(), k.cpu()
    kept = 0
    for b in range(batch):
        for row_start in range(0, seq_len, _ORACLE_ROWS):
            row_end = min(row_start + _ORACLE_ROWS, seq_len)
            probs = causal_probabilities(q[b], k[b], row_start, row_end, scale).flatten(0, 1)
            top = min(_ORACLE_TOP, row_end)
            while True:  # the largest probabilities only: a partial top-k is several times cheaper than a sort
                reached = probs.topk(top, dim=-1).values.cumsum(dim=-1) >= recall
                if top == row_end or bool(reached.any(dim=-1).all()):
                    break
                top = min(4 * top, row_end)
            # First key at which the sorted mass reaches the target; a row whose rounding never reaches it keeps all.
            needed = torch.where(reached.any(-1), reached.int().argmax(-1) + 1, torch.arange(row_start + 1, row_end + 1))
            kept += int(needed.sum())
    return kept / (batch * num_q * seq_len * (seq_len + 1) / 2)


def oracle_stripe_plan(
    q: torch.Tensor, k: torch.Tensor, scale: float, recall: float = 0.95, *, block: int = 128, sink: int = 128,
    share_kv_heads: bool = False,
) -> StripePlan:
    """The sparsest stripes-with-windows plan in which every query block keeps ``recall`` of its softmax mass.

    Per query head (or, with ``share_kv_heads``, per KV group: one list for its query heads, as anchor's
    shared lists) and ``block``-row query block: the first ``sink`` keys and the block's own causal diagonal
    are always kept (a :class:`StripePlan` with ``local=0``); the other key columns are added in order of
    their softmax mass summed over the block's rows (and the group's heads) until the block's mean recall
    reaches ``recall``. ``plan.density()`` is then the best any identifier of this granularity and list
    sharing can do. Computed on the device ``q`` is on, one block at a time; the plan is on it too.
    """
    _check_target(recall)
    batch, num_q, seq_len, _ = q.shape
    plan_heads = k.shape[1] if share_kv_heads else num_q
    layout = StripePlan.empty(batch, plan_heads, seq_len, block, sink, 0, q.device)
    selected = [torch.zeros(0, dtype=torch.int32, device=q.device)] * (batch * plan_heads * layout.num_groups)
    for b in range(batch):
        for group in range(layout.num_groups):
            row_start, row_end, sink_end, _ = layout.group_bounds(group)
            probs = causal_probabilities(q[b], k[b], row_start, row_end, scale)  # [Hkv, Hq/Hkv, rows, keys]
            # [plan heads, rows of every query head the list serves, keys]
            probs = probs.flatten(1, 2) if share_kv_heads else probs.flatten(0, 1)
            heads_rows = probs.shape[-2]
            window_mass = probs[..., :sink_end].sum((-1, -2)) + probs[..., row_start:].sum((-1, -2))
            columns = probs[..., sink_end:row_start].sum(dim=-2).sort(dim=-1, descending=True)
            missing = recall * heads_rows - window_mass
            counts = (columns.values.cumsum(dim=-1) < missing[:, None]).sum(dim=-1) + 1
            counts = torch.where(missing > 0, counts.clamp(max=row_start - sink_end), 0)
            for head, count in enumerate(counts.tolist()):  # one host sync per block, not per head
                keys = columns.indices[head, :count].sort().values + sink_end
                selected[(b * plan_heads + head) * layout.num_groups + group] = keys.to(torch.int32)
    plan = layout.filled(torch.tensor([len(keys) for keys in selected], device=q.device), torch.cat(selected))
    plan.validate()
    return plan
