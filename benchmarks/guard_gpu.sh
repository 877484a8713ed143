#!/usr/bin/env bash
# The error guard on a whole model, as in docs/benchmarks/whole_model.md ("A guard at run time"):
#
#     bash benchmarks/guard_gpu.sh MODEL.gguf TOKENIZER_FOLDER OUT_FOLDER
#
# `sparse-prefill eval` at each length (default 32752 and 16384 tokens of the essays): dense, anchor.yaml,
# and anchor with a guard at each max_error (default 0.3 0.5 0.8; 64 sampled rows; min_length 16384).
# MAX_ERRORS="...", LENGTHS="...", SCORE_LAST=N, EXTRA="eval options" override the defaults.
set -uo pipefail
model=$1 tokenizer=$2 out=$3
max_errors=(${MAX_ERRORS:-0.3 0.5 0.8})
lengths=(${LENGTHS:-32752 16384})
score_last=${SCORE_LAST:-1024}
mkdir -p "$out"
policies=(--policy anchor.yaml)
for error in "${max_errors[@]}"; do
    printf 'min_length: 16384\ndefault:\n  pattern: anchor\nguard:\n  max_error: %s\n' "$error" \
        > "$out/anchor-guard$error.yaml"
    policies+=(--policy "$out/anchor-guard$error.yaml")
done
for length in "${lengths[@]}"; do
    mkdir -p "$out/$length"
    timeout 240 python3 -m sparse_prefill.cli eval --model "$model" --tokenizer "$tokenizer" --no-plots \
        "${policies[@]}" --lengths "$length" --score-last "$score_last" --needle-depths 0.1 0.5 0.9 --repeats 2 \
        --out "$out/$length" ${EXTRA:-} 2>&1 | tee "$out/$length/log.txt"
done
