#!/usr/bin/env bash
# One device-machine session, parameterized (results under $OUT):
#   bash bench/gpu_session.sh ["STEP.PY ARGS" ...]
# - tests: pytest ${TESTS:-tests} on CUDA (SKIP_TESTS=1 skips), all its output in $OUT/tests_full.txt;
# - bench: bench/step.py once per argument string, for this tree and for each tree in $TREES (an A/B against an
#   older commit extracted beside it: TREES=.prev; a list naming "." sets the whole order, e.g. TREES=".prev . .prev ."
#   to interleave), every line tagged with its tree in $OUT/bench.jsonl;
# - train.py: a short llama-3.2-1b run through the Hydra entry point (SKIP_TRAIN=1 skips);
# - KERNELS="kernels.py ARGS": bench/kernels.py first (host AdamW, a block eager vs compiled, --attention: SDPA alone
#   and a block's memory), lines into $OUT/kernels.jsonl;
# - COMPARE="compare.py ARGS": bench/compare.py (megatrain against the peers in one process), into $OUT/compare.jsonl;
# - CALIBRATE=1: python -m planner.calibrate for this box, into $OUT/local.yaml.
# These replace the per-issue *_session.sh scripts of earlier sessions (git history has them).
set -u
. bench/device_env.sh
if [ -n "${CALIBRATE:-}" ]; then
  echo "== calibrate"; timeout 150 python3 -m planner.calibrate --out "$OUT/local.yaml" --disk-path /tmp --disk-mib 2048
fi
if [ -n "${KERNELS:-}" ]; then
  echo "== kernels $KERNELS"; timeout 420 python3 bench/kernels.py $KERNELS 2>&1 | grep -E "^\{|Error" | tee -a "$OUT/kernels.jsonl"
fi
if [ -z "${SKIP_TESTS:-}" ]; then
  # the whole output comes back in tests_full.txt (a failure's assertion message is above the last lines)
  echo "== tests"; timeout 420 python3 -m pytest -q -x ${TESTS:-tests} 2>&1 | tee "$OUT/tests_full.txt" | tail -15 \
    | tee "$OUT/tests.txt"
fi
if [ -n "${COMPARE:-}" ]; then
  echo "== compare $COMPARE"; timeout 540 python3 bench/compare.py $COMPARE --out "$OUT/compare.jsonl" 2>&1 \
    | grep -E "^\{|median|Error" | tail -8 | cut -c1-400
fi
trees=${TREES:-}
case " $trees " in *" . "*) ;; *) trees=". $trees" ;; esac
for args in "$@"; do
  for tree in $trees; do
    echo "== bench [$tree] $args"
    (cd "$tree" && PYTHONPATH=/tmp/site:. timeout 420 python3 bench/step.py $args) 2>&1 | grep -E "^\{|Error|error|Killed" \
      | tail -3 | sed "s|^{|{\"tree\": \"$tree\", |" | tee -a "$OUT/bench.jsonl" | cut -c1-400
  done
done
if [ -z "${SKIP_TRAIN:-}" ]; then
  rm -rf /tmp/run; echo "== train.py"
  timeout 240 python3 train.py model=llama-3.2-1b trainer=gpu trainer.max_steps=10 trainer.val_check_interval=10 \
    trainer.limit_val_batches=2 hydra.run.dir=/tmp/run 2>&1 | tr '\r' '\n' | grep -E "train\]|Error|error" | tail -8
  ls -la /tmp/run/checkpoints 2>&1 | tail -3
fi
