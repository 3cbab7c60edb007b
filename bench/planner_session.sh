#!/usr/bin/env bash
# Device session for the planner (issue #3): calibrate this box, run the CUDA tests, then for each shape the
# planner's prediction (calibrated profile and the h200 preset) beside a measured, traced bench/step.py run.
# Run from the repo root with .whl carried: bash bench/planner_session.sh  (results under $OUT)
set -u
. bench/device_env.sh
echo "== calibrate"; timeout 150 python3 -m planner.calibrate --out conf/hardware/local.yaml --disk-path /tmp --disk-mib 2048 \
  | tee "$OUT/local.yaml"
echo "== tests"; timeout 200 python3 -m pytest -q -x tests/test_precision.py tests/test_engine.py tests/test_planner.py 2>&1 \
  | tail -4 | tee "$OUT/tests.txt"
run() {  # name, planner overrides, bench args
  for hw in local h200; do
    python3 -m planner.check hardware=$hw trainer=gpu $2 --json > "$OUT/plan_$1_$hw.json"
  done
  timeout 300 python3 bench/step.py $3 --steps 3 --trace-dir "$OUT/trace_$1" --out "$OUT/bench.jsonl" 2>&1 \
    | grep -E "^\{|Error|error" | tail -3
}
echo "== shapes"
run 3b_32x1 "model=llama-3.2-3b +model.tie_embeddings=false data.seq_len=1024 data.micro_batch=32" \
  "--model llama-3.2-3b --untied --micro-batch 32 --accumulate 1 --seq-len 1024"
run 100b_3l_4x1 "model=llama100b +model.n_layer=3 data.seq_len=1024 data.micro_batch=4 storage.stream=master" \
  "--model llama100b --n-layer 3 --micro-batch 4 --accumulate 1 --seq-len 1024 --stream master"
run 3b_8x4 "model=llama-3.2-3b +model.tie_embeddings=false data.seq_len=1024 data.micro_batch=8 trainer.accumulate_grad_batches=4" \
  "--model llama-3.2-3b --untied --micro-batch 8 --accumulate 4 --seq-len 1024"
# the device tool returns a limited number of files: one archive for the traces
(cd "$OUT" && tar czf traces.tgz trace_* && rm -rf trace_*)
