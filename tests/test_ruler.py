"""RULER tasks: prompts sized in tokens with their answers inside, RULER's metric, the runner and the CLI."""

import importlib.util
import json
import re
from collections import Counter

import pytest
import torch

from sparse_prefill.evaluation import ruler
from sparse_prefill.evaluation.ruler import RULER_TASKS, RulerSample, build_samples, string_match_all
from tests.test_whole_model import CharTokenizer, save_tiny_model_with_char_tokenizer, tiny_model

needs_data = pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in ("long_context_eval", "wonderwords")),
    reason=f"RULER data not installed: {ruler.INSTALL_HINT}")
# The largest filler unit of any task, in characters: a distractor needle with two uuids (about 130).
LARGEST_UNIT = 200


class Chars:
    """A lossless character tokenizer (one id per code point), so prompts can be read back exactly."""

    chat_template = None
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(int(i)) for i in ids)


class ChatChars(Chars):
    chat_template = "<user>...</user><assistant>"

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        assert add_generation_prompt and not tokenize and [m["role"] for m in messages] == ["user"]
        return f"<user>{messages[0]['content']}</user><assistant>"


def text_of(sample):
    return Chars().decode(sample.input_ids[0].tolist())


# ----------------------------------------------------------------------------------------------
# The metric

def test_string_match_all_is_the_share_of_answers_found_ignoring_case():
    answers = ["1234567", "ABCDE", "apple-pie", "7654321"]
    assert string_match_all("1234567 abcde Apple-Pie and 7654321", answers) == 1.0
    assert string_match_all("nothing here", answers) == 0.0
    assert string_match_all("1234567 then ABCDE", answers) == 0.5
    assert string_match_all("apple-pie", answers) == 1 / len(answers)
    with pytest.raises(ValueError, match="at least one"):
        string_match_all("x", [])


@needs_data
def test_string_match_all_agrees_with_the_packaged_metric():
    from long_context_eval.eval.synthetic.constants import string_match_all_per_sample

    outputs = ["1234567 abcde", "", "APPLE-pie 7654321 1234567 abcde", "765432"]
    answers = ["1234567", "ABCDE", "apple-pie", "7654321"]
    packaged = string_match_all_per_sample(outputs, [answers] * len(outputs))  # percent
    assert [string_match_all(o, answers) * 100 for o in outputs] == pytest.approx(packaged)


def test_unknown_tasks_are_named_with_the_allowed_ones():
    with pytest.raises(ValueError, match=r"unknown RULER task 'niah'.*allowed: niah_single_1"):
        ruler.check_tasks(["vt", "niah"])


# ----------------------------------------------------------------------------------------------
# Samples

@needs_data
@pytest.mark.parametrize("task", RULER_TASKS)
def test_samples_fill_the_length_and_hold_their_answers(task):
    length = 3000
    samples = build_samples(Chars(), task, length, 3, seed=1)
    assert len(samples) == 3
    for sample in samples:
        n = sample.input_ids.shape[1]
        assert length - LARGEST_UNIT < n <= length  # as many filler units as fit: at most one short
        assert sample.answers and sample.new_tokens == ruler.new_tokens(task) > 0
        text = text_of(sample)
        for answer in sample.answers:
            assert answer in text
    assert len({tuple(s.input_ids[0].tolist()) for s in samples}) == 3  # a sample per index, not one repeated


@needs_data
@pytest.mark.parametrize("task", ["niah_single_2", "niah_multikey_1", "niah_multivalue", "niah_multiquery"])
def test_niah_answers_are_the_values_of_the_queried_keys(task):
    sample = build_samples(Chars(), task, 4000, 1, seed=2)[0]
    text = text_of(sample)
    for answer in sample.answers:
        key = re.search(rf"for (\S+) is: {answer}\.", text).group(1)
        assert key in text[text.rindex("What "):]  # the question asks for that key


@needs_data
def test_vt_answers_are_the_chain_of_the_queried_value():
    sample = build_samples(Chars(), "vt", 3000, 1, seed=3)[0]
    text = text_of(sample)
    first, *rest = sample.answers
    value = re.search(rf"VAR {first} = (\d+)", text).group(1)
    assert f"the value {value} in the text above" in text
    for previous, name in zip(sample.answers, rest):
        assert f"VAR {name} = VAR {previous}" in text


@needs_data
@pytest.mark.parametrize("length", [3000, 12000])  # below and above RULER's 4096 switch of repeats
def test_cwe_answers_are_the_most_common_listed_words(length):
    sample = build_samples(Chars(), "cwe", length, 1, seed=4)[0]
    counts = Counter(re.split(r"\s?\b\d+\. ", text_of(sample)))
    assert {word for word, _ in counts.most_common(len(sample.answers))} == set(sample.answers)


@needs_data
def test_fwe_answers_are_the_most_frequent_coded_words():
    sample = build_samples(Chars(), "fwe", 3000, 1, seed=5)[0]
    counts = Counter(text_of(sample).split())
    del counts["..."]  # the noise word, the most frequent of all
    assert [word for word, _ in counts.most_common(3)] == list(sample.answers)


@needs_data
@pytest.mark.parametrize("task", ["niah_multikey_2", "vt", "cwe"])
def test_samples_are_deterministic_per_seed(task):
    def ids(seed):
        return [s.input_ids[0].tolist() for s in build_samples(Chars(), task, 2000, 2, seed=seed)]

    assert ids(7) == ids(7)
    assert ids(7) != ids(8)


@needs_data
def test_a_chat_template_wraps_the_task_and_the_answer_prefix_starts_the_reply():
    sample = build_samples(ChatChars(), "vt", 2000, 1)[0]
    text = text_of(sample)
    plain = text_of(build_samples(Chars(), "vt", 2000, 1)[0])
    assert text.startswith("<user>") and "</user><assistant>Answer: According to" in text
    assert text.endswith("they are:")  # the prefix, as the start of the reply (its outer spaces go)
    assert plain.endswith("they are: ") and "Answer: According to" in plain


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from sparse_prefill.evaluation.models import load_tokenizer_and_config, locate_model

    return load_tokenizer_and_config(locate_model("smollm2"))[0]


@pytest.mark.slow
@needs_data
@pytest.mark.parametrize("task", ["niah_multikey_1", "vt", "cwe"])
def test_a_real_chat_tokenizer_gets_a_full_chat_prompt(smollm2_tokenizer, task):
    tokenizer, length = smollm2_tokenizer, 4096
    sample = build_samples(tokenizer, task, length, 1)[0]
    assert length - 64 < sample.input_ids.shape[1] <= length  # one filler unit is well under 64 tokens
    text = tokenizer.decode(sample.input_ids[0])
    assert text.startswith("<|im_start|>") and "<|im_end|>\n<|im_start|>assistant\n" in text
    assert all(answer in text for answer in sample.answers)


@needs_data
def test_lengths_too_short_for_a_task_are_refused():
    with pytest.raises(ValueError, match=r"vt needs at least \d+ tokens .* got length 100"):
        build_samples(Chars(), "vt", 100, 1)
    with pytest.raises(ValueError, match="num_samples"):
        build_samples(Chars(), "vt", 2000, 0)


# ----------------------------------------------------------------------------------------------
# The runner and the command line

def test_ruler_score_is_the_mean_over_samples(monkeypatch):
    from sparse_prefill.evaluation import whole_model

    samples = [RulerSample("t", torch.tensor([[i]]), ("a", "b", "c", "d"), 4) for i in range(2)]
    found = {0: "a b c d", 1: "b d"}  # 4 of 4, 2 of 4
    monkeypatch.setattr(whole_model, "greedy_answer", lambda model, tok, ids, n: found[int(ids[0, 0])])
    assert whole_model.ruler_score(None, None, samples) == (1 + 2 / 4) / 2


@needs_data
def test_evaluate_scores_every_label_on_the_same_samples(monkeypatch):
    from sparse_prefill.evaluation import whole_model
    from sparse_prefill.policy import load_policy
    from tests.test_whole_model import STREAMING

    prompts = []  # every prompt a RULER answer was generated for, in order
    real = whole_model.greedy_answer

    def recording(model, tokenizer, ids, new_tokens):
        prompts.append(ids[0].tolist())
        return real(model, tokenizer, ids, new_tokens)

    monkeypatch.setattr(whole_model, "greedy_answer", recording)
    text = torch.randint(1, 96, (1, 700))
    settings = whole_model.EvalSettings(lengths=(700,), score_last=16, needle_depths=(), repeats=0,
                                        ruler_tasks=("niah_single_1",), ruler_samples=2)
    steps = []
    results = whole_model.evaluate(tiny_model(), CharTokenizer(), lambda n: text[:, :n],
                                   {"streaming": load_policy(STREAMING)}, settings,
                                   progress=lambda s: steps.extend(s) or s)
    assert steps == [(700, "dense"), (700, "streaming")]
    assert [m.label for m in results] == ["dense", "streaming"]
    for m in results:
        assert set(m.ruler) == {"niah_single_1"} and 0.0 <= m.ruler["niah_single_1"] <= 1.0
    assert len(prompts) == 4 and prompts[:2] == prompts[2:] and prompts[0] != prompts[1]
    assert all(600 < len(p) <= 700 for p in prompts)
    assert "ruler" in whole_model.summary_table(results).splitlines()[0]


def test_settings_refuse_unknown_tasks_and_no_samples():
    from sparse_prefill.evaluation.whole_model import EvalSettings

    with pytest.raises(ValueError, match="unknown RULER task 'qa_1'"):
        EvalSettings(lengths=(64,), score_last=8, ruler_tasks=("vt", "qa_1"))
    with pytest.raises(ValueError, match="ruler_samples"):
        EvalSettings(lengths=(64,), score_last=8, ruler_tasks=("vt",), ruler_samples=0)
    with pytest.raises(ValueError, match="twice"):
        EvalSettings(lengths=(64,), score_last=8, ruler_tasks=("vt", "vt"))


@pytest.fixture
def refuse_loading(monkeypatch):
    monkeypatch.setattr("sparse_prefill.evaluation.models.load_tokenizer_and_config",
                        lambda *a: pytest.fail("loaded the model"))


def _eval_error(tmp_path, capsys, argv):
    from sparse_prefill.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", str(tmp_path), "--out", str(tmp_path / "o"), "--no-plots", *argv])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_eval_refuses_an_unknown_task_before_loading(tmp_path, capsys, refuse_loading):
    err = _eval_error(tmp_path, capsys, ["--ruler", "vt", "niah"])
    assert "unknown RULER task 'niah'" in err and "niah_multikey_1" in err


def test_eval_names_the_pip_command_when_the_data_is_missing(tmp_path, capsys, refuse_loading, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wonderwords" else
                        find_spec(name, *a))
    err = _eval_error(tmp_path, capsys, ["--ruler", "vt"])
    assert "wonderwords" in err and ruler.INSTALL_HINT in err


@needs_data
def test_eval_refuses_a_length_too_short_for_a_task_before_the_weights(tmp_path, capsys, monkeypatch):
    save_tiny_model_with_char_tokenizer(tmp_path / "model")
    monkeypatch.setattr("sparse_prefill.evaluation.models.load_weights", lambda *a, **k: pytest.fail("loaded"))
    err = _eval_error(tmp_path, capsys, ["--model", str(tmp_path / "model"), "--lengths", "120", "--score-last", "8",
                                         "--needle-depths", "--ruler", "vt"])
    assert "--lengths 120" in err and "vt needs at least" in err


@needs_data
def test_eval_command_writes_ruler_scores(tmp_path):
    from sparse_prefill.cli import main

    save_tiny_model_with_char_tokenizer(tmp_path / "model")
    out = tmp_path / "out"
    code = main(["eval", "--model", str(tmp_path / "model"), "--policy", "streaming.yaml", "--lengths", "600",
                 "--score-last", "16", "--needle-depths", "--repeats", "0", "--min-length", "0", "--device", "cpu",
                 "--ruler", "niah_single_1", "--ruler-samples", "1", "--no-plots", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "results.json").read_text())
    assert report["settings"]["ruler_tasks"] == ["niah_single_1"] and report["settings"]["ruler_samples"] == 1
    assert [set(r["ruler"]) for r in report["results"]] == [{"niah_single_1"}, {"niah_single_1"}]
