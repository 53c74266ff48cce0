"""The app bundle Flower ships to hospitals carries what the two apps import, and nothing else."""

from __future__ import annotations

import io
import subprocess
import sys
import zipfile

import pytest
from flwr.cli.build import build_fab_from_disk

from federimed.config import find_app_dir

# The researcher's, operators' and hospitals' own code: none of it travels in the app bundle.
NOT_FOR_HOSPITALS = tuple(
    f"federimed/{name}"
    for name in ("cli/", "config.py", "research/", "deploy/", "hospital/", "data/synth/")
)

# Building walks the whole folder as `flwr run` does (tens of seconds): once per module.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fab_files() -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(build_fab_from_disk(find_app_dir()))) as fab:
        return {name: fab.read(name) for name in fab.namelist()}


def test_the_bundle_holds_only_app_code(fab_files):
    names = [n for n in fab_files if n.endswith(".py")]
    assert "server_app/server_app.py" in names and "client_app/client_app.py" in names
    assert [n for n in names if n.startswith(NOT_FOR_HOSPITALS)] == []


def test_the_apps_import_from_the_bundle_alone(fab_files, tmp_path):
    """Unpacked on its own, the bundle imports both apps and nothing outside it is needed."""
    for name, content in fab_files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "import server_app.server_app, client_app.client_app, federimed;"
        # what the ClientApp imports when a round of either track starts
        "import federimed.tracks.classify.task, federimed.tracks.generative.task;"
        "assert federimed.__file__.startswith(sys.argv[1]), federimed.__file__;"
        "ours = sorted(m for m in sys.modules if m.split('.')[0] == 'federimed');"
        "print(' '.join(ours))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = done.stdout.split()
    assert "federimed.consortium.run" in loaded and "federimed.tracks.classify.task" in loaded
    outside = (["research"], ["cli"], ["deploy"], ["hospital"])
    assert not [m for m in loaded if m.split(".")[1:2] in outside]
