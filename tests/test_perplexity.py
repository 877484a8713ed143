import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sparse_prefill.evaluation.perplexity import compare_perplexity, perplexity


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval()


def test_dense_policy_keeps_perplexity_and_streaming_changes_it(tiny_llama):
    ids = torch.randint(0, 128, (1, 300))
    streaming = {"default": {"pattern": "streaming", "sink": 16, "local": 16, "group_rows": 16}}
    results = compare_perplexity(tiny_llama, ids, {"dense-policy": "dense.yaml", "streaming": streaming}, 100)
    assert results["dense-policy"] == pytest.approx(results["dense"], rel=1e-5)
    assert results["streaming"] != pytest.approx(results["dense"], rel=1e-5)
    assert all(math.isfinite(value) and value > 1 for value in results.values())
    assert tiny_llama.config._attn_implementation == "sdpa"  # restored after each policy


def test_score_last_is_checked(tiny_llama):
    with pytest.raises(ValueError, match="score_last must be in"):
        perplexity(tiny_llama, torch.randint(0, 128, (1, 10)), score_last=10)


def test_perplexity_equals_the_loss_over_full_logits(tiny_llama):
    # perplexity() asks the model for the scored positions' logits only (logits_to_keep).
    ids = torch.randint(0, 128, (1, 64))
    with torch.inference_mode():
        logits = tiny_llama(ids, use_cache=False).logits[0, -21:-1].float()
    expected = math.exp(float(torch.nn.functional.cross_entropy(logits, ids[0, -20:])))
    assert perplexity(tiny_llama, ids, score_last=20) == pytest.approx(expected, rel=1e-5)
