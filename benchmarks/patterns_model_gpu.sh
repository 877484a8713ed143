#!/usr/bin/env bash
# Every pattern on a whole model at one length, by density and by prefill time, as in docs/benchmarks/whole_model.md
# ("Qwen2.5-Coder-0.5B at 32k: every pattern on the GPU"):
#
#     bash benchmarks/patterns_model_gpu.sh MODEL.gguf TOKENIZER_FOLDER OUT_FOLDER
#     python benchmarks/merge_eval.py --model NAME --commit COMMIT --out RECORD OUT/unguarded OUT/guarded
#
# OUT/unguarded: each shipped pattern file with its main knob swept, no guard, the files' dense_above (anchor also
# with a 1024-key window: split it out with a folder suffix, see merge_eval.py). OUT/guarded: anchor.yaml and each
# baseline at one setting under the guard anchor.yaml ships (max_error 0.3), and anchor pooling 32 / 16 query rows
# (4 / 8 pooled rows per 128-row stripe) unguarded. LENGTH (default 32752), SCORE_LAST (1024) and LIMIT (seconds per
# eval, default 540); an empty TOKENIZER_FOLDER uses the model's own tokenizer.
set -uo pipefail
model=$1 tokenizer=$2 out=$3
length=${LENGTH:-32752} limit=${LIMIT:-540}
mkdir -p "$out/unguarded" "$out/guarded" "$out/policies"
common=(--model "$model" --no-plots --lengths "$length" --score-last "${SCORE_LAST:-1024}" --needle-depths
        --min-length 0)
[ -n "$tokenizer" ] && common+=(--tokenizer "$tokenizer")
timeout "$limit" python3 -m sparse_prefill.cli eval "${common[@]}" --out "$out/unguarded" \
    --policy anchor.yaml --policy flexprefill.yaml --policy streaming.yaml --policy vertical-slash.yaml \
    --policy xattention.yaml --policy flashprefill.yaml --sweep guard.max_error=none \
    --sweep anchor.local=128,1024 --sweep anchor.theta=6,7.7,10 --sweep flexprefill.gamma=0.8,0.9,0.95 \
    --sweep streaming.local=1024,2048,4096 --sweep vertical-slash.vertical=1000,2000 \
    --sweep xattention.threshold=0.8,0.9,0.95 --sweep flashprefill.alpha=0.3,0.18,0.05 2>&1 \
    | tee "$out/unguarded/log.txt"
p=$out/policies
guard=$'guard:\n  max_error: 0.3\n'
printf 'default:\n  pattern: xattention\n  threshold: 0.9\n%s' "$guard" > "$p/xattention_g.yaml"
printf 'default:\n  pattern: flexprefill\n  gamma: 0.95\n%s' "$guard" > "$p/flexprefill_g.yaml"
printf 'default:\n  pattern: flashprefill\n  alpha: 0.05\n%s' "$guard" > "$p/flashprefill_g.yaml"
printf 'default:\n  pattern: streaming\n  local: 4096\n%s' "$guard" > "$p/streaming_g.yaml"
printf 'default:\n  pattern: anchor\n  block: 32\n  group_blocks: 4\n' > "$p/anchor_b32.yaml"
printf 'default:\n  pattern: anchor\n  block: 16\n  group_blocks: 8\n' > "$p/anchor_b16.yaml"
timeout "$limit" python3 -m sparse_prefill.cli eval "${common[@]}" --out "$out/guarded" --policy anchor.yaml \
    --policy "$p/xattention_g.yaml" --policy "$p/flexprefill_g.yaml" --policy "$p/flashprefill_g.yaml" \
    --policy "$p/streaming_g.yaml" --policy "$p/anchor_b32.yaml" --policy "$p/anchor_b16.yaml" \
    --sweep anchor.theta=6,7.7,10 --sweep xattention.threshold=0.9,0.95 2>&1 | tee "$out/guarded/log.txt"
