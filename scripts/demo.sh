#!/usr/bin/env bash
# The main job on a fresh machine: install, then dense vs sparse prefill side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
sparse-prefill run "$@"
