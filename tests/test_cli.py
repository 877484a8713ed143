"""The CLI's argument handling and the comparison tables: checked before any model loads."""

import argparse

import pytest
import torch

from sparse_prefill.cli import _check_numbers, _device_and_dtype, _policies, build_parser, main
from sparse_prefill.demo import RunResult, format_side_by_side
from sparse_prefill.evaluation import BASELINE_LABEL
from sparse_prefill.evaluation.needle import NeedlePrompt
from sparse_prefill.policy import PolicyError


def _args(*policies: str) -> argparse.Namespace:
    return argparse.Namespace(policy=list(policies) or None, min_length=None)


def test_policy_labels_never_replace_each_other_or_the_baseline(tmp_path):
    other = tmp_path / "anchor.yaml"
    other.write_text("default: {pattern: anchor, theta: 4.0}\n")
    labels = list(_policies(_args("anchor.yaml", str(other), "dense.yaml")))
    assert len(labels) == 3 and BASELINE_LABEL not in labels
    assert labels[0] == "anchor" and labels[1] == str(other)


def test_the_same_policy_twice_is_an_error():
    with pytest.raises(PolicyError, match="given twice"):
        _policies(_args("anchor.yaml", "anchor.yaml", "anchor.yaml"))


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:1"])
def test_any_cuda_device_defaults_to_bfloat16(device):
    assert _device_and_dtype(argparse.Namespace(device=device, dtype=None)) == (device, torch.bfloat16)
    assert _device_and_dtype(argparse.Namespace(device="cpu", dtype=None))[1] == torch.float32


@pytest.mark.parametrize("argv", [
    ["perplexity", "--length", "100", "--score-last", "100"],
    ["perplexity", "--length", "100", "--score-last", "-3"],
    ["perplexity", "--length", "1"],
    ["run", "--min-length", "-7"],
    ["calibrate", "--out", "unused.yaml", "--layers", "-1"],
])
def test_impossible_numbers_are_refused_before_loading_a_model(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert argv[-2] in capsys.readouterr().err


def test_score_last_default_fits_short_texts():
    parser = build_parser()
    for length, given, expected in ((1000, None, 999), (4096, None, 1024), (300, 0, 299), (300, 50, 50)):
        argv = ["perplexity", "--length", str(length)] + ([] if given is None else ["--score-last", str(given)])
        args = parser.parse_args(argv)
        _check_numbers(parser, args)
        assert args.score_last == expected


def test_side_by_side_columns_fit_long_labels():
    prompt = NeedlePrompt(input_ids=torch.zeros(1, 10, dtype=torch.long), answer="7311", depth=0.5)
    labels = [BASELINE_LABEL, "anchor-accurate", "streaming"]
    results = [RunResult(label, "7311", True, 0.5, 1.0, 2, 0) for label in labels]
    header = format_side_by_side(prompt, results).splitlines()[1]
    assert header.split() == labels


def test_comparisons_refuse_a_policy_labelled_like_the_baseline():
    from sparse_prefill.demo import compare_dense_and_sparse
    from sparse_prefill.evaluation.perplexity import compare_perplexity

    with pytest.raises(ValueError, match=BASELINE_LABEL):
        compare_perplexity(None, torch.zeros(1, 4, dtype=torch.long), {BASELINE_LABEL: "dense.yaml"})
    with pytest.raises(ValueError, match=BASELINE_LABEL):
        compare_dense_and_sparse("unused", {BASELINE_LABEL: "dense.yaml"}, 100)
