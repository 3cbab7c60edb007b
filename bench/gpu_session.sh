#!/usr/bin/env bash
# One device-machine session: the test suite on CUDA, llama-3.2-3b (untied) steps, the Hydra entry point.
# Run from the repo root with .whl carried: bash bench/gpu_session.sh  (results under $OUT)
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:. || exit 1
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)" | tee -a "$OUT/device.txt"
free -g | tee -a "$OUT/device.txt"
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
