"""`convert-minference`: MInference per-head configs become policies that validate and run."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import sparse_prefill
from sparse_prefill.cli import main
from sparse_prefill.minference import MInferenceConfigError, convert_minference
from sparse_prefill.policy import load_policy

# Two layers of four heads, every MInference type, sizes small enough to be sparse at 200 tokens.
CONFIG = [
    {"0": ["vertical_and_slash", 16, 32, 0.91], "1": ["vertical_and_slash", 16, 32, 0.88],
     "2": ["stream_llm", 4, 32, 0.75], "3": ["block_sparse", 1000, 6096, 0.8]},
    {"0": ["vertical_and_slash", 64, 8, 0.93], "1": ["vertical_and_slash", 16, 32, 0.9],
     "2": ["vertical_and_slash", 16, 32, 0.9], "3": ["vertical_and_slash", 16, 32, 0.9]},
]
TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=1024)


def _tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(**TINY)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval()


def test_every_head_gets_its_pattern_and_sizes() -> None:
    policy = load_policy(convert_minference(CONFIG, "config.json"))
    expected = {
        (0, 0): ("vertical-slash", {"vertical": 16, "slash": 32}),
        (0, 2): ("streaming", {"sink": 4, "local": 32}),
        (0, 3): ("block-topk", {"blocks": 100, "block": 64}),  # MInference's kernel: 100 blocks of 64, sizes unused
        (1, 0): ("vertical-slash", {"vertical": 64, "slash": 8}),
        (1, 3): ("vertical-slash", {"vertical": 16, "slash": 32}),
    }
    for (layer, head), (pattern, params) in expected.items():
        choice = policy.choice_for(layer, head)
        assert choice.pattern == pattern and params.items() <= choice.as_dict().items(), (layer, head, choice)
    assert policy.min_length == 0 and len(policy.overrides) == 3  # the common choice is the default


def test_a_converted_config_runs_on_a_model_and_at_its_extremes_equals_dense() -> None:
    model, ids = _tiny_model(), torch.randint(0, 96, (2, 200), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = model(ids).logits
        handle = sparse_prefill.apply(model, convert_minference(CONFIG, "config.json"))
        sparse = model(ids).logits
        sparse_prefill.remove(model)
        everything = [{head: [kind, 10**6, 10**6, 1.0] for head, (kind, *_) in layer.items()} for layer in CONFIG]
        sparse_prefill.apply(model, convert_minference(everything, "everything.json"))
        full = model(ids).logits
        sparse_prefill.remove(model)
    assert handle is not None and torch.isfinite(sparse).all()
    assert not torch.allclose(sparse, dense, atol=1e-4)  # the small sizes are sparse at 200 tokens
    torch.testing.assert_close(full, dense, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("config, message", [
    ([{"0": ["vertical_and_slash", 1, 2, 0.5]}, {"0": ["a_shape", 1, 2, 0.5]}],
     r"config.json: layer 1, head 0: unknown pattern type 'a_shape'; allowed: vertical_and_slash, stream_llm, "
     r"block_sparse"),
    ([{"0": ["stream_llm", -1, 2, 0.5]}], r"layer 0, head 0: vertical_size must be an integer >= 0, got -1"),
    ([{"0": ["stream_llm", 1, 2.5, 0.5]}], r"layer 0, head 0: slash_size must be an integer >= 0, got 2.5"),
    ([{"0": "vertical_and_slash"}], r"layer 0, head 0: expected \[type, vertical_size, slash_size, score\]"),
    ([{"x": ["stream_llm", 1, 2, 0.5]}], r"layer 0, head key 'x': expected a non-negative integer index"),
    ([{"0": ["stream_llm", 1, 2, 0.5]}, {"1": ["stream_llm", 1, 2, 0.5]}],
     r"layer 1 lists heads \[1\] but earlier layers \[0\]"),
    ([], r"no layers"),
    ("vertical_and_slash", r"expected a JSON list with one object per layer"),
], ids=["unknown-type", "negative-size", "fractional-size", "not-a-list", "head-key", "heads-differ", "empty",
        "not-json-list"])
def test_bad_entries_are_refused_with_layer_and_head(config, message: str) -> None:
    with pytest.raises(MInferenceConfigError, match=message):
        convert_minference(config, "config.json")


def test_the_cli_writes_a_policy_that_loads_and_refuses_unknown_types(tmp_path, capsys) -> None:
    source, target = tmp_path / "config.json", tmp_path / "policy.yaml"
    source.write_text(json.dumps(CONFIG))
    assert main(["convert-minference", str(source), "-o", str(target)]) == 0
    assert str(target) in capsys.readouterr().out
    assert load_policy(str(target)).choice_for(0, 2).pattern == "streaming"
    source.write_text(json.dumps([{"0": ["dilated", 1, 2, 0.5]}]))
    with pytest.raises(SystemExit) as exc:
        main(["convert-minference", str(source), "-o", str(tmp_path / "bad.yaml")])
    assert exc.value.code == 2 and "layer 0, head 0: unknown pattern type 'dilated'" in capsys.readouterr().err
    assert not (tmp_path / "bad.yaml").exists()
