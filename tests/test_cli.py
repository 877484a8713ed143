"""The CLI's argument handling and the comparison tables: checked before any model loads."""

import argparse
import contextlib
import re
import time

import pytest
import torch

from sparse_prefill.cli import UsageError, build_parser, common, main
from sparse_prefill.cli.checks import check_numbers
from sparse_prefill.cli.common import check_device, check_layers, device_and_dtype, max_positions, policies_from_args
from sparse_prefill.evaluation import models
from sparse_prefill.demo import RunResult, format_side_by_side
from sparse_prefill.evaluation import BASELINE_LABEL
from sparse_prefill.evaluation.needle import NeedlePrompt
from sparse_prefill.policy import PolicyError


def _args(*policies: str) -> argparse.Namespace:
    return argparse.Namespace(policy=list(policies) or None, min_length=None)


def test_policy_labels_never_replace_each_other_or_the_baseline(tmp_path):
    other = tmp_path / "anchor.yaml"
    other.write_text("default: {pattern: anchor, theta: 4.0}\n")
    labels = list(policies_from_args(_args("anchor.yaml", str(other), "dense.yaml")))
    assert len(labels) == 3 and BASELINE_LABEL not in labels
    assert labels[0] == "anchor" and labels[1] == str(other)


def test_the_same_policy_twice_is_an_error():
    with pytest.raises(PolicyError, match="given twice"):
        policies_from_args(_args("anchor.yaml", "anchor.yaml", "anchor.yaml"))


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:1"])
def test_any_cuda_device_defaults_to_bfloat16(device):
    assert device_and_dtype(argparse.Namespace(device=device, dtype=None)) == (device, torch.bfloat16)
    assert device_and_dtype(argparse.Namespace(device="cpu", dtype=None))[1] == torch.float32


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
        check_numbers(args)
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
        compare_dense_and_sparse(None, None, None, {BASELINE_LABEL: "dense.yaml"})


# Every bad argument below must be refused before the weights load (a minute on a CPU): argparse's
# exit 2 with one `sparse-prefill <cmd>: error: ...` line that names the argument and what is allowed.


class WeightsLoaded(AssertionError):
    pass


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if anything starts loading model weights."""
    def refuse(*args, **kwargs):
        raise WeightsLoaded("model weights were loaded")

    monkeypatch.setattr(models, "load_weights", refuse)
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", refuse)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answers on a GPU machine


@pytest.fixture(scope="module")
def smollm2_files():
    """The packaged model's tokenizer and config, loaded once for the module (about 5 s: GGUF parsed twice)."""
    files = models.locate_model()
    return files, models.load_tokenizer_and_config(files)


@pytest.fixture
def smollm2(no_weights, smollm2_files, monkeypatch):
    """As `no_weights`, with the packaged model's tokenizer and config from the module's one load."""
    monkeypatch.setattr(models, "load_tokenizer_and_config", lambda files: smollm2_files[1])


def _refused(argv, capsys) -> str:
    """The one error line of a refused command line."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(f"sparse-prefill {argv[0]}: error: "), errors
    return errors[0]


def _folder(path, *names) -> str:
    path.mkdir(exist_ok=True)
    for name in names:
        (path / name).write_text("{}")
    return str(path)


@pytest.mark.parametrize("argv, expected", [
    (["run", "--depth", "2.0"], ["--depth", "[0, 1]", "2.0"]),
    (["run", "--depth", "-0.1"], ["--depth", "[0, 1]"]),
    (["run", "--max-new-tokens", "0"], ["--max-new-tokens", ">= 1", "got 0"]),
    (["run", "--device", "cuda"], ["--device cuda", "no cuda", "allowed here: cpu"]),
    (["perplexity", "--device", "gpu0"], ["--device 'gpu0'", "not a device", "allowed here: cpu"]),
    (["calibrate", "--out", "x.yaml", "--device", "cuda:1"], ["--device cuda:1", "allowed here: cpu"]),
    (["run", "--model", "/no/such/model"], ["--model /no/such/model", "no such folder", ".gguf", "smollm2"]),
    (["perplexity", "--model", "/no/such/model.gguf"], ["--model /no/such/model.gguf", "no such .gguf file"]),
    (["calibrate", "--out", "x.yaml", "--model", "/no/such"], ["--model /no/such", "no such folder"]),
    (["calibrate", "--out", "/no/such/folder/x.yaml"], ["--out /no/such/folder/x.yaml", "does not exist"]),
    (["calibrate", "--out", "x.yaml", "--policy", "streaming.yaml"],
     ["--policy streaming.yaml", "default pattern is 'anchor'", "'streaming'"]),
    (["run", "--policy", "no-such-policy.yaml"], ["no-such-policy.yaml", "no such policy file"]),
])
def test_bad_arguments_are_refused_before_anything_loads(argv, expected, no_weights, monkeypatch, capsys):
    monkeypatch.setattr(models, "load_tokenizer_and_config", _fail_tokenizer)
    line = _refused(argv, capsys)
    assert all(part in line for part in expected), line


def _fail_tokenizer(files):
    raise AssertionError("the tokenizer was loaded for a check that needs none")


def test_a_model_folder_needs_a_config_and_a_tokenizer(tmp_path, no_weights, capsys):
    no_config = _folder(tmp_path / "a", "tokenizer.json")
    assert "no config.json" in _refused(["run", "--model", no_config], capsys)
    no_tokenizer = _folder(tmp_path / "b", "config.json")
    line = _refused(["perplexity", "--model", no_tokenizer], capsys)
    assert f"--model {no_tokenizer}" in line and "no tokenizer" in line and "tokenizer.json" in line
    # Files that are there but unreadable: transformers' error, cut to its first line.
    broken = _folder(tmp_path, "config.json", "tokenizer.json")
    (tmp_path / "config.json").write_text("not json")
    assert "cannot load its tokenizer and config" in _refused(["run", "--model", broken], capsys)


def test_calibrate_refuses_an_out_path_it_could_not_write(tmp_path, no_weights, monkeypatch, capsys):
    assert "is a folder" in _refused(["calibrate", "--out", str(tmp_path)], capsys)
    (tmp_path / "file").write_text("")
    assert "is not a folder" in _refused(["calibrate", "--out", str(tmp_path / "file" / "x.yaml")], capsys)
    monkeypatch.setattr(common.os, "access", lambda path, mode: False)  # root may write anywhere: stand in for it
    assert "not writable" in _refused(["calibrate", "--out", str(tmp_path / "x.yaml")], capsys)


@pytest.mark.parametrize("argv, expected", [
    (["run", "--length", "8192"], ["--length 8192 needs 8216 positions with --max-new-tokens 24",
                                   "8192 (max_position_embeddings)", "allowed: --length <= 8168"]),
    (["perplexity", "--length", "9000"], ["--length 9000", "8192 (max_position_embeddings)", "<= 8192"]),
    (["calibrate", "--out", "x.yaml", "--tokens", "10000"], ["--tokens 10000", "8192", "<= 8192"]),
    (["calibrate", "--out", "x.yaml", "--layers", "0", "30", "99"], ["--layers 30 99", "30 layers", "0..29"]),
])
def test_arguments_beyond_the_model_are_refused_from_its_config(argv, expected, smollm2, capsys):
    line = _refused(argv, capsys)
    assert all(part in line for part in expected), line


@pytest.mark.parametrize("argv", [["run", "--length", "2000"], ["perplexity", "--length", "2000"],
                                  ["calibrate", "--out", "x.yaml", "--tokens", "2000"]])
def test_lengths_beyond_the_essays_are_refused_with_the_tokens_there(argv, smollm2, monkeypatch, capsys):
    short = "A short essay about nothing much. " * 20
    monkeypatch.setattr(models, "essay_text", lambda min_chars=None: short)
    monkeypatch.setattr("sparse_prefill.evaluation.needle.essay_text", lambda min_chars=None: short)
    line = _refused(argv, capsys)
    assert f"{argv[-2]} 2000: the essays hold" in line and "allowed: at most" in line, line


@pytest.mark.parametrize("argv", [["run", "--length", "8000"], ["perplexity", "--length", "8192"],
                                  ["calibrate", "--out", "OUT", "--layers", "0", "29"]])
def test_arguments_within_bounds_reach_the_weights(argv, smollm2, tmp_path):
    argv = [str(tmp_path / "x.yaml") if arg == "OUT" else arg for arg in argv]
    with pytest.raises(WeightsLoaded):
        main(argv)


def test_the_packaged_tokenizer_and_config_load_in_seconds(no_weights, monkeypatch, capsys):
    """The one test here on the real (not cached) loading path: `--layers 99` needs the config."""
    start = time.perf_counter()
    assert "--layers 99" in _refused(["calibrate", "--out", "x.yaml", "--layers", "99"], capsys)
    assert time.perf_counter() - start < 30


def test_device_check_follows_the_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for device in (None, "cpu", "cuda", "cuda:0", "cuda:1"):
        check_device(device)
    with pytest.raises(UsageError, match=r"no cuda device 2; allowed here: cpu, cuda, cuda:0, cuda:1"):
        check_device("cuda:2")


def test_layers_and_positions_are_checked_against_the_config():
    from transformers import LlamaConfig, Qwen2Config

    check_layers([0, 29], 30)
    check_layers(None, 30)
    with pytest.raises(UsageError, match=r"--layers 30: .*allowed: 0\.\.29"):
        check_layers([0, 30], 30)
    assert max_positions(LlamaConfig(max_position_embeddings=8192)) == 8192
    # YaRN extends Qwen2.5 to 4 x 32768 while its config keeps max_position_embeddings at 32768.
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    assert max_positions(Qwen2Config(max_position_embeddings=32768, rope_scaling=yarn)) == 131072


def test_version_names_the_package_and_what_it_runs_on(capsys):
    import sparse_prefill
    from sparse_prefill.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"sparse-prefill {sparse_prefill.__version__} (torch ")
    assert "transformers" in out and "triton" in out


# --help of every command, pattern parameters and executors: what a user reads before running anything.


def _subparsers():
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices


@pytest.mark.parametrize("command", sorted(_subparsers()))
def test_every_command_has_a_description_and_shows_its_defaults(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines; defaults may span two
    sub = _subparsers()[command]
    assert sub.description and " ".join(sub.description.split()) in text
    # Every option with a default to show shows it (None and False: the help says in words what happens).
    for action in sub._actions:
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            assert f"(default: {action.default})" in text or "default" in action.help, action.option_strings


def test_the_command_list_describes_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert {choice.dest for choice in commands._choices_actions} == set(_subparsers())
    for choice in commands._choices_actions:
        assert choice.help and f"{choice.dest} {' '.join(choice.help.split())}" in out


def test_patterns_name_lists_each_parameter_with_default_and_what_is_allowed(capsys):
    from sparse_prefill.registry import get_pattern

    assert main(["patterns", "anchor"]) == 0
    lines = capsys.readouterr().out.splitlines()
    spec = get_pattern("anchor")
    for name, param in spec.parameters.items():
        line = next(line for line in lines if line.split()[:1] == [name])
        assert repr(param.default) in line and param.allowed() in line and param.help in line
    theta = next(line for line in lines if line.split()[:1] == ["theta"])
    assert "float" in theta


def test_parameters_say_what_their_checks_allow():
    from sparse_prefill.registry import get_pattern

    params = get_pattern("anchor").parameters
    assert params["sink"].allowed() == "int, >= 0"
    assert params["dense_above"].allowed() == "float, a density in (0, 1]"
    assert params["share_kv_heads"].allowed() == "true or false"
    for spec in (get_pattern(name) for name in ("anchor", "flexprefill", "streaming", "vertical-slash")):
        for param in spec.parameters.values():  # every built-in check says what it allows
            assert "accepts" not in param.allowed(), (spec.name, param)


def test_an_unknown_pattern_name_is_refused_with_the_registered_ones(capsys):
    from sparse_prefill.registry import available_patterns

    line = _refused(["patterns", "anchr"], capsys)
    assert "unknown pattern 'anchr'" in line
    assert all(info.name in line for info in available_patterns())


def test_executors_lists_each_registered_executor_with_what_it_supports(capsys):
    from sparse_prefill.registry import get_registry

    assert main(["executors"]) == 0
    out = capsys.readouterr().out
    for executor in get_registry().executors():
        heading = next(i for i, line in enumerate(out.splitlines()) if line.startswith(f"{executor.name} "))
        details = out.splitlines()[heading + 1]
        assert f"priority {executor.priority}" in out.splitlines()[heading]
        assert all(kind.__name__ in details for kind in executor.plan_kinds)
        assert all(device in details for device in executor.devices)


# run and perplexity end to end on the packaged tokenizer with a tiny random model in place of the weights:
# what ran under each policy, and a progress bar per prefill over the decoder layers.


@pytest.fixture
def tiny_weights(smollm2, smollm2_files, monkeypatch):
    """A two-layer random Llama with the packaged tokenizer's vocabulary stands in for the weights (seconds)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = smollm2_files[1][1].get_text_config().vocab_size
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=8192)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    monkeypatch.setattr(models, "load_weights", lambda *args, **kwargs: model)
    return model


def _what_ran(out: str) -> dict[str, str]:
    lines = out.splitlines()
    start = lines.index("what ran:")
    return dict(line.strip().split(": ", 1) for line in lines[start + 1:] if line.startswith("  "))


def test_perplexity_says_what_ran_under_each_policy_and_shows_progress_when_asked(tiny_weights, capsys):
    assert main(["perplexity", "--length", "300", "--policy", "streaming.yaml", "--policy", "dense.yaml",
                 "--progress"]) == 0
    captured = capsys.readouterr()
    summaries = _what_ran(captured.out)
    assert list(summaries) == ["streaming", "dense.yaml"]  # "dense" names the unpatched baseline
    assert all(summary.startswith("2 attention call(s) ran sparse, mean density") for summary in summaries.values())
    # One bar per prefill (dense, then each policy), each over the model's two layers to the end.
    assert _bars(captured.err) == {("dense", 300), ("streaming.yaml", 300), ("dense.yaml", 300)}
    for label in ("dense", "streaming.yaml", "dense.yaml"):
        assert re.search(rf"prefill {label}, 300 tokens: 100%.* 2/2 ", captured.err), label
    assert not any(layer._forward_hooks or layer._forward_pre_hooks for layer in tiny_weights.model.layers)


def _bars(err: str) -> set[tuple[str, int]]:
    """(label, tokens) of each progress bar written to stderr."""
    return {(label, int(tokens)) for label, tokens in re.findall(r"prefill (\S+), (\d+) tokens", err)}


def test_run_tells_why_a_policy_stayed_dense_and_shows_bars_for_prefills_only(tiny_weights, capsys):
    assert main(["run", "--length", "400", "--max-new-tokens", "3", "--policy", "anchor.yaml",
                 "--min-length", "-1", "--progress"]) == 0
    captured = capsys.readouterr()
    (summary,) = _what_ran(captured.out).values()
    assert summary.startswith("0 attention call(s) ran sparse")
    assert "shorter than the policy's min_length" in summary and "dense by design" in summary
    # The decode steps (one token each) draw no bar: one per prefill, the prompt's length.
    bars = _bars(captured.err)
    assert {label for label, _ in bars} == {"dense", "anchor.yaml"} and all(n >= 400 for _, n in bars)


def test_notices_of_what_the_policy_chose_show_with_verbose_only(tiny_weights, capsys):
    argv = ["perplexity", "--length", "300", "--policy", "anchor.yaml", "--min-length", "-1", "--no-progress"]
    assert main(argv) == 0
    assert "min_length" not in capsys.readouterr().err
    assert main([*argv, "-v"]) == 0
    told = [line for line in capsys.readouterr().err.splitlines() if "min_length" in line]
    assert len(told) == 1 and told[0].startswith("sparse-prefill: INFO: ") and "anchor.yaml" in told[0]


def test_eval_says_what_ran_under_each_policy_at_each_length(tiny_weights, tmp_path, capsys):
    assert main(["eval", "--lengths", "300", "--policy", "streaming.yaml", "--needle-depths", "--repeats", "0",
                 "--score-last", "100", "--no-plots", "--out", str(tmp_path)]) == 0
    summaries = _what_ran(capsys.readouterr().out)
    assert list(summaries) == ["streaming at 300"]
    assert summaries["streaming at 300"].startswith("2 attention call(s) ran sparse, mean density")


def test_eval_with_timing_says_how_much_of_each_prefill_is_attention(tiny_weights, tmp_path, capsys):
    assert main(["eval", "--lengths", "300", "--policy", "streaming.yaml", "--needle-depths", "--repeats", "1",
                 "--score-last", "100", "--no-plots", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    lines = out.split("attention time, summed over layers in one timed forward")[1].splitlines()[1:3]
    assert lines[0].startswith("  dense at 300: ") and "ms prefill" in lines[0]
    assert lines[1].startswith("  streaming at 300: ") and "of dense's attention" in lines[1]
    costliest = lines[1].split("costliest layers against their dense: ")[1].split(", ")
    assert sorted(entry.split()[0] for entry in costliest) == ["0", "1"]  # the tiny model's two layers, by ratio
    ratios = [float(entry.split()[1]) for entry in costliest]
    assert ratios == sorted(ratios, reverse=True) and all(ratio > 0 for ratio in ratios)


def test_progress_follows_the_terminal_unless_asked(tiny_weights, monkeypatch):
    from sparse_prefill.cli.common import progress_bars

    for isatty, flag, shown in ((True, None, True), (False, None, False), (False, True, True), (True, False, False)):
        monkeypatch.setattr(common.sys.stderr, "isatty", lambda: isatty)
        context = progress_bars(argparse.Namespace(progress=flag), tiny_weights)
        assert isinstance(context, contextlib.nullcontext) != shown
