"""apply()/remove() on tiny random-initialised Hugging Face models (CPU)."""

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import sparse_prefill
from sparse_prefill.interfaces import AttentionContext
from sparse_prefill.patterns.streaming import StreamingIdentifier

# fp32 on CPU; the sparse path reorders the softmax sums, so logits agree to rounding, not bit for bit.
LOGIT_ATOL = 2e-4

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=1024)
STREAMING = {"default": {"pattern": "streaming", "sink": 16, "local": 32, "group_rows": 16}}


def make_model(cls=LlamaForCausalLM, config_cls=LlamaConfig, attn_implementation="sdpa", **overrides):
    torch.manual_seed(0)
    config = config_cls(**{**TINY, **overrides})
    config._attn_implementation = attn_implementation
    return cls(config).eval()


MODELS = {
    "llama": lambda: make_model(),
    "qwen2": lambda: make_model(Qwen2ForCausalLM, Qwen2Config),
}


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


def cache_keyword(model):
    """The forward keyword for a KV cache: transformers 5.25 renamed ``past_key_values`` to ``cache`` (the old
    name warns, removal announced for 5.40); 5.17 knows only the old one."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def cache_kwargs(model, output):
    """The forward keyword for a KV cache and ``output``'s cache."""
    keyword = cache_keyword(model)
    return keyword, getattr(output, keyword)


def streaming_reference_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Dense attention under the streaming plan's exact O(N^2) mask: the truth for the sparse path."""
    ctx = AttentionContext.for_inputs(query, key, scaling)
    plan = StreamingIdentifier(sink=16, local=32, group_rows=16).identify(query, key, ctx)
    mask = plan.to_dense().repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    group = query.shape[1] // key.shape[1]
    out = F.scaled_dot_product_attention(query, key.repeat_interleave(group, 1), value.repeat_interleave(group, 1),
                                         attn_mask=mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


@pytest.fixture(scope="module")
def masked_reference():
    AttentionInterface.register("test_streaming_reference", streaming_reference_attention)
    AttentionMaskInterface.register("test_streaming_reference", sdpa_mask)
    return "test_streaming_reference"


@pytest.mark.parametrize("name", MODELS)
def test_dense_policy_matches_unpatched(name):
    model = MODELS[name]()
    ids = torch.randint(0, 128, (2, 150))
    expected = logits(model, ids)
    handle = sparse_prefill.apply(model, "sparse_prefill/policies/dense.yaml")
    torch.testing.assert_close(logits(model, ids), expected, atol=LOGIT_ATOL, rtol=0)
    assert handle.stats.sparse_calls == 2 and handle.stats.dense_calls == 0


@pytest.mark.parametrize("name", MODELS)
def test_streaming_policy_matches_masked_dense_reference(name, masked_reference):
    model = MODELS[name]()
    ids = torch.randint(0, 128, (1, 200))
    sparse_prefill.apply(model, STREAMING)
    got = logits(model, ids)
    sparse_prefill.remove(model)
    model.set_attn_implementation(masked_reference)
    torch.testing.assert_close(got, logits(model, ids), atol=LOGIT_ATOL, rtol=0)


def test_remove_restores_previous_implementation():
    model = make_model()
    ids = torch.randint(0, 128, (1, 100))
    expected = logits(model, ids)
    handle = sparse_prefill.apply(model, STREAMING)
    assert model.config._attn_implementation == handle.name
    assert not torch.allclose(logits(model, ids), expected, atol=1e-3)
    sparse_prefill.remove(model)
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(logits(model, ids), expected)
    with pytest.raises(RuntimeError, match="not applied"):
        sparse_prefill.remove(model)


def test_apply_twice_is_an_error():
    model = make_model()
    sparse_prefill.apply(model, STREAMING)
    with pytest.raises(RuntimeError, match="already applied"):
        sparse_prefill.apply(model, STREAMING)


def test_below_min_length_runs_the_previous_implementation():
    model = make_model()
    ids = torch.randint(0, 128, (1, 100))
    expected = logits(model, ids)
    handle = sparse_prefill.apply(model, {**STREAMING, "min_length": 101})
    assert torch.equal(logits(model, ids), expected)
    assert handle.stats.sparse_calls == 0 and handle.stats.dense_calls == 2


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_each_sequence_alone(side):
    model = make_model()
    sparse_prefill.apply(model, STREAMING)
    lengths = [200, 137]
    seqs = [torch.randint(1, 128, (n,)) for n in lengths]
    ids = torch.zeros(2, 200, dtype=torch.long)
    mask = torch.zeros(2, 200, dtype=torch.long)
    for b, seq in enumerate(seqs):
        span = slice(200 - len(seq), 200) if side == "left" else slice(0, len(seq))
        ids[b, span], mask[b, span] = seq, 1
    batched = logits(model, ids, attention_mask=mask)
    for b, seq in enumerate(seqs):
        span = slice(200 - len(seq), 200) if side == "left" else slice(0, len(seq))
        alone = logits(model, seq[None])
        # Positions count from the first real token when the mask is given; the model derives
        # position ids from the mask only during generate(), so compare right padding exactly and
        # left padding with explicit position ids.
        if side == "left":
            positions = (mask[b : b + 1].cumsum(-1) - 1).clamp(min=0)
            batched_b = logits(model, ids[b : b + 1], attention_mask=mask[b : b + 1], position_ids=positions)
            torch.testing.assert_close(batched_b[0, span], alone[0], atol=LOGIT_ATOL, rtol=0)
        else:
            torch.testing.assert_close(batched[b, span], alone[0], atol=LOGIT_ATOL, rtol=0)
    assert torch.isfinite(batched).all()


def test_generate_decodes_with_previous_implementation():
    model = make_model()
    ids = torch.randint(0, 128, (1, 120))
    expected = model.generate(ids, max_new_tokens=6, do_sample=False)
    handle = sparse_prefill.apply(model, "sparse_prefill/policies/dense.yaml")
    got = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, expected)
    # prefill: one sparse-path call per layer; 5 decode steps: the previous implementation.
    assert handle.stats.sparse_calls == 2 and handle.stats.dense_calls == 10


def test_cached_prefix_continuation_runs_exactly_as_unpatched():
    model = make_model()
    ids = torch.randint(0, 128, (1, 160))
    handle = sparse_prefill.apply(model, STREAMING)
    with torch.no_grad():
        prefix = model(ids[:, :128], use_cache=True)
    keyword, cache = cache_kwargs(model, prefix)
    cache_copy = copy.deepcopy(cache)
    patched = logits(model, ids[:, 128:], **{keyword: cache})
    assert handle.stats.dense_calls == 2  # the continuation (query shorter than keys) went to SDPA
    sparse_prefill.remove(model)
    torch.testing.assert_close(patched, logits(model, ids[:, 128:], **{keyword: cache_copy}), atol=0, rtol=0)


def static_cache(model, max_cache_len):
    """A preallocated cache, under the forward keyword for it."""
    from transformers import StaticCache

    return {cache_keyword(model): StaticCache(config=model.config, max_cache_len=max_cache_len)}


def gemma3_sliding():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    return make_model(Gemma3ForCausalLM, Gemma3TextConfig, layer_types=["sliding_attention", "full_attention"],
                      sliding_window=32)


@pytest.mark.parametrize("name", [*MODELS, "gemma3-sliding"])
def test_static_cache_prefill_runs_sparse_and_generates_as_a_dynamic_cache_does(name):
    model = gemma3_sliding() if name == "gemma3-sliding" else MODELS[name]()
    sparse_layers = 1 if name == "gemma3-sliding" else 2  # a sliding layer's window is shorter than the input
    ids = torch.randint(1, 128, (2, 150))
    mask = torch.ones_like(ids)
    mask[0, :23] = 0  # left padding: the deferred mask reads the first 150 columns of a 155-key buffer
    handle = sparse_prefill.apply(model, STREAMING)
    dynamic = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    calls = handle.stats.sparse_calls
    static = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                            cache_implementation="static")
    assert torch.equal(static, dynamic)
    assert calls == handle.stats.sparse_calls - calls == sparse_layers  # each prefill ran sparse in the same layers
    sparse_prefill.remove(model)
    assert "create_masks_for_generate" not in vars(model)


def test_static_cache_prefill_logits_match_the_masked_dense_reference(masked_reference):
    model = make_model()
    ids = torch.randint(0, 128, (1, 140))
    model.set_attn_implementation(masked_reference)
    expected = logits(model, ids)
    model.set_attn_implementation("sdpa")
    handle = sparse_prefill.apply(model, STREAMING)
    cache = static_cache(model, 200)
    got = logits(model, ids, **cache)  # 200 keys handed to attention, 140 attended
    torch.testing.assert_close(got, expected, atol=LOGIT_ATOL, rtol=0)
    next(iter(cache.values())).reset()  # reused: its offset is now a tensor holding 0, read once per forward
    torch.testing.assert_close(logits(model, ids, **cache), got, atol=0, rtol=0)
    assert handle.stats.sparse_calls == 4 and handle.stats.dense_calls == 0


def test_static_cache_continuation_runs_as_with_a_dynamic_cache():
    model = make_model()
    ids = torch.randint(0, 128, (1, 160))
    handle = sparse_prefill.apply(model, STREAMING)
    results = []
    for cache in (static_cache(model, 200), None):
        with torch.no_grad():
            prefix = model(ids[:, :128], use_cache=True, **(cache or {}))
        cache = cache or dict([cache_kwargs(model, prefix)])
        results.append(logits(model, ids[:, 128:], **cache))  # offset 128: the previous implementation
    torch.testing.assert_close(results[0], results[1], atol=LOGIT_ATOL, rtol=0)
    assert handle.stats.sparse_calls == 4 and handle.stats.dense_calls == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="generate compiles static-cache decode steps on CUDA only")
@pytest.mark.parametrize("pattern", [
    {"pattern": "streaming", "sink": 128, "local": 256},
    {"pattern": "anchor", "theta": 0.0, "dense_above": 1.0},  # the Triton identifier on the buffer's strides
])
def test_static_cache_on_cuda_keeps_the_sparse_prefill_and_decodes_compiled(pattern):
    """On CUDA, transformers compiles the decode steps of a static cache; the prefill before them runs the
    Triton kernels on the cache's buffer, and gives the logits the same prefill gives with a dynamic cache."""
    model = make_model(hidden_size=256, head_dim=64, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=4096).to("cuda", torch.bfloat16)
    ids = torch.randint(0, 128, (1, 2048), device="cuda")
    handle = sparse_prefill.apply(model, {"default": pattern, "min_length": 0}, collect_stats=True)
    runs = {}
    for cache in ("dynamic", "static"):
        runs[cache] = model.generate(ids, max_new_tokens=8, do_sample=False, cache_implementation=cache,
                                     output_logits=True, return_dict_in_generate=True)
    torch.testing.assert_close(runs["static"].logits[0], runs["dynamic"].logits[0], atol=0, rtol=0)
    assert runs["static"].sequences.shape == (1, 2056)
    assert all(torch.isfinite(step).all() for step in runs["static"].logits)
    assert handle.stats.sparse_calls == 4  # both prefills, both layers
    assert 0 < max(handle.stats.densities) < 1  # sparse plans, executed


def test_decode_steps_never_read_the_cache_offset():
    """A static cache's query offset is a tensor; reading it is a host sync, and transformers compiles decode steps."""
    from sparse_prefill.integrations.masks import _is_fresh_prefill

    unreadable = torch.zeros((), device="meta")  # int() of a meta tensor raises
    assert not _is_fresh_prefill(1, 300, unreadable, 0, True)
    assert _is_fresh_prefill(120, 300, torch.tensor(0), 0, True)
    assert not _is_fresh_prefill(120, 300, torch.tensor(128), 0, True)
    assert not _is_fresh_prefill(120, 100, 0, 0, True)  # fewer keys than queries: not a prefill from position 0


def test_generate_leaves_only_a_first_multi_token_step_to_the_forward():
    from sparse_prefill.integrations.masks import PrefillMasksInForward

    built = PrefillMasksInForward(lambda **kwargs: "pre-built", was_instance_attribute=False)
    two_d = torch.ones(1, 8, dtype=torch.bool)

    def step(tokens, **kwargs):
        return built(inputs_embeds=torch.empty(1, tokens, 0), attention_mask=two_d, **kwargs)

    assert step(8, is_first_iteration=True) is two_d  # the prefill: the forward builds its masks (deferred)
    assert step(8) is two_d  # a transformers that does not say which iteration: the same
    assert step(1, is_first_iteration=True) == "pre-built"  # one new token: never a prefill worth sparse
    assert step(4, is_first_iteration=False) == "pre-built"  # assisted decoding's check of 4 draft tokens


def test_remove_restores_a_mask_builder_the_model_instance_had():
    model = make_model()
    own = lambda **kwargs: kwargs["attention_mask"]  # noqa: E731
    model.create_masks_for_generate = own
    sparse_prefill.apply(model, STREAMING)
    assert model.create_masks_for_generate is not own
    sparse_prefill.remove(model)
    assert model.create_masks_for_generate is own


def test_deep_copy_of_patched_model_is_independent_of_the_original():
    model = make_model()
    ids = torch.randint(0, 128, (1, 130))
    expected = logits(model, ids)
    name = sparse_prefill.apply(model, STREAMING).name
    sparse_expected = logits(model, ids)
    twin = copy.deepcopy(model)
    torch.testing.assert_close(logits(twin, ids), sparse_expected, atol=0, rtol=0)
    sparse_prefill.remove(twin)  # the original keeps running sparse...
    torch.testing.assert_close(logits(model, ids), sparse_expected, atol=0, rtol=0)
    torch.testing.assert_close(logits(twin, ids), expected, atol=0, rtol=0)
    assert name in AttentionInterface._global_mapping
    sparse_prefill.remove(model)  # ...and is restored by its own remove(), which frees the name
    torch.testing.assert_close(logits(model, ids), expected, atol=0, rtol=0)
    assert model.config._attn_implementation == "sdpa"
    assert name not in AttentionInterface._global_mapping and name not in AttentionMaskInterface._global_mapping


def test_per_head_overrides_split_heads_and_keep_kv_groups():
    # Heads 0-1 read KV head 0: "dense" for head 1 only splits that group head by head.
    model = make_model()
    ids = torch.randint(0, 128, (1, 130))
    policy = {"default": {"pattern": "dense"}, "overrides": [{"heads": [0, 2, 3], "pattern": "dense"},
                                                            {"heads": 1, "layers": 0, "pattern": "dense"}]}
    expected = logits(model, ids)
    sparse_prefill.apply(model, policy)
    torch.testing.assert_close(logits(model, ids), expected, atol=LOGIT_ATOL, rtol=0)


def test_mixed_per_head_patterns_match_per_head_references(masked_reference):
    model = make_model(num_hidden_layers=1)
    ids = torch.randint(0, 128, (1, 100))
    mixed = {**STREAMING, "overrides": [{"heads": 0, "pattern": "dense"}]}
    captured = {}
    layer = model.model.layers[0].self_attn
    layer.o_proj.register_forward_hook(lambda mod, args, out: captured.__setitem__("x", args[0].detach().clone()))
    sparse_prefill.apply(model, mixed)
    logits(model, ids)
    mixed_out = captured["x"].view(1, 100, 4, 16)
    for policy, heads in ((STREAMING, [1, 2, 3]), ({"default": {"pattern": "dense"}}, [0])):
        sparse_prefill.remove(model)
        sparse_prefill.apply(model, policy)
        logits(model, ids)
        torch.testing.assert_close(mixed_out[:, :, heads], captured["x"].view(1, 100, 4, 16)[:, :, heads],
                                   atol=1e-5, rtol=0)


def test_model_without_attention_backends_is_refused():
    with pytest.raises(TypeError, match="attention backends"):
        sparse_prefill.apply(torch.nn.Linear(2, 2), STREAMING)


def test_sliding_window_layers_keep_their_own_attention(caplog):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    model = make_model(Gemma3ForCausalLM, Gemma3TextConfig, layer_types=["sliding_attention", "full_attention"],
                       sliding_window=32)
    ids = torch.randint(0, 128, (1, 150))
    expected = logits(model, ids)
    handle = sparse_prefill.apply(model, "sparse_prefill/policies/dense.yaml")
    caplog.set_level(logging.DEBUG, logger="sparse_prefill")
    torch.testing.assert_close(logits(model, ids), expected, atol=LOGIT_ATOL, rtol=0)
    assert handle.stats.sparse_calls == 1 and handle.stats.dense_calls == 1  # the sliding layer: SDPA
    # The window is the reason (not the mask it brings), told as the model's design, not as a problem.
    assert list(handle.stats.fallbacks) == ["sliding window shorter than the input"]
    assert [r.levelno for r in _notices(caplog)] == [logging.INFO]  # DEBUG: dense.yaml's own dense plans


# Attention shapes of the published configs, cut to 2 layers with a small MLP and vocabulary.
LLAMA_31_8B = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                   rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 8192})
QWEN25_7B = dict(hidden_size=3584, num_attention_heads=28, num_key_value_heads=4, head_dim=128, rope_theta=1e6)


@pytest.mark.slow
@pytest.mark.parametrize("name, cls, config_cls, shape", [
    ("llama-3.1-8b", LlamaForCausalLM, LlamaConfig, LLAMA_31_8B),
    ("qwen2.5-7b", Qwen2ForCausalLM, Qwen2Config, QWEN25_7B),
], ids=lambda v: v if isinstance(v, str) else "")
def test_anchor_keeping_every_key_matches_unpatched_on_8b_shapes(name, cls, config_cls, shape):
    model = make_model(cls, config_cls, intermediate_size=256, **shape)
    ids = torch.randint(0, 128, (1, 300))
    expected = logits(model, ids)
    handle = sparse_prefill.apply(model, {"default": {"pattern": "anchor", "theta": 1e9, "block": 64, "sink": 64,
                                                      "local": 64}}, collect_stats=True)
    torch.testing.assert_close(logits(model, ids), expected, atol=LOGIT_ATOL, rtol=0)
    assert handle.stats.densities == [pytest.approx(1.0)] * len(handle.stats.densities)
    assert sum(handle.stats.plan_heads) == 2 * shape["num_attention_heads"]  # every head of both layers


# What the sparse path does not honour goes to the previous implementation, so the dense policy
# (the sparse path's own code, keeping every key) must leave these models exactly as unpatched.
DENSE_POLICY = {"default": {"pattern": "dense"}}


def _unchanged_by_dense_policy(model, ids, **kwargs):
    expected = logits(model, ids, **kwargs)
    handle = sparse_prefill.apply(model, DENSE_POLICY)
    torch.testing.assert_close(logits(model, ids, **kwargs), expected, atol=LOGIT_ATOL, rtol=0)
    sparse_prefill.remove(model)
    return handle.stats


def test_attention_sinks_are_not_dropped():
    from transformers import GptOssConfig, GptOssForCausalLM

    model = make_model(GptOssForCausalLM, GptOssConfig, "eager", layer_types=["full_attention"] * 2,
                       num_local_experts=2, num_experts_per_tok=1)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0, 3)  # trained sinks are far from zero
    stats = _unchanged_by_dense_policy(model, torch.randint(0, 128, (1, 150)))
    assert stats.sparse_calls == 0  # s_aux is a keyword the sparse path does not honour


def test_chunked_layers_whose_window_only_the_mask_knows_keep_it():
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    model = make_model(Llama4ForCausalLM, Llama4TextConfig, attention_chunk_size=32, num_local_experts=2,
                       num_experts_per_tok=1, intermediate_size_mlp=128, interleave_moe_layer_step=1)
    stats = _unchanged_by_dense_policy(model, torch.randint(0, 128, (1, 150)))
    assert stats.sparse_calls == 0


def test_value_head_dim_other_than_the_query_one_runs_the_previous_implementation():
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    model = make_model(DeepseekV3ForCausalLM, DeepseekV3Config, num_key_value_heads=4, head_dim=8, q_lora_rank=32,
                       kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=2,
                       num_experts_per_tok=1, first_k_dense_replace=2, n_group=1, topk_group=1,
                       moe_intermediate_size=32)
    assert _unchanged_by_dense_policy(model, torch.randint(0, 128, (1, 150))).sparse_calls == 0


def test_a_window_wider_than_the_input_is_plain_causal():
    from transformers import Phi3Config, Phi3ForCausalLM

    model = make_model(Phi3ForCausalLM, Phi3Config, sliding_window=262144, pad_token_id=0)
    assert _unchanged_by_dense_policy(model, torch.randint(0, 128, (1, 150))).sparse_calls == 2


def test_output_attentions_still_returns_them():
    model = make_model(attn_implementation="eager")
    ids = torch.randint(0, 128, (1, 150))
    sparse_prefill.apply(model, DENSE_POLICY)
    with torch.no_grad():
        attentions = model(ids, output_attentions=True).attentions
    assert [tuple(a.shape) for a in attentions] == [(1, 4, 150, 150)] * 2


def test_eager_models_use_each_attention_class_own_eager_function():
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    text = LlamaConfig(**{**TINY, "vocab_size": 160})
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=16, projection_dim=32)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=150)
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation="eager").eval()
    ids = torch.randint(0, 128, (1, 150))
    expected = model.generate(ids, max_new_tokens=3, do_sample=False)
    sparse_prefill.apply(model, DENSE_POLICY)
    assert torch.equal(model.generate(ids, max_new_tokens=3, do_sample=False), expected)


def test_training_keeps_gradients():
    model = make_model(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=64).train()
    ids = torch.randint(0, 128, (1, 96))
    handle = sparse_prefill.apply(model, STREAMING)
    model(ids, labels=ids).loss.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None
    assert handle.stats.sparse_calls == 0  # the sparse kernels have no backward


def test_min_length_holds_per_sequence_of_a_padded_batch():
    model = make_model()
    handle = sparse_prefill.apply(model, {**STREAMING, "min_length": 150})
    short, long = torch.randint(1, 128, (100,)), torch.randint(1, 128, (200,))
    ids, mask = torch.zeros(2, 200, dtype=torch.long), torch.zeros(2, 200, dtype=torch.long)
    ids[0], mask[0] = long, 1
    ids[1, :100], mask[1, :100] = short, 1
    batched = logits(model, ids, attention_mask=mask)
    assert handle.stats.sparse_calls == 2  # the long row is sparse ...
    torch.testing.assert_close(batched[1, :100], logits(model, short[None])[0], atol=LOGIT_ATOL, rtol=0)  # ... not this


def test_chunks_of_whole_kv_groups_hold_consecutive_heads():
    from sparse_prefill.integrations.head_groups import kv_aligned_chunks

    assert kv_aligned_chunks((0, 1, 4, 5), 2) == [([0, 1], [0]), ([4, 5], [2])]
    assert kv_aligned_chunks((0, 1, 2, 3, 5), 2) == [([0, 1, 2, 3], [0, 1]), ([5], [2])]


def test_overrides_for_layers_or_heads_the_model_lacks_are_refused():
    model = make_model()
    with pytest.raises(sparse_prefill.PolicyError, match=r"overrides\[0\]\.layers"):
        sparse_prefill.apply(model, {"default": {"pattern": "dense"}, "overrides": [{"layers": 31, "pattern": "dense"}]})
    with pytest.raises(sparse_prefill.PolicyError, match=r"overrides\[0\]\.heads"):
        sparse_prefill.apply(model, {"default": {"pattern": "dense"}, "overrides": [{"heads": "4-7", "pattern": "dense"}]})
    assert getattr(model, "_sparse_prefill_handle", None) is None


# What ran is told once per reason per apply() on the "sparse_prefill" logger, and summed up by handle.summary().


def _notices(caplog) -> list[logging.LogRecord]:
    """The sparse_prefill records above DEBUG (DEBUG is for what is dense by design)."""
    return [r for r in caplog.records if r.name.startswith("sparse_prefill") and r.levelno > logging.DEBUG]


def _run_twice(model, ids, **kwargs):
    """Two forwards of every layer: a reason told per layer or per call would show up four times."""
    for _ in range(2):
        logits(model, ids, **kwargs)


HOLES = torch.tensor([[1] * 60 + [0] * 20 + [1] * 70])
REASONS = {
    # name: (policy, forward keywords, model mode, level, words of the reason)
    "min_length": ({**STREAMING, "min_length": 151}, {}, "eval", logging.INFO, "min_length 151"),
    "dense_above": ({"default": {"pattern": "flexprefill", "block": 16, "min_budget": 16, "dense_above": 0.01}}, {},
                    "eval", logging.INFO, "dense_above 0.01"),
    "gradients": (STREAMING, {}, "grad", logging.WARNING, "gradients recorded"),
    "padding with holes": (STREAMING, {"attention_mask": HOLES}, "eval", logging.WARNING, "holes"),
    "unsupported keyword": (STREAMING, {"output_attentions": True}, "eval", logging.WARNING, "output_attentions"),
}


@pytest.mark.parametrize("reason", REASONS)
def test_each_reason_to_stay_dense_is_told_once_and_counted(reason, caplog):
    policy, kwargs, mode, level, words = REASONS[reason]
    model = make_model(attn_implementation="eager") if "output_attentions" in kwargs else make_model()
    ids = torch.randint(0, 128, (1, 150))
    handle = sparse_prefill.apply(model, policy)
    caplog.set_level(logging.DEBUG, logger="sparse_prefill")
    if mode == "grad":  # gradients recorded: no torch.no_grad() around the forwards
        model(ids)
        model(ids)
    else:
        _run_twice(model, ids, **kwargs)
    told = _notices(caplog)
    assert len(told) == 1 and told[0].levelno == level and words in told[0].getMessage(), told
    counted = handle.stats.fallbacks + handle.stats.dense_plans
    assert [r for r in counted if words in r] and sum(counted.values()) == 4  # 2 layers x 2 forwards
    assert words in handle.summary() and handle.policy.source in handle.summary()
    assert handle.policy.source in told[0].getMessage()


def test_layers_the_policy_makes_dense_are_counted_and_named_without_a_notice(caplog):
    """`pattern: dense` in a policy is what the user asked for: no notice, but the summary names its layers."""
    model = make_model()
    handle = sparse_prefill.apply(model, {"min_length": 0, "default": STREAMING["default"],
                                          "overrides": [{"layers": 1, "pattern": "dense"}]})
    caplog.set_level(logging.DEBUG, logger="sparse_prefill")
    _run_twice(model, torch.randint(0, 128, (1, 150)))
    assert not _notices(caplog)
    assert handle.stats.dense_plans == {"from the policy's dense pattern": 2}
    assert "2 plan(s) from the policy's dense pattern (layers 1)" in handle.summary()


def test_reasons_are_told_once_per_handle_not_once_per_process(caplog):
    model = make_model()
    ids = torch.randint(0, 128, (1, 100))
    caplog.set_level(logging.INFO, logger="sparse_prefill")
    for _ in range(2):
        sparse_prefill.apply(model, {**STREAMING, "min_length": 101})
        _run_twice(model, ids)
        sparse_prefill.remove(model)
    assert len(_notices(caplog)) == 2


def test_decode_steps_are_dense_by_design_and_say_nothing_above_debug(caplog):
    model = make_model()
    handle = sparse_prefill.apply(model, STREAMING, collect_stats=True)
    caplog.set_level(logging.DEBUG, logger="sparse_prefill")
    model.generate(torch.randint(0, 128, (1, 150)), max_new_tokens=4, do_sample=False)
    assert not _notices(caplog)
    assert [r.levelno for r in caplog.records if r.name.startswith("sparse_prefill")] == [logging.DEBUG]
    summary = handle.summary()
    assert f"{handle.stats.sparse_calls} attention call(s) ran sparse" in summary
    assert f"mean density {handle.stats.mean_density():.3f}" in summary
    assert f"{handle.stats.dense_calls} call(s) ran the model's own attention" in summary and "by design" in summary


def test_notices_are_silenced_through_the_package_logger(caplog):
    model = make_model()
    sparse_prefill.apply(model, {**STREAMING, "min_length": 101})
    caplog.set_level(logging.INFO, logger="sparse_prefill")
    logging.getLogger("sparse_prefill").setLevel(logging.ERROR)
    logits(model, torch.randint(0, 128, (1, 100)))
    assert not _notices(caplog)


def test_summary_says_when_head_groups_ran_as_calls_apart():
    """A layer whose head groups take different settings identifies and launches once per group: a cost that a
    user comparing prefill times needs to see, with or without collected densities."""
    model = make_model()
    split = {**STREAMING, "overrides": [{"heads": "0-1", "pattern": "streaming", "sink": 16, "local": 48,
                                         "group_rows": 16}]}
    handle = sparse_prefill.apply(model, split)
    logits(model, torch.randint(0, 128, (1, 150)))
    calls = handle.stats.sparse_calls
    assert handle.stats.head_group_calls == 2 * calls
    assert f"ran as {2 * calls} calls apart" in handle.summary()
    sparse_prefill.remove(model)
    handle = sparse_prefill.apply(model, STREAMING, collect_stats=True)
    logits(model, torch.randint(0, 128, (1, 150)))
    assert handle.stats.head_group_calls == 0 and "calls apart" not in handle.summary()


def test_head_groups_differing_only_in_theta_run_as_one_call_with_the_same_answer(monkeypatch):
    """Anchor takes theta per query head: KV groups calibrated to different thetas share one identification
    and one launch, and the model's answer is the one their calls apart give."""
    model = make_model()
    with torch.no_grad():  # sharper attention than a random init's, so thetas 1 and 2 select differently
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6)
            layer.self_attn.k_proj.weight.mul_(6)
    ids = torch.randint(0, 128, (1, 200))
    anchor = {"pattern": "anchor", "block": 16, "sink": 16, "local": 16, "dense_tail": 0, "dense_above": 1.0}
    policy = {"min_length": 0, "default": {**anchor, "theta": 1.0},
              "overrides": [{"heads": "2-3", **anchor, "theta": 2.0}, {"layers": 1, "heads": 0, "pattern": "dense"}]}
    layer0 = {}
    for theta in (1.0, 2.0):  # each theta alone, for the densities the merged call must fall between
        alone = {"min_length": 0, "default": {**anchor, "theta": theta}}
        handle = sparse_prefill.apply(model, alone, collect_stats=True)
        logits(model, ids)
        layer0[theta] = handle.stats.layer_densities()[0]
        sparse_prefill.remove(model)
    handle = sparse_prefill.apply(model, policy, collect_stats=True)
    together = logits(model, ids)
    # Layer 0 merges its two KV groups into one call; layer 1 has a dense head, another pattern: apart.
    assert handle.stats.head_group_calls == 3
    assert [len(handle.policy.call_groups(layer, 4)) for layer in (0, 1)] == [1, 2]
    merged = handle.stats.layer_densities()[0]
    assert layer0[1.0] < merged < layer0[2.0] < 1.0, "the thetas should select differently on this input"
    sparse_prefill.remove(model)
    monkeypatch.setattr(type(handle.policy), "call_groups", type(handle.policy).assign_heads)
    handle = sparse_prefill.apply(model, policy, collect_stats=True)
    apart = logits(model, ids)
    assert handle.stats.head_group_calls == 2 + 3
    assert handle.stats.layer_densities()[0] == pytest.approx(merged)
    torch.testing.assert_close(together, apart, atol=LOGIT_ATOL, rtol=0)


def test_summary_without_collected_densities_says_how_to_collect_them():
    model = make_model()
    handle = sparse_prefill.apply(model, STREAMING)
    assert "no attention call" in handle.summary()
    logits(model, torch.randint(0, 128, (1, 150)))
    assert "2 attention call(s) ran sparse" in handle.summary() and "collect_stats=True" in handle.summary()


def test_a_guard_that_takes_no_loss_makes_the_model_dense_and_says_so():
    """A streaming window changes attention on random weights; a guard with max_error 0 sends every such KV
    group to dense attention, so the model's logits are the unpatched ones and the summary says why."""
    model = make_model()
    ids = torch.randint(0, 128, (1, 160))
    expected = logits(model, ids)
    handle = sparse_prefill.apply(model, {**STREAMING, "guard": {"max_error": 0.0, "rows": 16}}, collect_stats=True)
    torch.testing.assert_close(logits(model, ids), expected, atol=LOGIT_ATOL, rtol=0)
    assert handle.stats.densities == [1.0] * len(handle.stats.densities)
    assert "max_error 0.0" in handle.summary()
    layers = model.config.num_hidden_layers  # every layer's groups went dense, and the summary names them
    assert list(handle.stats.dense_plan_layers.values()) == [set(range(layers))]
    assert f"(layers 0-{layers - 1})" in handle.summary()
    handle.stats.reset()
    assert handle.stats.dense_plan_layers == {}
    sparse_prefill.remove(model)
    handle = sparse_prefill.apply(model, {**STREAMING, "guard": {"max_error": 1e9}}, collect_stats=True)
    logits(model, ids)
    assert max(handle.stats.densities) < 1.0 and "max_error" not in handle.summary()


def test_a_remembering_guard_runs_rejected_groups_dense_untested_then_tests_them_again():
    """With guard.remember 1, the groups rejected on the first forward run dense on the second without a test
    (the summary says so), and are tested again on the third; the logits stay the unpatched ones throughout."""
    model = make_model()
    ids = torch.randint(0, 128, (1, 160))
    expected = logits(model, ids)
    policy = {**STREAMING, "guard": {"max_error": 0.0, "rows": 16, "remember": 1}}
    handle = sparse_prefill.apply(model, policy, collect_stats=True)
    assert handle.guard_memory is not None and "for 1 calls before a new test" in handle.policy.describe()
    reasons = []
    for _ in range(3):
        handle.stats.reset()
        torch.testing.assert_close(logits(model, ids), expected, atol=LOGIT_ATOL, rtol=0)
        reasons.append(set(handle.stats.dense_plan_layers))
    tested, remembered = "max_error 0.0", "in an earlier call"
    assert [any(remembered in reason for reason in seen) for seen in reasons] == [False, True, False]
    assert all(any(tested in reason and remembered not in reason for reason in seen) for seen in (reasons[0], reasons[2]))
    sparse_prefill.remove(model)
    assert sparse_prefill.apply(model, STREAMING).guard_memory is None  # no guard, nothing to remember
