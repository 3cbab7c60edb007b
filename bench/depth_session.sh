#!/usr/bin/env bash
# Device session for issue #5 (session 5): memory in depth (16 vs 32 layers of the 3B width) with every update on
# the host and with the default kept-state budget, and the llama100b layer shape at truncated depth (default).
set -u
. bench/device_env.sh
B="python3 bench/step.py --out $OUT/scale.jsonl --untied --micro-batch 32 --seq-len 1024 --steps 3"
for D in 0 auto; do
  arg=(); [ "$D" != auto ] && arg=(--device-state-GiB "$D")
  for L in 16 32; do
    echo "== depth $L device_state_GiB=$D"
    timeout 150 $B --model llama-3.2-3b --n-layer $L "${arg[@]}" 2>&1 | grep -E "^\{|Error" | tail -1 | cut -c1-400
  done
done
echo "== llama100b 3 layers"
timeout 240 python3 bench/step.py --out $OUT/scale.jsonl --model llama100b --n-layer 3 --micro-batch 4 --seq-len 1024 \
  --steps 3 2>&1 | grep -E "^\{|Error" | tail -1 | cut -c1-400
