"""Sparse prefill under transformers' tensor parallelism: each rank's heads keep their global ids.

The unit tests emulate transformers' "colwise" sharding (DTensor ``Shard(0)``, i.e. ``torch.chunk``
of the output features in rank order); the last test runs a real 2-rank TP model on CPU with gloo.
"""

import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import DistributedConfig, LlamaConfig, LlamaForCausalLM

import sparse_prefill
from sparse_prefill.integrations.huggingface import SparsePrefillHandle, _sparse_prefill, tp_head_offset
from sparse_prefill.policy import load_policy

LLAMA_PLAN = {  # LlamaConfig.base_model_tp_plan as the model reports it (prefixed)
    "model.layers.*.self_attn.q_proj": "colwise",
    "model.layers.*.self_attn.k_proj": "colwise",
    "model.layers.*.self_attn.v_proj": "colwise",
    "model.layers.*.self_attn.o_proj": "rowwise",
    "lm_head": "colwise_gather_output",
}
HEAD_DIM = 16
LOGIT_ATOL = 2e-4  # fp32; the row-wise all-reduce and the sparse path both reorder sums
STREAMING = {"pattern": "streaming", "sink": 16, "local": 32, "group_rows": 16}


def colwise_heads(num_heads: int, tp_size: int, rank: int) -> list[int]:
    """Global heads rank ``rank`` holds after transformers shards a projection colwise."""
    head_of_feature = torch.arange(num_heads).repeat_interleave(HEAD_DIM)
    return head_of_feature.chunk(tp_size)[rank][::HEAD_DIM].tolist()


@pytest.mark.parametrize("tp_size", [2, 4])
def test_offsets_give_each_rank_its_colwise_heads_and_their_kv_heads(tp_size):
    group = 32 // 8
    for rank in range(tp_size):
        offset = tp_head_offset(LLAMA_PLAN, tp_size, rank, num_heads=32, num_kv_heads=8)
        local_q, local_kv = 32 // tp_size, 8 // tp_size
        assert [offset + h for h in range(local_q)] == colwise_heads(32, tp_size, rank)
        # Local query head h reads local KV head h // group: the global pair must match too.
        kv_heads = colwise_heads(8, tp_size, rank)
        assert [kv_heads[h // group] for h in range(local_q)] == [(offset + h) // group for h in range(local_q)]
        assert len(kv_heads) == local_kv


@pytest.mark.parametrize("tp_size", [2, 4])
def test_per_head_overrides_land_on_the_rank_holding_those_heads(tp_size):
    policy = load_policy({"default": {"pattern": "dense"}, "overrides": [{"heads": "15-17", **STREAMING}]})
    local = 32 // tp_size
    streaming_global = []
    for rank in range(tp_size):
        offset = tp_head_offset(LLAMA_PLAN, tp_size, rank, num_heads=32, num_kv_heads=8)
        for assignment in policy.assign_heads(0, local, offset):
            if assignment.choice.pattern == "streaming":
                streaming_global.extend(offset + h for h in assignment.heads)
    assert streaming_global == [15, 16, 17]


@pytest.mark.parametrize("tp_size", [2, 4])
def test_each_rank_computes_its_slice_of_the_unsharded_attention(tp_size):
    # Overrides straddle a KV group (heads 6-9) and a rank boundary (head 15/16 at tp 2).
    policy = load_policy({"default": {"pattern": "dense"}, "overrides": [{"heads": ["6-9", "14-17"], **STREAMING}]})
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 128, HEAD_DIM, generator=generator) for h in (32, 8, 8))
    scale = HEAD_DIM**-0.5

    def handle(offset: int) -> SparsePrefillHandle:
        return SparsePrefillHandle(None, policy, "test", "sdpa", None, head_offset=offset)

    full = _sparse_prefill(handle(0), 0, q, k, v, scale)
    for rank in range(tp_size):
        offset = tp_head_offset(LLAMA_PLAN, tp_size, rank, num_heads=32, num_kv_heads=8)
        q_r, k_r, v_r = (t.chunk(tp_size, dim=1)[rank] for t in (q, k, v))
        local = _sparse_prefill(handle(offset), 0, q_r, k_r, v_r, scale)
        torch.testing.assert_close(local, full.chunk(tp_size, dim=1)[rank], atol=1e-5, rtol=0)


def test_without_split_heads_every_rank_starts_at_head_zero():
    gathered = {"model.layers.*.self_attn.qkv_proj": "colwise_gather_output"}
    assert [tp_head_offset(gathered, 4, rank, 32, 8) for rank in range(4)] == [0, 0, 0, 0]
    assert tp_head_offset({}, 1, 0, 32, 8) == 0


@pytest.mark.parametrize("plan, match", [
    ({"model.layers.*.mlp.up_proj": "colwise"}, "rules are missing"),
    ({"model.layers.*.self_attn.qkv_proj": "colwise"}, "qkv_proj"),
    ({"model.layers.*.self_attn.q_proj": "rowwise"}, "rowwise"),
    ({"model.layers.0.self_attn.q_proj": "colwise", "model.layers.1.self_attn.q_proj": "colwise_gather_output"},
     r"\('q_proj', 'colwise_gather_output'\)"),
])
def test_unknown_head_layouts_are_refused(plan, match):
    with pytest.raises(ValueError, match=match):
        tp_head_offset(plan, 2, 1, 32, 8)


@pytest.mark.parametrize("num_heads, num_kv_heads", [(28, 4), (32, 2)])
def test_heads_that_do_not_split_evenly_are_refused(num_heads, num_kv_heads):
    with pytest.raises(ValueError, match="do not split evenly"):
        tp_head_offset(LLAMA_PLAN, 8, 1, num_heads, num_kv_heads)


# --- a real 2-rank tensor-parallel model (CPU, gloo) -------------------------------------------

TP_RANKS = 2
TP_TIMEOUT_S = 240
DENSE = {"default": {"pattern": "dense"}}
STREAMING_ON_HEADS_0_1 = {"default": {"pattern": "dense"}, "overrides": [{"heads": "0-1", **STREAMING}]}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _logits(model: LlamaForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _tp_rank_checks(rank: int, port: int, model_dir: str) -> None:
    """One rank: the TP-sharded model must reproduce the unsharded model's logits under each policy."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(TP_RANKS), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        full = LlamaForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
        sharded = LlamaForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa",
                                                   distributed_config=DistributedConfig(tp_plan="auto"))
        assert sharded.tp_size == TP_RANKS
        ids = torch.randint(0, 128, (1, 150), generator=torch.Generator().manual_seed(0))
        unpatched = _logits(full, ids)
        results = {}
        for name, policy in (("dense", DENSE), ("per-head", STREAMING_ON_HEADS_0_1)):
            sparse_prefill.apply(full, policy)
            handle = sparse_prefill.apply(sharded, policy)
            assert handle.head_offset == rank * 4  # 8 query heads, 4 per rank
            results[name] = _logits(sharded, ids)
            assert handle.stats.sparse_calls == 2 and handle.stats.dense_calls == 0
            expected = unpatched if name == "dense" else _logits(full, ids)
            torch.testing.assert_close(results[name], expected, atol=LOGIT_ATOL, rtol=0, msg=lambda m: f"{name}: {m}")
            sparse_prefill.remove(full)
            sparse_prefill.remove(sharded)
        assert not torch.allclose(results["per-head"], results["dense"], atol=1e-3)  # streaming did change heads 0-1
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo")
def test_tensor_parallel_model_matches_unsharded_model(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=HEAD_DIM, max_position_embeddings=1024)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    context = mp.start_processes(_tp_rank_checks, args=(_free_port(), str(tmp_path)), nprocs=TP_RANKS, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + TP_TIMEOUT_S
    try:
        while not context.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                pytest.fail(f"the {TP_RANKS} tensor-parallel ranks did not finish within {TP_TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join()
