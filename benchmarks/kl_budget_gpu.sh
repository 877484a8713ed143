#!/usr/bin/env bash
# Per-layer anchor settings chosen by a KL budget, then judged on other text, as in
# docs/benchmarks/whole_model.md ("Calibrated by KL"):
#
#     bash benchmarks/kl_budget_gpu.sh MODEL.gguf TOKENIZER_FOLDER OUT_FOLDER
#
# 1. `sparse-prefill calibrate --kl-budget`: each layer runs each anchor setting alone (theta x local
#    window) on 32752 essay tokens from token 65536; one policy per budget, each checked whole.
# 2. `sparse-prefill eval` at 32752 and 16384 tokens on the first tokens of the essays (text the
#    calibration never saw): dense, anchor.yaml, the calibrated policies, and anchor keeping every key
#    (theta 1e9, no dense fallback: what the sparse path alone costs, the floor of any sparse policy),
#    each with its per-layer attention recall (--recall).
# BUDGETS="...", LENGTHS="...", THETAS=a,b LOCALS=a,b, CAL_TOKENS=N, SCORE_LAST=N and POLICY=FILE override the defaults (a CPU smoke test
# uses them with a tiny model).
set -uo pipefail
model=$1 tokenizer=$2 out=$3
budgets=(${BUDGETS:-0.005 0.02 0.05})
lengths=(${LENGTHS:-32752 16384})
cal_tokens=${CAL_TOKENS:-32752} policy=${POLICY:-anchor.yaml} score_last=${SCORE_LAST:-1024}
mkdir -p "$out"
cat > "$out/every-key.yaml" <<'EOF'
# anchor through the Triton path with every key selected: the sparse path's own error
min_length: 0
default:
  pattern: anchor
  theta: 1.0e+9
  dense_above: 1.0
EOF
timeout 300 python3 -m sparse_prefill.cli calibrate --model "$model" --tokenizer "$tokenizer" --policy "$policy" \
    --kl-budget "${budgets[@]}" --options "theta=${THETAS:-4,6,8,10,12}" --options "local=${LOCALS:-128,1024,4096}" \
    --tokens "$cal_tokens" --text-offset 65536 --score-last "$score_last" --out "$out/$(basename "$policy")" --record "$out/calibration.json" \
    2>&1 | tee "$out/calibrate.log"
name=$(basename "$policy" .yaml)
if [[ ${#budgets[@]} -eq 1 ]]; then  # one budget writes --out itself: name it as several would
    mv "$out/$name.yaml" "$out/$name-kl${budgets[0]}.yaml"
fi
policies=(--policy "$policy" --policy "$out/every-key.yaml")
for budget in "${budgets[@]}"; do
    policies+=(--policy "$out/$name-kl$budget.yaml")
done
for length in "${lengths[@]}"; do
    mkdir -p "$out/$length"
    timeout 130 python3 -m sparse_prefill.cli eval --model "$model" --tokenizer "$tokenizer" --no-plots \
        "${policies[@]}" --lengths "$length" --score-last "$score_last" --recall --needle-depths 0.1 0.5 0.9 --repeats 2 --out "$out/$length" \
        2>&1 | tee "$out/$length/log.txt"
done
