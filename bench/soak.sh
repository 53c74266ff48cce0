#!/usr/bin/env bash
# Chaos soak (issue 29): K back-to-back runs on a local federation while a random SuperNode, the
# ServerApp or the SuperLink is SIGKILLed and recovered as an operator would; the checks and
# what each kill cost go to runs/bench-soak/soak.jsonl (table in docs/failures.md).
#   bash bench/soak.sh [--runs 10] [--kills 10] [--minutes 45] [--seed 0]
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python bench/soak.py "$@"
