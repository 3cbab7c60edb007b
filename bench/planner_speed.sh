#!/usr/bin/env bash
# Wall time of `python -m planner.check` for every model preset (issue #3: under 2 s on the 2-core CI machine).
for m in $(ls conf/model | sed 's/.yaml//'); do
  s=$(date +%s.%N); python3 -m planner.check model=$m hardware=h200 trainer=gpu data.seq_len=4096 > /dev/null; rc=$?
  printf "%-20s rc=%d %.2f s\n" "$m" "$rc" "$(echo "$(date +%s.%N) - $s" | bc)"
done
