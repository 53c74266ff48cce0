"""The track seam: a third track is one module plus its registration, and every place that
depends on the track (the ClientApp, the server's global model, the hospital's guard, the
data layout, the run config, the report, the web app) reaches it through the registry."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import toy_track
from conftest import client_train_reply, make_run
from flwr.app import ArrayRecord

from federimed import tracks
from federimed.consortium.global_model import global_model_for
from federimed.data.records import Federation
from federimed.hospital.guard import Counts, count_cases
from federimed.runconfig import RunConfigError
from federimed.webapp.served import model_kind

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def toy(monkeypatch, tmp_path):
    """The toy track registered for this test only, and a federation's folder for it."""
    monkeypatch.setattr(tracks, "_registered", dict(tracks._registered))
    tracks.register(toy_track.TRACK)
    for name, notes in {"hospital-1": ["a b", "a b c d"], "hospital-2": ["a b c d e f"]}.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "notes.txt").write_text("\n".join(notes) + "\n")
        (folder / "notes-validation.txt").write_text("one two three\n")
    (tmp_path / "notes-test.txt").write_text("w w w w\n")
    return tmp_path


def test_the_run_config_and_data_layout_take_a_registered_track(toy):
    run = make_run(track="notes-length", test_path=str(toy))
    assert run.test_set == toy / "notes-test.txt"  # the track names its test file
    assert run.unseen_style_test_set is None
    assert run.base_model == run.model  # its model_key
    assert Federation.from_folder(toy, "notes-length").test_path == toy / "notes-test.txt"
    assert "notes-length" in tracks.names()


def test_the_client_app_and_the_server_run_the_registered_track(toy, tmp_path):
    run = make_run(track="notes-length", test_path=str(toy))
    arrays = ArrayRecord({"mean": torch.tensor([0.0])})
    reply = client_train_reply(run.to_flower(), toy / "hospital-1", arrays)
    assert reply.content["arrays"].to_torch_state_dict()["mean"].item() == 1.5  # (0 + 3) / 2
    assert reply.content["metrics"]["num_examples"] == 2.0

    server_model = global_model_for(run, tmp_path / "out")
    assert isinstance(server_model, toy_track.NotesLengthModel)
    server_model.load(1, reply.content["arrays"])
    assert server_model.score(1) == {"error": 2.5}  # the test notes have 4 words
    folder = server_model.save_final()
    assert model_kind(folder) == "notes-length"  # the web app recognises the saved model
    assert tracks.track_for("notes-length").load_model(folder)[0] == 1.5


def test_the_guard_counts_cases_with_the_track_s_own_code(toy):
    assert count_cases(toy / "hospital-1", "notes-length") == Counts(2, 1)


def test_a_track_nobody_registered_is_refused_by_name(toy):
    with pytest.raises(RunConfigError, match=r"track: .*no such track \(known: .*notes-length"):
        make_run(track="translate")
    with pytest.raises(tracks.UnknownTrack, match="'translate'"):
        count_cases(toy / "hospital-1", "translate")


def test_no_code_outside_the_tracks_compares_a_track_name():
    """The seam holds only if nothing branches on a track's name behind its back."""
    names = "classify|generative"
    branch = re.compile(rf"""(==|!=)\s*["']({names})["']|["']({names})["']\s*(==|!=)""")
    sources = [*ROOT.glob("federimed/**/*.py"), *ROOT.glob("*_app/*.py")]
    found = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in sources
        if "tracks" not in path.parts
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if branch.search(line)
    ]
    assert len(sources) > 50 and found == []
