#!/usr/bin/env bash
# Gemma-3-270M's three full-attention layers (5, 11, 17) calibrated two ways and judged on the whole model against
# every pattern and the `oracle` bound. Run on an H100 at 75aac1a: docs/benchmarks/whole_model.md, "Calibrated at
# 32k beside the bound, on the GPU" (a first call's KL step, compiling the kernels, needs more than 140 s):
#
#     bash benchmarks/gemma_gpu.sh MODEL.gguf TOKENIZER_FOLDER OUT calibrate
#     bash benchmarks/gemma_gpu.sh MODEL.gguf TOKENIZER_FOLDER OUT eval 32752 16384 24576
#     python benchmarks/merge_eval.py --model gemma-3-270m --commit COMMIT --out RECORD OUT/32752 OUT/16384 ...
#
# calibrate: on CAL_TOKENS (default 32752) essay tokens from token 65536, with a base of anchor at min_length 0 and
# no guard (anchor.yaml's min_length 32000 would leave 16k and 24k dense):
#   - by KL: each layer alone runs anchor theta 4-16 x local window 128 / 1024 / 4096 and XAttention threshold
#     0.8 / 0.9 / 0.95 (the rest dense); per-layer settings within BUDGETS (default 0.004 0.008 0.016 nats), each
#     checked whole. The target is KL <= 0.008 on other text, and held-out KL has moved up to 3x the budget;
#     KL_TEXTS="65536 98304" calibrates on two texts, each option at its worst KL (default: the first alone).
#   - by recall: a theta and local window per layer (Gemma has one KV group) keeping mean recall 0.95 with every
#     query head at 0.8 or 0.9, and 0.98 with heads at 0.9 (`--from-record`, no second measurement); RECALL=0
#     skips it.
# eval LENGTH...: one `sparse-prefill eval` per length on the first essay tokens (never calibrated on), each within
# LIMIT seconds (default 240): dense, anchor.yaml (guarded), anchor unguarded at theta 6 / 7.7 / 10 / 12, the
# calibrated policies, XAttention 0.8 / 0.9 / 0.95, FlexPrefill, FlashPrefill and streaming at their defaults,
# and the `oracle` pattern at recall 0.9 / 0.95 (the best 128-row stripes: the bound), with per-layer recall and
# the needle at 5 depths. ONLY="kl-kl*" judges only the OUT/policies files matching that glob, with no sweep (the
# two-text run of whole_model.md, "The KL calibration on two texts, on the GPU"). The longest length is 32752: the
# needle prompt and its 12 generated tokens must fit the model's 32768 positions.
set -uo pipefail
model=$1 tokenizer=$2 out=$3 step=$4
shift 4
p=$out/policies
mkdir -p "$p"
cli=(python3 -m sparse_prefill.cli)
budgets=(${BUDGETS:-0.004 0.008 0.016})

unguarded() {  # unguarded NAME PATTERN [KEY VALUE]...: a policy for every prefill length, no guard
    local name=$1 pattern=$2
    shift 2
    { printf 'min_length: 0\ndefault:\n  pattern: %s\n' "$pattern"
      while (($#)); do printf '  %s: %s\n' "$1" "$2"; shift 2; done; } > "$p/$name.yaml"
}

case $step in
calibrate)
    unguarded base anchor
    common=(--model "$model" --tokenizer "$tokenizer" --policy "$p/base.yaml" --layers 5 11 17
            --tokens "${CAL_TOKENS:-32752}")
    kl_texts=(${KL_TEXTS:-65536})
    timeout "${CAL_LIMIT:-200}" "${cli[@]}" calibrate "${common[@]}" --text-offset "${kl_texts[@]}" \
        --kl-budget "${budgets[@]}" \
        --options theta=4,5,6,7.7,9.5,11,13,16 --options local=128,1024,4096 \
        --options xattention.threshold=0.8,0.9,0.95 --score-last "${SCORE_LAST:-1024}" \
        --out "$p/kl.yaml" --record "$out/kl_record.json" 2>&1 | tee "$out/calibrate_kl.log"
    [[ ${RECALL:-1} == 0 ]] && exit 0  # RECALL=0: the KL calibration alone
    timeout "${CAL_LIMIT:-200}" "${cli[@]}" calibrate "${common[@]}" --text-offset 65536 --per-kv-group \
        --locals 128 1024 --min-head-recall 0.8 0.9 --target-recall 0.95 --out "$p/recall95.yaml" \
        --record "$out/recall_record.json" 2>&1 | tee "$out/calibrate_recall.log"
    "${cli[@]}" calibrate --policy "$p/base.yaml" --per-kv-group --from-record "$out/recall_record.json" \
        --min-head-recall 0.9 --target-recall 0.98 --out "$p/recall98-floor0.9.yaml" \
        2>&1 | tee -a "$out/calibrate_recall.log"
    ;;
eval)
    unguarded anchor-theta6 anchor theta 6
    unguarded anchor-theta10 anchor theta 10
    unguarded anchor-theta12 anchor theta 12
    unguarded xattention xattention
    unguarded flexprefill flexprefill
    unguarded flashprefill flashprefill
    unguarded oracle-0.95 oracle recall 0.95
    unguarded oracle-0.9 oracle recall 0.9
    # the most wanted first: a cut run keeps them
    policies=(--policy anchor.yaml --policy "$p/base.yaml")
    for file in "$p"/kl-kl*.yaml; do [[ -e $file ]] && policies+=(--policy "$file"); done
    policies+=(--policy "$p/oracle-0.9.yaml" --policy "$p/oracle-0.95.yaml" --policy "$p/xattention.yaml")
    for file in "$p"/recall95-floor*.yaml "$p"/recall98-floor*.yaml; do [[ -e $file ]] && policies+=(--policy "$file"); done
    policies+=(--policy "$p/anchor-theta6.yaml" --policy "$p/anchor-theta10.yaml" --policy "$p/anchor-theta12.yaml"
               --policy "$p/flashprefill.yaml" --policy "$p/flexprefill.yaml" --policy streaming.yaml)
    sweep=(--sweep xattention.threshold=0.8,0.9,0.95)
    if [[ -n ${ONLY:-} ]]; then
        policies=() sweep=()
        for file in "$p"/$ONLY.yaml; do [[ -e $file ]] && policies+=(--policy "$file"); done
        ((${#policies[@]})) || { echo "ONLY=$ONLY matches no policy in $p" >&2; exit 2; }
    fi
    for length in "$@"; do
        mkdir -p "$out/$length"
        timeout "${LIMIT:-240}" "${cli[@]}" eval --model "$model" --tokenizer "$tokenizer" --no-plots \
            "${policies[@]}" "${sweep[@]}" --lengths "$length" \
            --score-last "${SCORE_LAST:-1024}" --recall --needle-depths 0.1 0.3 0.5 0.7 0.9 --repeats 2 \
            --out "$out/$length" 2>&1 | tee "$out/$length/log.txt"
    done
    ;;
*) echo "usage: $0 MODEL TOKENIZER OUT calibrate|eval LENGTH..." >&2; exit 2 ;;
esac
