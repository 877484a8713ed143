#!/usr/bin/env bash
# The test suite, CPU only: Triton kernels run under the interpreter (TRITON_INTERPRET=1).
set -euo pipefail
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=1 HF_HUB_OFFLINE=1
python3 -m pytest -q "$@"
