#!/usr/bin/env bash
# Wall time of the main job at its default size, phase by phase (from report.json).
#   bash bench/demo_time.sh [extra `federimed demo` flags]
set -euo pipefail
cd "$(dirname "$0")/.."
out=runs/bench-demo
rm -rf "$out"
start=$(date +%s)
.venv/bin/federimed demo --out "$out" "$@"
end=$(date +%s)
echo "demo wall time: $((end - start)) s on $(nproc) cores ($(uname -m))"
.venv/bin/python - "$out/report.json" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
print(json.dumps(report["wall_seconds"], indent=2))
for name, h in report["hospitals"].items():
    print(name, {m: round(h[m]["accuracy"], 3) for m in ("federated", "local", "centralized")},
          "unseen", {m: round(h[m].get("unseen_accuracy", float("nan")), 3)
                     for m in ("federated", "local", "centralized")})
PY
