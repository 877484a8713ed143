#!/usr/bin/env bash
# Whole-model quality vs cost on one GPU, as committed in docs/benchmarks/whole_model.md:
#
#     bash benchmarks/eval_gpu.sh gemma MODEL.gguf TOKENIZER_FOLDER OUT_FOLDER
#     bash benchmarks/eval_gpu.sh qwen  MODEL.gguf TOKENIZER_FOLDER OUT_FOLDER
#
# Every shipped sparse policy, anchor's theta swept (both anchor policies) and each baseline's
# main knob at a few settings, so each pattern draws a curve of quality against density. One
# `sparse-prefill eval` per length (each writes OUT/LENGTH/results.json after every run), so a
# time limit costs at most the length it cut. benchmarks/merge_eval.py joins them and plots.
# The tokenizer folder is the model's tokenizer saved by a transformers version that reads its
# GGUF correctly (5.17 misreads Gemma's). LENGTHS="..." overrides the lengths. The longest is
# 32752, not 32768: the needle prompt and its 12 generated tokens must fit the models' 32768 positions.
set -uo pipefail
model_kind=$1 model=$2 tokenizer=$3 out=$4
eval_cmd=(python3 -m sparse_prefill.cli eval --model "$model" --tokenizer "$tokenizer" --no-plots)
case $model_kind in
gemma)  # 3 of 18 layers attend globally: cheap, so every knob gets a curve and the needle 5 depths
    lengths=(16384 24576 32752) per_length_s=200
    args=(--sweep anchor.theta=4,6,7.7,10,12,16 --sweep flexprefill.gamma=0.8,0.9,0.95,0.99
          --sweep streaming.local=512,1024,2048,4096 --needle-depths 0.1 0.3 0.5 0.7 0.9 --repeats 3) ;;
qwen)  # every layer global. FlexPrefill's and vertical-slash's PyTorch identification cost 8-14x a dense
    # prefill here: FlexPrefill at its default only, vertical-slash (dense at 16k: its plans pass dense_above) not
    # at 32k. A second eval gives anchor streaming's 4096-key local window, to separate window from stripes.
    lengths=(16384 32752) per_length_s=230
    args=(--policy anchor.yaml --policy anchor-accurate.yaml --policy flexprefill.yaml --policy streaming.yaml
          --sweep anchor.theta=6,7.7,10,12 --sweep streaming.local=1024,4096 --needle-depths 0.1 0.5 0.9 --repeats 2)
    extra=(--policy anchor.yaml --sweep anchor.theta=6,8,10 --sweep anchor.local=4096
           --needle-depths 0.1 0.5 0.9 --repeats 2) ;;
*) echo "usage: $0 gemma|qwen MODEL TOKENIZER OUT" >&2; exit 2 ;;
esac
read -ra lengths <<< "${LENGTHS:-${lengths[*]}}"
for length in "${lengths[@]}"; do
    mkdir -p "$out/$length"
    timeout "$per_length_s" "${eval_cmd[@]}" "${args[@]}" --lengths "$length" --out "$out/$length" \
        2>&1 | tee "$out/$length/log.txt"
    if [[ -v extra ]]; then
        mkdir -p "$out/$length-local"
        timeout 90 "${eval_cmd[@]}" "${extra[@]}" --lengths "$length" --out "$out/$length-local" \
            2>&1 | tee "$out/$length-local/log.txt"
    fi
done
