#!/usr/bin/env bash
# Wall time of the main job at its default size, phase by phase (from report.json), and the
# same in reference steps (bench/reference_step.py, timed just before and just after the demo
# on this machine), the figure that compares machines of different speed:
#   bash bench/demo_time.sh [extra `federimed demo` flags, e.g. --track generative]
set -euo pipefail
cd "$(dirname "$0")/.."
out=runs/bench-demo
rm -rf "$out"
reference() {
    .venv/bin/python bench/reference_step.py --threads 2 --steps 10 |
        .venv/bin/python -c 'import json, sys; print(json.load(sys.stdin)["seconds_per_step"])'
}
before=$(reference)
start=$(date +%s)
.venv/bin/federimed demo --out "$out" "$@"
end=$(date +%s)
after=$(reference)
echo "demo wall time: $((end - start)) s on $(nproc) cores ($(uname -m))"
.venv/bin/python - "$out/report.json" "$((end - start))" "$before" "$after" <<'PY'
import json, sys
from pathlib import Path

from federimed.research.measures import measures
from federimed.runrecord import read_report

report = read_report(Path(sys.argv[1]))
wall, before, after = float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
step = (before + after) / 2
print(f"reference step: {before:.3f} s before, {after:.3f} s after; "
      f"demo = {wall / step:.0f} reference steps")
print(json.dumps(report.wall_seconds, indent=2))
for number, r in report.rounds.items():
    train = r.train.values()
    slowest = max(m["compute_seconds"] for m in train)
    print(f"round {number}: {r.seconds:.1f} s, slowest compute {slowest:.1f} s, "
          f"overhead {r.seconds / slowest:.2f}; start-up "
          + ", ".join(f"{m['startup_seconds']:.1f}" for m in train) + " s; load "
          + ", ".join(f"{m['load_seconds']:.1f}" for m in train) + " s")
shown = measures(report)
for name, h in report.hospitals.items():
    methods = {m: h.method(m) for m in ("federated", "local", "centralized") if h.method(m)}
    print(name, shown.headline, {m: round(s[shown.headline], 3) for m, s in methods.items()},
          "unseen", {m: round(s[shown.unseen], 3) for m, s in methods.items()})
PY
