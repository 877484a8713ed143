#!/usr/bin/env bash
# The error guard on a whole model, as in docs/benchmarks/whole_model.md ("A guard at run time"):
#
#     bash benchmarks/guard_gpu.sh MODEL.gguf TOKENIZER_FOLDER OUT_FOLDER
#
# `sparse-prefill eval` at each length (default 32752 tokens of the essays): dense, and the shipped anchor.yaml
# with its guard swept over MAX_ERRORS (default "none 0.3": unguarded, and the shipped setting).
# MAX_ERRORS="...", LENGTHS="...", SCORE_LAST=N, DEPTHS="...", EXTRA="eval options" override the defaults.
set -uo pipefail
model=$1 tokenizer=$2 out=$3
max_errors=${MAX_ERRORS:-none 0.3}
lengths=(${LENGTHS:-32752})
mkdir -p "$out"
for length in "${lengths[@]}"; do
    mkdir -p "$out/$length"
    timeout 280 python3 -m sparse_prefill.cli eval --model "$model" ${tokenizer:+--tokenizer "$tokenizer"} --no-plots \
        --policy anchor.yaml --sweep "guard.max_error=${max_errors// /,}" --lengths "$length" \
        --score-last "${SCORE_LAST:-1024}" --needle-depths ${DEPTHS:-0.1 0.5 0.9} --repeats 2 \
        --out "$out/$length" ${EXTRA:-} 2>&1 | tee "$out/$length/log.txt"
done
