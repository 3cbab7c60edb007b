#!/usr/bin/env bash
# Device session for issue #5: device-kept state (device_state_GiB) against host-only updates and FSDP cpu_offload,
# llama-3.2-3b untied, 32x1024, clip 1.0. CUDA tests first.   bash bench/kept_session.sh [BUDGETS] (results under $OUT)
set -u
. bench/device_env.sh
BUDGETS=${1:-0 39 auto}
if [ -z "${SKIP_TESTS:-}" ]; then
  echo "== tests"; timeout 240 python3 -m pytest -q -x --tb=short --show-capture=no tests/test_precision.py tests/test_engine.py > "$OUT/tests.txt" 2>&1
  tail -3 "$OUT/tests.txt"
fi
for b in $BUDGETS; do
  arg=(); [ "$b" != auto ] && arg=(--device-state-GiB "$b")
  echo "== megatrain device_state_GiB=$b"
  python3 bench/compare.py --model llama-3.2-3b --untied --micro-batch 32 --seq-len 1024 --warmup 2 --steps 4 \
    --rounds 1 --systems megatrain --profile --trace-dir "$OUT/trace-$b" --out "$OUT/compare.jsonl" --timeout 300 \
    "${arg[@]}" 2>&1 | grep -E "^megatrain|median" | tail -2
  mv "$OUT/megatrain_step_profile.json" "$OUT/trace-$b/" 2>/dev/null
done
if [ -n "${PEERS:-}" ]; then
  echo "== $PEERS"
  python3 bench/compare.py --model llama-3.2-3b --untied --micro-batch 32 --seq-len 1024 --warmup 2 --steps 4 \
    --rounds 1 --systems "$PEERS" --out "$OUT/compare.jsonl" --timeout 400 2>&1 | grep -E "^(fsdp|deepspeed)|median" | tail -3
fi
(cd "$OUT" && tar czf traces.tgz trace-* && rm -rf trace-*)
