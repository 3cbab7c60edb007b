#!/usr/bin/env bash
# Device session for the file-backed tier: CUDA test suite; llama-3.2-1b steps with storage=ram and with
# storage=nvme under a 10 GiB RAM budget (achieved disk rates per step); the planner's prediction of both;
# train.py with storage=nvme saving a checkpoint and a second process resuming from it.
# Run from the repo root with .whl carried: bash bench/nvme_session.sh  (results under $OUT)
set -u
. bench/device_env.sh
df -h . | tee -a "$OUT/device.txt"
echo "== tests"; timeout 240 python3 -m pytest -q -x tests 2>&1 | tail -4 | tee "$OUT/tests.txt"
ARGS="--model llama-3.2-1b --micro-batch 8 --seq-len 1024 --steps 3"
for storage in ram nvme; do
  echo "== bench $storage"
  timeout 240 python3 bench/step.py $ARGS --storage $storage --ram-budget-GiB 10 --nvme-dir nvme_state \
    --out "$OUT/bench.jsonl" 2>&1 | grep -E "^\{|Error|error" | tail -3
  timeout 60 python3 -m planner.check model=llama-3.2-1b trainer=gpu hardware=h200 storage=$storage $([ $storage = nvme ] && echo storage.ram_budget_GiB=10) \
    data.seq_len=1024 data.micro_batch=8 > "$OUT/plan_$storage.txt" 2>&1
  grep -E "step|NVMe|bottleneck" "$OUT/plan_$storage.txt" | head -8
done
echo "== train.py storage=nvme: save, then resume in a new process"
rm -rf /tmp/run
T="model=llama-3.2-1b trainer=gpu storage=nvme storage.ram_budget_GiB=10 data.micro_batch=4 data.seq_len=512 \
   trainer.val_check_interval=2 trainer.limit_val_batches=2 hydra.run.dir=/tmp/run"
timeout 200 python3 train.py $T trainer.max_steps=2 2>&1 | tr '\r' '\n' | grep -E "NVMe|stopped|Error|error" | tail -5
ls -la /tmp/run/checkpoints | tee "$OUT/checkpoints.txt"
timeout 200 python3 train.py $T trainer.max_steps=4 resume=/tmp/run/checkpoints hydra.run.dir=/tmp/run2 2>&1 \
  | tr '\r' '\n' | grep -E "resuming|Restored|NVMe|stopped|Error|error" | tail -6
cp /tmp/run2/logs/version_0/metrics.csv "$OUT/resumed_metrics.csv" 2>/dev/null
rm -rf /tmp/run /tmp/run2 nvme_state
