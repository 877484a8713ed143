"""Needle scoring: the answer must appear as a whole number."""

import torch

from sparse_prefill.evaluation.needle import NeedlePrompt


def test_needle_is_found_only_as_a_whole_number():
    prompt = NeedlePrompt(input_ids=torch.zeros(1, 4, dtype=torch.long), answer="7311", depth=0.5)
    assert prompt.found_in("The magic number is 7311.")
    assert prompt.found_in("7311")
    assert not prompt.found_in("The magic number is 17311.")
    assert not prompt.found_in("73110")
    assert not prompt.found_in("73 11")
