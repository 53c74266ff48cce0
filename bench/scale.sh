#!/usr/bin/env bash
# Round time and memory against the number of hospitals on this one machine (tiny model,
# TLS, node authentication, 3 rounds): one JSON line per N, appended to runs/bench-scale.jsonl.
#   bash bench/scale.sh 2 5 10 20
set -euo pipefail
cd "$(dirname "$0")/.."
nodes=("$@")
[ ${#nodes[@]} -gt 0 ] || nodes=(2 5 10 20)
for n in "${nodes[@]}"; do
    rm -rf "runs/bench-scale/$n"
    .venv/bin/python bench/scale.py "$n" | tee -a runs/bench-scale.jsonl
done
