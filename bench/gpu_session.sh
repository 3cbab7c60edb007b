#!/usr/bin/env bash
# One device-machine session: the test suite on CUDA, llama-3.2-3b (untied) steps, the Hydra entry point.
# Run from the repo root with .whl carried: bash bench/gpu_session.sh  (results under $OUT)
set -u
. bench/device_env.sh
echo "== tests"; timeout 300 python3 -m pytest -q -x tests 2>&1 | tail -15 | tee "$OUT/tests.txt"
echo "== bench"
for args in "--micro-batch 8 --accumulate 4" "--micro-batch 32 --accumulate 1"; do
  timeout 420 python3 bench/step.py --model llama-3.2-3b --untied $args --seq-len 1024 --steps 4 \
    --trace-dir "$OUT/trace_${args// /_}" --out "$OUT/bench.jsonl" 2>&1 | grep -E "^\{|Error|error" | tail -3
done
rm -rf /tmp/run; echo "== train.py"
timeout 240 python3 train.py model=llama-3.2-1b trainer=gpu trainer.max_steps=10 trainer.val_check_interval=10 \
  trainer.limit_val_batches=2 hydra.run.dir=/tmp/run 2>&1 | tr '\r' '\n' | grep -E "Epoch 0: 100%|Error|error|stopped" | tail -4
ls -la /tmp/run/checkpoints 2>&1 | tail -3
