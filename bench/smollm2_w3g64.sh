#!/usr/bin/env bash
# SmolLM2-135M, W3 asymmetric group 64: RTN, OmniQuant-mse and OmniQuant-mse_sw on the same
# 128 x 512 Austen calibration windows (seed 0), perplexity on the first 100 windows of persuasion.txt.
# The two OmniQuant runs use 2 epochs at lr 0.05 (the CPU budget); the library default is 20 epochs at
# lr 1e-2. Usage: bash bench/smollm2_w3g64.sh [OUT_DIR]   (after `python -m bench.assets`)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results/smollm2_w3g64}
assets=${SWQUANT_ASSETS:-$HOME/.cache/swquant/assets}
texts=${SWQUANT_TEXTS:-../shared/data/text}
common=(--model "$assets/smollm2-135m-instruct" --bits 3 --group-size 64 --calib "$assets/austen_calib.txt"
        --n-samples 128 --seq-len 512 --eval "$texts/persuasion.txt" --eval-max-windows 100 --seed 0)
omni=(--method omniquant --method-opt epochs=2 --method-opt lr=0.05)
mkdir -p "$out"
swquant quantize "${common[@]}" --method rtn --out "$out/rtn"
swquant quantize "${common[@]}" "${omni[@]}" --loss mse --out "$out/omni_mse"
swquant quantize "${common[@]}" "${omni[@]}" --loss mse_sw --out "$out/omni_mse_sw"
for run in rtn omni_mse omni_mse_sw; do cp "$out/$run/report.json" "$out/$run.json"; rm -rf "$out/$run"; done
