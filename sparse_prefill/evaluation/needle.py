"""Needle-in-a-haystack prompts built from real text, sized in the model's own tokens."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

from sparse_prefill.evaluation.models import essay_text

__all__ = ["NeedlePrompt", "build_needle_prompt"]


@dataclass(frozen=True)
class NeedlePrompt:
    """A chat-formatted prompt with one fact hidden at ``depth`` (0 = start, 1 = end) of the text."""

    input_ids: Any  # LongTensor [1, N]
    answer: str
    depth: float

    def found_in(self, text: str) -> bool:
        """Whether the answer appears as a whole number: "17311" or "73110" do not find "7311"."""
        return re.search(rf"(?<![0-9]){re.escape(self.answer)}(?![0-9])", text) is not None


def build_needle_prompt(tokenizer: Any, length: int, depth: float = 0.5, seed: int = 0) -> NeedlePrompt:
    """About ``length`` tokens of essays with a magic number inserted at ``depth``, then the question."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    answer = str(random.Random(seed).randint(1000, 9999))
    needle = f" The special magic number is {answer}. Remember it: the special magic number is {answer}. "
    question = "What is the special magic number mentioned in the text above? Answer with the number only."

    def render(haystack: str) -> list[int]:
        messages = [{"role": "user", "content": f"{haystack}\n\n{question}"}]
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=False)
        return tokenizer(messages[0]["content"])["input_ids"]

    overhead = len(render(needle))
    text_ids = tokenizer(essay_text(min_chars=length * 8), add_special_tokens=False)["input_ids"]
    budget = max(0, length - overhead)
    if len(text_ids) < budget:
        raise ValueError(f"the essays hold {len(text_ids)} tokens of this tokenizer, fewer than the {budget} needed "
                         f"for length {length}; allowed: at most {overhead + len(text_ids)}")
    text_ids = text_ids[:budget]
    cut = int(len(text_ids) * depth)
    haystack = tokenizer.decode(text_ids[:cut]) + needle + tokenizer.decode(text_ids[cut:])
    import torch

    return NeedlePrompt(torch.tensor([render(haystack)]), answer, depth)
