#!/usr/bin/env bash
# Device session for issue #5: prefetch depth and checkpoint interval K under the current engine (llama-3.2-3b
# untied, 32x1024, clip 1.0, device_state_GiB=39), one run each.   bash bench/sweep_session.sh (results under $OUT)
set -u
. bench/device_env.sh
for cfg in "2 1" "3 1" "2 2"; do
  set -- $cfg
  echo "== prefetch_depth=$1 checkpoint_interval=$2"
  python3 bench/compare.py --model llama-3.2-3b --untied --micro-batch 32 --seq-len 1024 --warmup 2 --steps 4 \
    --rounds 1 --systems megatrain --device-state-GiB 39 --prefetch-depth "$1" --checkpoint-interval "$2" \
    --out "$OUT/sweep.jsonl" --timeout 200 2>&1 | grep -E "^megatrain" | tail -1
done
