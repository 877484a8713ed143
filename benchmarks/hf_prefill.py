"""The Hugging Face path on the GPU: sparse_prefill.apply on a Llama-3.1-8B-shaped model.

    python benchmarks/hf_prefill.py --length 32768 --layers 2 --out hf_prefill.json

Random weights (no 8B checkpoint can be had here), so this checks the integration, not answers:
(1) with an anchor policy that keeps every key (theta 1e9, no dense fallback) the Triton stripe
path gives the unpatched model's logits; (2) time to first token, unpatched vs ``anchor.yaml``,
and which plans the policy made (random-init attention is near uniform, so anchor's plans pass
``dense_above`` and run dense: the fallback's cost is what this measures); (3) generation after
a sparse prefill runs through the model's own decode path.
"""

from __future__ import annotations

import argparse
import json

import torch
import transformers
import triton.testing
from transformers import LlamaConfig, LlamaForCausalLM

import sparse_prefill

LLAMA_31_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                   head_dim=128, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8192})
EVERY_KEY = {"default": {"pattern": "anchor", "theta": 1e9, "dense_above": 1.0}}


def random_llama(layers: int, device: str = "cuda", **changes) -> LlamaForCausalLM:
    """A bf16 LlamaForCausalLM of the Llama-3.1-8B shape (``changes`` override config keys) with random
    weights, built and initialised on ``device``: 1B random parameters take minutes on the CPU."""
    config = LlamaConfig(num_hidden_layers=layers, **{**LLAMA_31_8B, **changes})
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            return LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(torch.float32)


def prefill_ms(model, ids) -> float:
    with torch.no_grad():
        return float(triton.testing.do_bench(lambda: model(ids, logits_to_keep=1), warmup=1, rep=5, return_mode="median"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = random_llama(args.layers)
    ids = torch.randint(0, model.config.vocab_size, (1, args.length), device="cuda")
    with torch.no_grad():
        expected = model(ids, logits_to_keep=1).logits.float()
    result = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, transformers=transformers.__version__,
                  length=args.length, layers=args.layers, unpatched_ms=prefill_ms(model, ids))

    handle = sparse_prefill.apply(model, EVERY_KEY, collect_stats=True)
    with torch.no_grad():
        every_key = model(ids, logits_to_keep=1).logits.float()
    result["every_key_max_abs_logit_diff"] = float((every_key - expected).abs().max())
    result["every_key_logit_scale"] = float(expected.abs().max())
    result["every_key_density"] = handle.stats.mean_density()
    sparse_prefill.remove(model)

    handle = sparse_prefill.apply(model, "anchor.yaml", collect_stats=True)
    result["anchor_yaml_ms"] = prefill_ms(model, ids)
    handle.stats.reset()
    with torch.no_grad():
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    result["anchor_yaml_density"] = handle.stats.mean_density()
    result["anchor_yaml_sparse_calls"] = handle.stats.sparse_calls
    result["generate_new_tokens"] = int(generated.shape[1] - args.length)
    result["generate_dense_calls"] = handle.stats.dense_calls
    print(json.dumps(result, indent=2))
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
