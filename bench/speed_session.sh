#!/usr/bin/env bash
# Device session for issue #5, part 1: CUDA tests, then megatrain vs the peers (bench/compare.py), one round.
#   bash bench/speed_session.sh [SYSTEMS] [EXTRA compare.py ARGS]   (results under $OUT)
set -u
. bench/device_env.sh
SYSTEMS=${1:-megatrain,fsdp,deepspeed}; shift || true
if [ -z "${SKIP_TESTS:-}" ]; then
  echo "== tests"; timeout 240 python3 -m pytest -q -x tests/test_precision.py tests/test_engine.py 2>&1 | tail -3 | tee -a "$OUT/tests.txt"
fi
echo "== compare $SYSTEMS"
python3 bench/compare.py --model llama-3.2-3b --untied --micro-batch 32 --seq-len 1024 --warmup 2 --steps 3 \
  --rounds 1 --systems "$SYSTEMS" --profile --trace-dir "$OUT/trace" --out "$OUT/compare.jsonl" --timeout 420 "$@" \
  2>&1 | grep -v -i warn | tail -12
(cd "$OUT" && tar czf trace.tgz trace megatrain_step_profile.json 2>/dev/null; rm -rf trace megatrain_step_profile.json)
