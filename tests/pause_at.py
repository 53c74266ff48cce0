"""Run `federimed` with one function replaced by a pause, to signal it at a known phase.

    python tests/pause_at.py MODULE:ATTR[@N] ARGS...

The N-th call (default 1) of MODULE.ATTR prints ``PAUSED`` and blocks; earlier calls run the
real function.  Nothing in the project knows about this: the pause stands where the real work
of that phase would be, so a signal sent after ``PAUSED`` lands inside that phase for sure.
"""

from __future__ import annotations

import importlib
import sys
import time


def main() -> int:
    target, argv = sys.argv[1], sys.argv[2:]
    target, _, nth = target.partition("@")
    module_name, _, path = target.partition(":")
    owner = importlib.import_module(module_name)
    *parents, name = path.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    real = getattr(owner, name)
    calls = []

    def pause(*args, **kwargs):
        calls.append(1)
        if len(calls) < int(nth or 1):
            return real(*args, **kwargs)
        print("PAUSED", flush=True)
        while True:
            time.sleep(0.1)

    setattr(owner, name, pause)
    from federimed.cli import main as federimed

    return federimed(argv)


if __name__ == "__main__":
    sys.exit(main())
