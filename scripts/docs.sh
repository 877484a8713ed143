#!/usr/bin/env bash
# Builds the documentation site in strict mode: a broken link, a missing anchor, a page left out of
# the nav or an API reference that does not resolve fails the build. Writes site/ (or the folder
# given as $1); `python3 -m mkdocs serve` previews the same site while you edit.
set -euo pipefail
cd "$(dirname "$0")/.."
export NO_MKDOCS_2_WARNING=1 HF_HUB_OFFLINE=1
python3 -m mkdocs build --strict --site-dir "${1:-site}"
