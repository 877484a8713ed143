"""Evaluation inputs: essay tokens start with BOS where the model expects it; synthetic Q/K for every head dim."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import AutoTokenizer

from sparse_prefill.evaluation.models import _SMOLLM2_FILE, _SMOLLM2_PACKAGE, _package_dir, essay_text, essay_token_ids
from sparse_prefill.evaluation.synthetic import structured_qkv


class _CharTokenizer:
    """One token per character; like Gemma-3's tokenizer it may add BOS by default (``add_special_tokens``)."""

    bos_token_id = 1_000_000

    def __init__(self, adds_bos: bool) -> None:
        self.adds_bos = adds_bos

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        bos = [self.bos_token_id] if self.adds_bos and add_special_tokens else []
        return {"input_ids": bos + [ord(char) for char in text]}


def _default_encoding_start(tokenizer: Any, num_tokens: int) -> list[int]:
    """The first ``num_tokens`` ids of the tokenizer's default encoding of the essays (its own special tokens)."""
    return tokenizer(essay_text(min_chars=num_tokens * 8))["input_ids"][:num_tokens]


@pytest.mark.parametrize("adds_bos", [True, False], ids=["bos", "no-bos"])
def test_essay_tokens_start_as_the_tokenizer_starts_text(adds_bos: bool) -> None:
    tokenizer = _CharTokenizer(adds_bos)
    ids = essay_token_ids(tokenizer, 100)[0].tolist()
    assert len(ids) == 100 and (ids[0] == tokenizer.bos_token_id) == adds_bos
    assert ids == _default_encoding_start(tokenizer, 100)


@pytest.mark.slow
def test_smollm2_essay_tokens_get_no_bos() -> None:
    """SmolLM2's tokenizer has a BOS token but adds none to text: its inputs (recall.md's numbers) stay as before."""
    tokenizer = AutoTokenizer.from_pretrained(str(_package_dir(_SMOLLM2_PACKAGE, "")), gguf_file=_SMOLLM2_FILE)
    ids = essay_token_ids(tokenizer, 64)[0].tolist()
    assert tokenizer.bos_token_id is not None and tokenizer.bos_token_id not in ids
    assert ids == _default_encoding_start(tokenizer, 64)


def _causal_logits(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Scaled scores [Hq, N, N] of batch 0, K expanded to the query heads, future keys at -inf."""
    n, head_dim = q.shape[2], q.shape[3]
    scores = q[0] @ k[0].repeat_interleave(q.shape[1] // k.shape[1], dim=0).transpose(-1, -2) * head_dim**-0.5
    return scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))


@pytest.mark.parametrize("head_dim", [64, 80, 96, 112, 128, 256])
def test_structured_qkv_has_sink_and_local_diagonal_at_every_head_dim(head_dim: int) -> None:
    q, k, v = structured_qkv(256, 4, 2, head_dim, dtype=torch.float32, device="cpu")
    assert q.shape == (1, 4, 256, head_dim) and k.shape == v.shape == (1, 2, 256, head_dim)
    assert all(bool(t.isfinite().all()) for t in (q, k, v))
    logits = _causal_logits(q, k)
    # The sink: over the last 64 rows (which see keys 0..191), key 0 holds more mass than any other key, per head.
    mass = logits.softmax(dim=-1)[:, 192:, :192].sum(dim=1)
    assert bool((mass[:, 0] > mass[:, 1:].max(dim=-1).values).all())
    # The local diagonal: per head, the nearest keys score higher on average than keys 64 or more rows back.
    offset = torch.arange(256)[:, None] - torch.arange(256)[None]
    near, far = logits[:, (offset >= 1) & (offset <= 4)].mean(-1), logits[:, offset >= 64].mean(-1)
    assert bool((near > far).all())
