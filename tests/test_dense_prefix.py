"""Replaying the dense layers before a calibration unit's layer: the same measurements, less computed."""

import logging

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sparse_prefill.evaluation import dense_prefix
from sparse_prefill.evaluation.dense_prefix import DensePrefix, decoder_layers, replaying
from sparse_prefill.evaluation.group_budget import measure_group_kl
from sparse_prefill.evaluation.layer_budget import alone_policy, measure_layer_options
from sparse_prefill.evaluation.whole_model import next_token_logprobs, policy_logprobs
from sparse_prefill.policy import load_policy
from tests.test_whole_model import TINY

STREAMING = {"min_length": 0, "default": {"pattern": "streaming", "sink": 8, "local": 16, "group_rows": 16}}


def four_layer_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(**{**TINY, "num_hidden_layers": 4})
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval()


def ids(seed: int = 4) -> torch.Tensor:
    return torch.randint(1, 96, (1, 160), generator=torch.Generator().manual_seed(seed))


def dense_policy():
    return alone_policy(load_policy(STREAMING), 0, None, "dense")


def test_a_unit_replayed_equals_the_unit_computed_and_skips_the_layers_before(caplog):
    model, tokens, base = four_layer_model(), ids(), load_policy(STREAMING)
    with caplog.at_level(logging.INFO, logger="sparse_prefill"):
        prefix = DensePrefix.capture(model, tokens, dense_policy(), 32)
    assert prefix is not None and len(prefix.outputs) == 4
    assert "replay the layers before their own" in caplog.text  # what ran, on the logger at INFO
    calls = []
    hooks = [layer.self_attn.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
             for i, layer in enumerate(model.model.layers)]
    try:
        for layer in range(4):
            policy = alone_policy(base, layer, base.default, f"layer {layer}")
            calls.clear()
            whole, whole_stats = policy_logprobs(model, tokens, policy, 32)
            assert calls == [0, 1, 2, 3]
            calls.clear()
            with replaying(prefix, layer):
                replayed, replayed_stats = policy_logprobs(model, tokens, policy, 32)
            assert calls == list(range(layer, 4))  # nothing before the changed layer was computed
            assert torch.equal(whole, replayed)
            computed = {i: d for i, d in whole_stats.layer_densities().items() if i >= layer}
            assert replayed_stats.layer_densities() == computed  # the replayed layers made no plan
    finally:
        for hook in hooks:
            hook.remove()
    assert "forward" not in model.model.layers[0].__dict__  # the layers are left as they were


@pytest.mark.parametrize("measure", ["layers", "groups"])
def test_the_measurements_equal_those_of_whole_forwards(monkeypatch, measure):
    model, tokens, base = four_layer_model(), ids(7), load_policy(STREAMING)
    options = {"local=16": base.default, "local=32": load_policy({**STREAMING, "default": {
        **STREAMING["default"], "local": 32}}).default}
    dense = next_token_logprobs(model, tokens, 32)

    def run():
        if measure == "layers":
            return measure_layer_options(model, tokens, base, options, [0, 1, 2, 3], 32, dense)
        return measure_group_kl(model, tokens, base, options, [1, 3], [range(0, 2), range(2, 4)], 32, dense)

    replayed = run()
    monkeypatch.setattr(DensePrefix, "capture", classmethod(lambda cls, *args: None))
    assert run() == replayed
    assert any(option.kl > 0 for option in replayed[0])


def test_layers_that_share_state_are_caught_and_units_run_whole(caplog):
    """Layer 3 reads a flag that layer 0's attention sets: replaying layer 0 changes the answer, so no replay."""
    model = four_layer_model()
    flag = {"set": 0}

    def read_and_clear(module, args, output):
        scaled, flag["set"] = output * (1 + flag["set"]), 0
        return scaled

    model.model.layers[0].self_attn.register_forward_hook(lambda m, a, o: flag.__setitem__("set", 1))
    model.model.layers[3].register_forward_hook(read_and_clear)
    with caplog.at_level(logging.WARNING, logger="sparse_prefill"):
        assert DensePrefix.capture(model, ids(), dense_policy(), 32) is None
    assert "run whole" in caplog.text and "changed the dense log-probabilities" in caplog.text


def test_a_model_without_a_layer_list_is_told_and_runs_whole(caplog):
    model = four_layer_model()
    layers, why = decoder_layers(model)
    assert layers is not None and why == ""
    model.model.layers[1].self_attn.layer_idx = 2  # layer 1 no longer holds only its own index
    with caplog.at_level(logging.WARNING, logger="sparse_prefill"):
        assert DensePrefix.capture(model, ids(), dense_policy(), 32) is None
    assert "decoder layer 1 holds modules of layer_idx [2]" in caplog.text
    assert dense_prefix.decoder_layers(torch.nn.Linear(2, 2))[0] is None


def test_replaying_nothing_changes_nothing():
    model, tokens = four_layer_model(), ids()
    before, _ = policy_logprobs(model, tokens, dense_policy(), 32)
    with replaying(None, 3):
        during, _ = policy_logprobs(model, tokens, dense_policy(), 32)
    assert torch.equal(before, during)
