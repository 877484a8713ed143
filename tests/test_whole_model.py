"""Whole-model evaluation on a tiny random model: metrics against brute force, the runner end to end."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sparse_prefill.evaluation import BASELINE_LABEL
from sparse_prefill.evaluation.whole_model import (
    EvalSettings,
    Measurement,
    evaluate,
    kl_per_position,
    next_token_logprobs,
    parse_sweep,
    perplexity_of,
    summary_table,
    sweep_policies,
)
from sparse_prefill.interfaces import AttentionContext
from sparse_prefill.policy import PolicyError, load_policy

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=1024)
STREAMING = {"min_length": 0, "default": {"pattern": "streaming", "sink": 8, "local": 16, "group_rows": 16}}
EVERY_KEY = {"min_length": 0, "default": {"pattern": "streaming", "sink": 8, "local": 4096, "group_rows": 16}}


def tiny_model():
    torch.manual_seed(0)
    config = LlamaConfig(**TINY)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval()


class CharTokenizer:
    """Just enough of a tokenizer for the needle prompts: one id per character."""

    chat_template = None
    eos_token_id = 0
    bos_token_id = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [1 + ord(c) % 95 for c in text]}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(32 + (int(i) - 1) % 95) for i in ids)


def random_logprobs(rows, vocab, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(rows, vocab, generator=generator) * 3, dim=-1)


def test_kl_per_position_matches_brute_force():
    p, q = random_logprobs(5, 7, 1), random_logprobs(5, 7, 2)
    p[2, 3] = -math.inf  # a zero-probability token: 0 log 0 = 0
    p[2] = torch.log_softmax(p[2], dim=-1)
    expected = [sum(math.exp(a) * (a - b) for a, b in zip(p[t].tolist(), q[t].tolist()) if a > -math.inf)
                for t in range(5)]
    torch.testing.assert_close(kl_per_position(p, q), torch.tensor(expected), rtol=1e-5, atol=1e-6)
    assert torch.allclose(kl_per_position(q, q), torch.zeros(5), atol=1e-6)
    assert (kl_per_position(p, q) >= 0).all()


def test_perplexity_matches_brute_force():
    logprobs, targets = random_logprobs(6, 9, 3), torch.tensor([0, 8, 4, 4, 1, 2])
    nll = -sum(logprobs[t, int(targets[t])].item() for t in range(6)) / 6
    assert perplexity_of(logprobs, targets) == pytest.approx(math.exp(nll), rel=1e-6)


def test_next_token_logprobs_are_the_last_predictions_of_a_full_forward():
    model, ids = tiny_model(), torch.randint(0, 96, (1, 40))
    with torch.no_grad():
        full = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    torch.testing.assert_close(next_token_logprobs(model, ids, 7), full[-8:-1], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="score_last"):
        next_token_logprobs(model, ids, 40)


def test_sweep_makes_one_policy_per_value_and_checks_values():
    policies = {"anchor": load_policy("anchor.yaml"), "streaming": load_policy("streaming.yaml")}
    swept = sweep_policies(policies, parse_sweep(["theta=6,8.5"]))
    assert list(swept) == ["anchor[theta=6.0]", "anchor[theta=8.5]", "streaming"]
    assert swept["anchor[theta=6.0]"].default.as_dict()["theta"] == 6.0
    assert swept["anchor[theta=6.0]"].min_length == policies["anchor"].min_length
    with pytest.raises(PolicyError, match="theta"):
        sweep_policies(policies, parse_sweep(["theta=.inf"]))
    with pytest.raises(PolicyError, match="gamma"):
        sweep_policies(policies, parse_sweep(["gamma=0.9"]))
    with pytest.raises(ValueError, match="PARAM=V1"):
        parse_sweep(["theta"])


def test_sweep_of_the_guard_runs_every_policy_without_and_with_it():
    from sparse_prefill.guard import ErrorGuard

    policies = {"anchor": load_policy("anchor.yaml"), "streaming": load_policy("streaming.yaml")}
    swept = sweep_policies(policies, parse_sweep(["guard.max_error=none,0.5", "theta=6"]))
    assert list(swept) == ["anchor[theta=6.0,guard.max_error=none]", "anchor[theta=6.0,guard.max_error=0.5]",
                           "streaming[guard.max_error=none]", "streaming[guard.max_error=0.5]"]
    assert swept["anchor[theta=6.0,guard.max_error=none]"].guard is None
    assert swept["streaming[guard.max_error=0.5]"].guard == ErrorGuard(0.5, ErrorGuard().rows)
    rows = sweep_policies({"anchor": policies["anchor"]}, parse_sweep(["guard.rows=16"]))
    assert rows["anchor[guard.rows=16]"].guard == ErrorGuard(policies["anchor"].guard.max_error, 16)
    remember = sweep_policies({"anchor": policies["anchor"]}, parse_sweep(["guard.remember=0,16"]))
    assert [p.guard.remember for p in remember.values()] == [0, 16]
    for bad in (["guard.max_error=-1"], ["guard.recall=0.9"], ["guard.remember=-2"]):
        with pytest.raises(PolicyError, match="guard"):
            sweep_policies(policies, parse_sweep(bad))
    with pytest.raises(PolicyError, match="not a per-layer setting"):
        sweep_policies(policies, parse_sweep(["guard.max_error=0.3"]), allow_guard=False)


def test_settings_refuse_what_cannot_be_measured():
    with pytest.raises(ValueError, match="score_last"):
        EvalSettings(lengths=(64, 32), score_last=32)
    with pytest.raises(ValueError, match="depths"):
        EvalSettings(lengths=(64,), score_last=8, needle_depths=(1.5,))


def test_evaluate_end_to_end_on_a_tiny_model():
    model = tiny_model()
    text = torch.randint(1, 96, (1, 200))
    policies = {"streaming": load_policy(STREAMING), "every-key": load_policy(EVERY_KEY)}
    settings = EvalSettings(lengths=(96, 160), score_last=32, needle_depths=(0.5,), needle_new_tokens=2, repeats=1)
    seen = []  # what a cut-off evaluation would have kept after each run
    results = evaluate(model, CharTokenizer(), lambda n: text[:, :n], policies, settings,
                       on_result=lambda so_far: seen.append([m.label for m in so_far]))
    assert seen == [[m.label for m in results[:i]] for i in range(1, len(results) + 1)]
    assert [(m.label, m.length) for m in results] == [
        (label, n) for n in (96, 160) for label in ("dense", "streaming", "every-key")]
    for m in results:
        assert math.isfinite(m.perplexity) and m.kl >= 0 and 0 <= m.top1_agreement <= 1
        assert m.prefill_ms is not None and set(m.needle) == {"0.5"}
        if m.label == "dense":
            assert m.kl == 0 and m.perplexity_change == 0 and m.density == 1.0
        else:
            assert m.sparse_calls == 2 and set(m.layer_density) == {"0", "1"}  # a plan per layer
            assert m.prefill_vs_dense is not None
        # Each layer's attention timed (dense: the dense pattern's SDPA), and their sum.
        assert set(m.layer_attention_ms) == {"0", "1"} and all(ms > 0 for ms in m.layer_attention_ms.values())
        assert m.attention_ms == pytest.approx(sum(m.layer_attention_ms.values()), rel=1e-6, abs=1e-3)
    by = {(m.label, m.length): m for m in results}
    # A window that covers every key is dense attention: same distributions, to rounding.
    assert by[("every-key", 160)].kl < 1e-6 and by[("every-key", 160)].top1_agreement == 1.0
    # Dropping keys changes them, and costs less than everything.
    assert by[("streaming", 160)].kl > 1e-6 and by[("streaming", 160)].density < 0.5
    assert "streaming" in summary_table(results)


def test_a_policy_is_timed_against_a_dense_median_taken_right_after_it(monkeypatch):
    """A GPU that slows as it warms up must not charge the policies for it: the ratio's dense is adjacent."""
    from sparse_prefill.evaluation import whole_model

    patched_runs: list[bool] = []
    medians = iter([100.0, 70.0, 140.0, 60.0, 150.0])  # dense; policy, dense; policy, dense

    def fake_prefill_ms(model, ids, repeats):
        patched_runs.append(getattr(model, "_sparse_prefill_handle", None) is not None)
        return next(medians)

    monkeypatch.setattr(whole_model, "prefill_ms", fake_prefill_ms)
    text = torch.randint(1, 96, (1, 100))
    policies = {"streaming": load_policy(STREAMING), "every-key": load_policy(EVERY_KEY)}
    settings = EvalSettings(lengths=(64,), score_last=16, needle_depths=(), repeats=1)
    results = evaluate(tiny_model(), CharTokenizer(), lambda n: text[:, :n], policies, settings)
    by = {m.label: m for m in results}
    assert patched_runs == [False, True, False, True, False]
    assert by["dense"].prefill_ms == 100.0 and by["dense"].prefill_vs_dense is None
    assert (by["streaming"].prefill_ms, by["streaming"].dense_prefill_ms) == (70.0, 140.0)
    assert by["streaming"].prefill_vs_dense == pytest.approx(0.5)
    assert by["every-key"].prefill_vs_dense == pytest.approx(0.4)


def test_a_guarded_policy_says_so_in_its_result():
    model = tiny_model()
    text = torch.randint(1, 96, (1, 160), generator=torch.Generator().manual_seed(4))
    guarded = load_policy({**STREAMING, "guard": {"max_error": 0.0, "rows": 8}})
    settings = EvalSettings(lengths=(160,), score_last=32, needle_depths=(), repeats=0)
    by = {m.label: m for m in evaluate(model, CharTokenizer(), lambda n: text[:, :n], {"guarded": guarded}, settings)}
    assert by["dense"].guard is None and by["guarded"].guard == {"max_error": 0.0, "rows": 8, "remember": 0}
    assert sum(by["guarded"].dense_plans.values()) > 0 and by["guarded"].kl < 1e-6  # every lossy group ran dense
    assert by["guarded"].attention_ms is None and by["guarded"].layer_attention_ms == {}  # no timing asked


def test_recall_per_layer_is_what_the_policys_plans_keep_on_the_dense_q_and_k():
    from sparse_prefill.evaluation.recall import attention_recall, capture_qk, head_recalls

    model = tiny_model()
    text = torch.randint(1, 96, (1, 160), generator=torch.Generator().manual_seed(3))
    policies = {"streaming": load_policy(STREAMING), "every-key": load_policy(EVERY_KEY)}
    settings = EvalSettings(lengths=(160,), score_last=32, needle_depths=(), repeats=0, recall=True)
    by = {m.label: m for m in evaluate(model, CharTokenizer(), lambda n: text[:, :n], policies, settings)}
    assert by["dense"].recall is None and by["every-key"].recall == pytest.approx(1.0)
    streaming = by["streaming"]
    assert set(streaming.layer_recall) == set(streaming.layer_density) == {"0", "1"}
    q, k = capture_qk(model, text, [1])[1]
    plan = load_policy(STREAMING).identifier(load_policy(STREAMING).default).identify(
        q, k, AttentionContext.for_inputs(q, k))
    assert streaming.layer_recall["1"] == pytest.approx(attention_recall(q, k, plan, 16**-0.5), abs=1e-5)
    assert 0 < streaming.recall < 1
    # the worst head: the lowest of the per-head recalls, which average to the layer's recall
    heads = head_recalls(q, k, [plan], 16**-0.5)[0]
    assert streaming.layer_worst_head["1"] == pytest.approx(float(heads.min()), abs=1e-5)
    assert set(streaming.layer_worst_head) == set(streaming.layer_recall)
    assert streaming.worst_head == min(streaming.layer_worst_head.values())
    assert all(streaming.layer_worst_head[layer] <= streaming.layer_recall[layer] + 1e-9 for layer in ("0", "1"))
    assert by["every-key"].worst_head == pytest.approx(1.0) and by["dense"].worst_head is None
    assert "recall" in summary_table([streaming]) and "worst" in summary_table([streaming])


def test_a_policy_on_one_layer_keeps_that_layers_choices_and_runs_the_rest_dense():
    from sparse_prefill.evaluation.layer_share import policy_on_layer

    policy = load_policy({"min_length": 64, "guard": {"max_error": 0.2, "rows": 8},
                          "default": {"pattern": "streaming", "sink": 8, "local": 16, "group_rows": 16},
                          "overrides": [{"layers": 1, "heads": [1, "3-4"], "pattern": "streaming", "local": 32},
                                        {"layers": "0-1", "heads": [0], "pattern": "dense"}]})
    for layer in (0, 1, 2):
        alone = policy_on_layer(policy, layer, num_heads=6)
        assert alone.min_length == 64 and alone.guard == policy.guard and f"layer {layer} alone" in alone.source
        for other in (0, 1, 2, 3):
            for head in range(6):
                expected = policy.choice_for(layer, head) if other == layer else load_policy(
                    {"default": {"pattern": "dense"}}).default
                assert alone.choice_for(other, head) == expected


def test_layer_kl_shares_find_the_layer_that_loses():
    model = tiny_model()
    text = torch.randint(1, 96, (1, 160), generator=torch.Generator().manual_seed(5))
    only_second = {**STREAMING, "overrides": [{"layers": 0, "pattern": "dense"}]}
    policies = {"streaming": load_policy(STREAMING), "layer 1": load_policy(only_second),
                "every-key": load_policy(EVERY_KEY)}
    settings = EvalSettings(lengths=(160,), score_last=32, needle_depths=(), repeats=0, layer_kl=True)
    by = {m.label: m for m in evaluate(model, CharTokenizer(), lambda n: text[:, :n], policies, settings)}
    assert by["dense"].layer_kl == {}
    assert set(by["streaming"].layer_kl) == {"0", "1"} and all(v > 1e-6 for v in by["streaming"].layer_kl.values())
    # Sparse on layer 1 only: its share is the whole policy's KL, the dense layer's is none.
    assert by["layer 1"].layer_kl["1"] == pytest.approx(by["layer 1"].kl, rel=1e-4, abs=1e-6)
    assert by["layer 1"].layer_kl.get("0", 0.0) < 1e-9
    assert by["streaming"].layer_kl["1"] == pytest.approx(by["layer 1"].kl, rel=1e-4, abs=1e-6)
    assert all(v < 1e-6 for v in by["every-key"].layer_kl.values())


def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    from sparse_prefill.evaluation.plots import plot_needle_heatmap, plot_quality_vs_density, plot_quality_vs_time

    model = tiny_model()
    text = torch.randint(1, 96, (1, 100))
    settings = EvalSettings(lengths=(64,), score_last=16, needle_depths=(0.2, 0.8), needle_new_tokens=1, repeats=1)
    results = evaluate(model, CharTokenizer(), lambda n: text[:, :n], {"streaming": load_policy(STREAMING)}, settings)
    assert all(m.prefill_vs_dense is not None for m in results if m.label != BASELINE_LABEL)
    for plot, name in ((plot_quality_vs_density, "quality.png"), (plot_needle_heatmap, "needle.png"),
                       (plot_quality_vs_time, "time.png")):
        path = plot(results, tmp_path / name, title="tiny")
        assert path.stat().st_size > 1000


def save_tiny_model_with_char_tokenizer(folder):
    """A tiny random Llama and a character-level fast tokenizer, saved as a Hugging Face model folder."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, **{chr(c): 2 + i for i, c in enumerate(range(32, 127))}, "\n": 97}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**{**TINY, "vocab_size": len(vocab)})).save_pretrained(folder)


def test_eval_command_writes_results_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    import json

    from sparse_prefill.cli import main

    save_tiny_model_with_char_tokenizer(tmp_path / "model")
    policy = tmp_path / "streaming.yaml"
    policy.write_text("default:\n  pattern: streaming\n  sink: 8\n  local: 16\n  group_rows: 16\n")
    out = tmp_path / "out"
    code = main(["eval", "--model", str(tmp_path / "model"), "--policy", str(policy), "--sweep", "local=16,32",
                 "--lengths", "96", "--score-last", "16", "--needle-depths", "0.5", "--needle-new-tokens", "2",
                 "--repeats", "1", "--min-length", "0", "--device", "cpu", "--layer-kl", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "results.json").read_text())
    assert [r["label"] for r in report["results"]] == ["dense", "streaming[local=16]", "streaming[local=32]"]
    assert report["complete"] is True and set(report["results"][1]["layer_kl"]) == {"0", "1"}
    assert report["versions"]["torch"] == torch.__version__ and report["settings"]["lengths"] == [96]
    assert (out / "quality_vs_density.png").stat().st_size > 1000 and (out / "needle.png").exists()


@pytest.mark.parametrize("argv, message", [
    (["--lengths", "64", "--score-last", "64"], "score_last"),
    (["--needle-depths", "1.5"], "depths"),
    (["--sweep", "gamma=0.9"], "gamma"),
    (["--sweep", "theta"], "PARAM=V1"),
    (["--out", "/nonexistent-folder/x"], "does not exist"),
])
def test_eval_refuses_bad_arguments_before_loading(tmp_path, capsys, monkeypatch, argv, message):
    from sparse_prefill import cli

    monkeypatch.setattr("sparse_prefill.evaluation.models.load_tokenizer_and_config",
                        lambda *a: pytest.fail("loaded the model"))
    base = ["eval", "--model", str(tmp_path), "--policy", "anchor.yaml", "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(base + argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_the_summary_table_prints_long_labels_whole_and_keeps_its_columns():
    """A sweep's labels differ at their end (``[float8_scores=False]`` / ``[float8_scores=True]``)."""
    labels = ["xattention-sparse[float8_scores=False]", "xattention-sparse[float8_scores=True]", "dense"]
    results = [Measurement(label=label, pattern="xattention", params={}, length=4096, perplexity=25.0,
                           perplexity_change=0.01 * i, kl=0.07, kl_max=0.5, top1_agreement=0.9, density=0.3)
               for i, label in enumerate(labels)]
    lines = summary_table(results).splitlines()
    assert all(label in "\n".join(lines) for label in labels)
    columns = [line.index("4096") for line in lines[1:]]
    assert len(set(columns)) == 1 and lines[0].index("length") < columns[0]


def test_needle_panels_are_titled_with_whole_labels(tmp_path, monkeypatch):
    """Sweep labels differ at their end: each panel's title is its whole label (wrapped)."""
    plt = pytest.importorskip("matplotlib.pyplot")
    from sparse_prefill.evaluation.plots import plot_needle_heatmap

    labels = ["xattention-sparse[float8_scores=False]", "xattention-sparse[float8_scores=True]"]
    results = [Measurement(label=label, pattern="xattention", params={}, length=4096, perplexity=25.0,
                           perplexity_change=0.0, kl=0.07, kl_max=0.5, top1_agreement=0.9, density=0.3,
                           needle={"0.5": True}) for label in labels]
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    plot_needle_heatmap(results, tmp_path / "needle.png")
    titles = [ax.get_title().replace("\n", "") for ax in figures[0].axes]
    assert titles == labels
