"""An evaluation's results as a file others can trust: the numbers with the model, machine, versions and commit."""

from __future__ import annotations

import dataclasses
import json
import platform
import subprocess
from pathlib import Path
from typing import Any, Sequence

import torch

from sparse_prefill.evaluation.whole_model import EvalSettings, Measurement

__all__ = ["environment", "write_report", "read_report"]


def _commit() -> str | None:
    """The source checkout's commit (with ``+dirty`` when it has changes), or None outside a checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("+dirty" if dirty else "") if sha else None


def environment(device: torch.device) -> dict[str, Any]:
    """Where a measurement was taken: device name, library versions, commit."""
    import transformers

    import sparse_prefill

    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__, "sparse_prefill": sparse_prefill.__version__}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ModuleNotFoundError:
        pass
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"device": name, "versions": versions, "commit": _commit()}


def write_report(path: str | Path, model: str, settings: EvalSettings, results: Sequence[Measurement],
                 env: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
    """JSON with the model, settings, environment and one record per (label, length)."""
    report = {"model": model, "settings": dataclasses.asdict(settings), **env, **(extra or {}),
              "results": [dataclasses.asdict(m) for m in results]}
    path = Path(path)
    path.write_text(json.dumps(report, indent=1) + "\n")
    return path


def read_report(path: str | Path) -> tuple[dict[str, Any], list[Measurement]]:
    """(the report without its results, the results as :class:`Measurement`) from :func:`write_report`'s file."""
    report = json.loads(Path(path).read_text())
    return {k: v for k, v in report.items() if k != "results"}, [Measurement(**r) for r in report.pop("results")]
