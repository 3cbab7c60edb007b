#!/usr/bin/env bash
# Device session for issue #5, part 2: megatrain without clipping (eager updates), memory flat in depth
# (16 vs 32 layers of the 3B width), the llama100b layer shape at truncated depth, and 3B at sequence 32768.
set -u
. bench/device_env.sh
B="python3 bench/step.py --out $OUT/scale.jsonl"
echo "== eager (no clipping)"
timeout 200 python3 bench/compare.py --model llama-3.2-3b --untied --micro-batch 32 --seq-len 1024 --warmup 2 \
  --steps 3 --rounds 1 --systems megatrain --clip 0 --profile --out "$OUT/compare_noclip.jsonl" 2>&1 | grep -E "^\{|median" | tail -2
for L in 16 32; do
  echo "== depth $L"; timeout 150 $B --model llama-3.2-3b --untied --n-layer $L --micro-batch 32 --seq-len 1024 --steps 2 2>&1 | grep -E "^\{|Error" | tail -2
done
echo "== 3b seq 32768"; timeout 200 $B --model llama-3.2-3b --untied --micro-batch 1 --seq-len 32768 --steps 2 2>&1 | grep -E "^\{|Error" | tail -2
echo "== llama100b 3 layers"; timeout 240 $B --model llama100b --n-layer 3 --micro-batch 4 --seq-len 1024 --steps 3 --trace-dir "$OUT/trace100b" 2>&1 | grep -E "^\{|Error" | tail -2
(cd "$OUT" && tar czf trace100b.tgz trace100b 2>/dev/null; rm -rf trace100b)
