#!/usr/bin/env bash
# Anchor calibrated per (layer, KV group) with a floor on every query head, then judged on other text against dense,
# the shipped anchor.yaml, anchor unguarded and XAttention, as in docs/benchmarks/whole_model.md ("Per KV group"):
#
#     bash benchmarks/kv_group_gpu.sh MODEL.gguf TOKENIZER_FOLDER OUT_FOLDER
#     python benchmarks/merge_eval.py --model NAME --commit COMMIT --out RECORD OUT/LENGTH
#
# 1. `sparse-prefill calibrate --per-kv-group` on CAL_TOKENS (default 32752) essay tokens from token 65536: every
#    (layer, KV group) at each theta (and LOCALS windows, default the policy's 128 keys), one measurement; one policy
#    per head floor in FLOORS (default 0.8 0.9), mean recall TARGET (0.95); the measurement kept in OUT/record.json
#    (`calibrate --per-kv-group --from-record` allocates other floors or targets from it without the model).
# 2. `sparse-prefill eval` at LENGTHS (default 32752) on the first essay tokens (never calibrated on): dense,
#    anchor.yaml (guarded), the base unguarded (theta 7.7), each calibrated policy, XAttention at threshold 0.9
#    unguarded (the pattern that led at every density on Qwen2.5-Coder-0.5B at 32k), with per-layer recall.
#    CAL_FLAGS="--one-call-per-layer" adds calibrate flags, EXTRA="--layer-kl" (say) eval flags, BASELINES=0 judges
#    the calibrated policies against dense alone; LIMIT (seconds per step, default 280). ONE_CALL=1 also judges,
#    beside each floor's per-group policy, the one setting per layer chosen from the same record
#    (`--from-record --one-call-per-layer`, OUT/policies/layers-floorF.yaml): which one is faster is the question
#    (a per-group policy splits a layer into calls only where a dense group sits beside sparse ones). An empty
#    TOKENIZER_FOLDER uses the model's own tokenizer; a CPU smoke test: MODEL smollm2,
#    CAL_TOKENS=512 LENGTHS=512 SCORE_LAST=256.
set -uo pipefail
model=$1 tokenizer=$2 out=$3
floors=(${FLOORS:-0.8 0.9})
lengths=(${LENGTHS:-32752})
limit=${LIMIT:-280}
tok=()
[ -n "$tokenizer" ] && tok=(--tokenizer "$tokenizer")  # empty: the model's own (a packaged model's name)
mkdir -p "$out/policies"
p=$out/policies
printf 'min_length: 0\ndefault:\n  pattern: anchor\n' > "$p/base.yaml"
printf 'min_length: 0\ndefault:\n  pattern: xattention\n  threshold: 0.9\n' > "$p/xattention.yaml"
timeout "$limit" python3 -m sparse_prefill.cli calibrate --model "$model" "${tok[@]}" \
    --policy "$p/base.yaml" --per-kv-group --min-head-recall "${floors[@]}" --target-recall "${TARGET:-0.95}" \
    ${LOCALS:+--locals $LOCALS} ${CAL_FLAGS:-} --tokens "${CAL_TOKENS:-32752}" --text-offset 65536 \
    --out "$p/groups.yaml" --record "$out/record.json" \
    2>&1 | tee "$out/calibrate.log"
policies=()
[[ ${BASELINES:-1} != 0 ]] && policies=(--policy anchor.yaml --policy "$p/base.yaml" --policy "$p/xattention.yaml")
if [[ ${#floors[@]} -eq 1 ]]; then
    mv "$p/groups.yaml" "$p/groups-floor${floors[0]}.yaml"
fi
for floor in "${floors[@]}"; do
    policies+=(--policy "$p/groups-floor$floor.yaml")
done
if [[ ${ONE_CALL:-0} != 0 ]]; then
    python3 -m sparse_prefill.cli calibrate --policy "$p/base.yaml" --per-kv-group --from-record "$out/record.json" \
        --one-call-per-layer --min-head-recall "${floors[@]}" --target-recall "${TARGET:-0.95}" --out "$p/layers.yaml" \
        2>&1 | tee -a "$out/calibrate.log"
    [[ ${#floors[@]} -eq 1 ]] && mv "$p/layers.yaml" "$p/layers-floor${floors[0]}.yaml"
    for floor in "${floors[@]}"; do
        policies+=(--policy "$p/layers-floor$floor.yaml")
    done
fi
for length in "${lengths[@]}"; do
    mkdir -p "$out/$length"
    timeout "$limit" python3 -m sparse_prefill.cli eval --model "$model" "${tok[@]}" --no-plots \
        "${policies[@]}" --lengths "$length" --score-last "${SCORE_LAST:-1024}" --recall --needle-depths 0.1 0.5 0.9 \
        --repeats 3 ${EXTRA:-} --out "$out/$length" 2>&1 | tee "$out/$length/log.txt"
done
