"""What a ClientApp sends: the LoRA adapter and the head, never base weights, never text."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from conftest import client_train_reply, make_run, plant_marker, train_task
from flwr.app import ArrayRecord

from federimed.consortium.checks import as_sent, decoded_update, record_bytes
from federimed.hospital import ledger
from federimed.hospital.policy import approve
from federimed.learning import wire
from federimed.learning.model import (
    WIRE_ARRAY,
    build_classifier,
    count_parameters,
    exchanged_state,
    from_wire,
    to_wire,
)

MARKER = "ZEBRA-MARKER-7f3c"


@pytest.fixture
def marked_hospital(tmp_path, synth_data):
    folder = tmp_path / "hospital-1"
    shutil.copytree(synth_data / "hospital-1", folder)
    plant_marker(folder, MARKER)
    return folder


BUNDLE = b"the approved bundle"


@pytest.fixture
def site_policy(tmp_path, monkeypatch):
    """The hospital's policy, as its SuperNode's guard reads it (default floors)."""
    path = tmp_path / "site" / "policy.yaml"
    approve(path, hashlib.sha256(BUNDLE).hexdigest(), site="hospital-1")
    monkeypatch.setenv("FEDERIMED_SITE_POLICY", str(path))
    return path


def _set_policy(path, **changes) -> None:
    data = yaml.safe_load(path.read_text())
    data.update(changes)
    path.write_text(yaml.safe_dump(data))


def test_client_reply_holds_only_adapter_and_head_and_no_text(tiny_model, marked_hospital):
    run = make_run(model=tiny_model, local_steps=2, max_length=64)
    model = build_classifier(tiny_model, run.label_list, run.lora)
    initial = ArrayRecord(to_wire(exchanged_state(model)))
    reply = client_train_reply(run.to_flower(), marked_hospital, initial)
    arrays = reply.content["arrays"]
    assert list(arrays.keys()) == [WIRE_ARRAY]  # one array: one object per hop (model.to_wire)
    names = list(from_wire(model, arrays.to_torch_state_dict()))
    head = (".classifier.", ".pooler.")
    assert all("lora_" in n or any(h in n for h in head) for n in names), names
    trainable, total = count_parameters(model)
    sent = sum(int(a.numpy().size) for a in arrays.values())
    assert sent == trainable
    assert sent < total / 10  # the frozen encoder stays home
    # Nothing in the reply (arrays, metrics, identity) carries the hospital's text.
    payload = b"".join(a.data for a in arrays.values())
    scalars = json.dumps({k: dict(v) for k, v in reply.content.items() if k != "arrays"})
    assert MARKER.encode() not in payload
    assert MARKER not in scalars
    metrics = reply.content["metrics"]
    assert set(metrics.keys()) == {
        "val_accuracy",
        "val_loss",
        "train_loss",
        "num_examples",
        "startup_seconds",
        "load_seconds",
        "compute_seconds",
    }
    assert all(metrics[f"{phase}_seconds"] > 0 for phase in ("startup", "load", "compute"))
    assert sorted(reply.content.keys()) == ["arrays", "metrics"]  # the guard adds "node"


def test_exchanged_state_names_cover_every_trainable_parameter(tiny_model):
    model = build_classifier(tiny_model, ["A", "B", "C"], make_run().lora)
    state = exchanged_state(model)
    trainable, _ = count_parameters(model)
    assert sum(t.numel() for t in state.values()) == trainable
    assert not any("embeddings" in name or "attention.output" in name for name in state)


def test_the_wire_format_round_trips_whatever_order_the_names_come_in(tiny_model):
    model = build_classifier(tiny_model, ["A", "B", "C"], make_run().lora)
    state = exchanged_state(model)
    shuffled = dict(reversed(state.items()))  # e.g. a checkpoint, whose file sorts the names
    wire = to_wire(shuffled)
    assert list(wire) == [WIRE_ARRAY] and wire[WIRE_ARRAY].dim() == 1
    back = from_wire(model, wire)
    assert list(back) == sorted(state)
    assert all(torch.equal(back[name], state[name]) for name in state)


def test_weights_in_another_format_or_size_are_refused_by_name(tiny_model):
    model = build_classifier(tiny_model, ["A", "B", "C"], make_run().lora)
    state = exchanged_state(model)
    with pytest.raises(ValueError, match=r"none of the wire's layouts: 'base_model"):
        from_wire(model, state)
    bigger = build_classifier(tiny_model, ["A", "B", "C", "D"], make_run().lora)
    with pytest.raises(ValueError, match=r"'exchanged' has \d+ values, this model exchanges"):
        from_wire(model, to_wire(exchanged_state(bigger)))


def _guarded_round(run, hospital, arrays, monkeypatch):
    """One training round of the real app behind the hospital's guard: (guard, the app's
    reply, what the guard sends instead)."""
    from types import SimpleNamespace

    from federimed.hospital.guard import SiteGuard

    monkeypatch.setattr(
        "federimed.hospital.guard.get_fused_config_from_fab", lambda fab, r: run.to_flower()
    )
    task = train_task(arrays)
    guard = SiteGuard("hospital-1", hospital)
    fab = SimpleNamespace(content=BUNDLE)
    facts = SimpleNamespace(
        run_id=1, fab_hash=hashlib.sha256(BUNDLE).hexdigest(), primary_task_type="flwr-serverapp"
    )
    assert guard.admit(task, facts, fab) is None
    guard.received(task.metadata.message_id, task)
    reply = client_train_reply(run.to_flower(), hospital, arrays, msg=task)
    return guard, reply, guard.screen(reply)


def test_the_real_apps_update_is_clipped_by_the_guard_not_the_app(
    tiny_model, marked_hospital, site_policy, monkeypatch
):
    """The app trains unclipped; the guard at the hospital's SuperNode bounds what leaves."""
    _set_policy(site_policy, max_update_norm=0.01)
    run = make_run(model=tiny_model, local_steps=2, max_length=64, learning_rate=0.05)
    initial = ArrayRecord(
        to_wire(exchanged_state(build_classifier(tiny_model, run.label_list, run.lora)))
    )
    _, reply, out = _guarded_round(run, marked_hospital, initial, monkeypatch)
    received = initial.to_torch_state_dict()[WIRE_ARRAY]
    trained = reply.content["arrays"].to_torch_state_dict()[WIRE_ARRAY]
    assert float(torch.linalg.vector_norm(trained - received)) > 0.0101  # the app did not clip
    sent = out.content["arrays"].to_torch_state_dict()[WIRE_ARRAY]
    norm = torch.linalg.vector_norm(sent - received)
    assert 0.009 < float(norm) <= 0.0101  # it trained, and no further than the bound


def test_in_an_int8_run_the_guard_itself_sends_the_change_at_8_bits(
    tiny_model, marked_hospital, site_policy, monkeypatch
):
    """The app answers in float32; the guard clips, quantizes (keeping the rounding for the
    next round), ledgers those bytes and sends them; the server reads the change back."""
    _set_policy(site_policy, max_update_norm=0.05)
    run = make_run(model=tiny_model, local_steps=2, max_length=64, wire_precision="int8")
    model = build_classifier(tiny_model, run.label_list, run.lora)
    server_copy = ArrayRecord(to_wire(exchanged_state(model)))
    sent = as_sent(server_copy, "int8")
    assert sent[WIRE_ARRAY].dtype == "int8"
    guard, reply, out = _guarded_round(run, marked_hospital, sent, monkeypatch)

    trained = reply.content["arrays"][WIRE_ARRAY].numpy()
    assert trained.dtype == np.float32  # the app decoded the 8-bit weights and trained on them
    update = out.content["arrays"]
    assert list(update.keys()) == [wire.DELTA_ARRAY] and update[wire.DELTA_ARRAY].dtype == "int8"
    assert record_bytes(update) < record_bytes(server_copy) / 3.9
    (entry,) = [e for _, e in ledger.entries(site_policy.parent / "egress-ledger.jsonl")]
    assert entry["bytes"] == record_bytes(update)  # the ledger saw the 8 bits that left

    received = wire.decode({WIRE_ARRAY: sent[WIRE_ARRAY].numpy()})
    change = trained - received
    norm = float(np.linalg.norm(change))
    clipped = change * min(1.0, 0.05 / norm)
    weights, problem = decoded_update(update, server_copy)
    assert problem is None
    got = weights[WIRE_ARRAY].numpy() - server_copy[WIRE_ARRAY].numpy()
    step = np.abs(clipped).max() / wire.LEVELS
    assert np.abs(got - clipped).max() <= step  # the change within half a block step
    assert np.linalg.norm(got) <= 0.05  # the site's bound holds for what the server reads
    residual = guard.feedback[1].residuals[1]
    assert np.allclose(got + residual, clipped, atol=1e-6)  # kept for the next round


def test_start_up_is_timed_from_when_the_process_really_started():
    """psutil dates a process from the boot time rounded down to a second; the reported
    start-up must not carry that error (it is most of a warm start)."""
    import time

    import psutil

    from client_app.client_app import _process_age

    age = _process_age()
    by_psutil = time.time() - psutil.Process().create_time()
    assert 0 < age <= by_psutil + 0.05
    assert by_psutil - age < 1.05


def test_a_resumed_run_continues_from_a_copy_of_the_dead_runs_error_feedback(tmp_path):
    """Run 3 resumes run 2, which resumed run 1: each starts from the residuals of the run it
    resumes (tests/test_e2e.py checks that the weights end as an uninterrupted run's), and a
    late reply of the dead run changes nothing in the resumed one."""
    from federimed.hospital.guard import SiteGuard

    guard = SiteGuard("hospital-1", tmp_path)
    guard.feedback[1] = wire.ErrorFeedback()
    guard.feedback[1].encode(np.zeros(10), np.full(10, 0.3), server_round=1)
    guard._note_resumed(2, {"resume-from": "1"})
    guard.feedback[1].encode(np.zeros(10), np.full(10, 0.7), server_round=2)  # a late reply
    guard._note_resumed(3, {"resume-from": "2"})
    guard._note_resumed(4, {"resume-from": "not a run"})
    guard._note_resumed(5, {"resume-from": "99"})  # a run this SuperNode never served
    assert sorted(guard.feedback) == [1, 2, 3]
    assert sorted(guard.feedback[2].residuals) == sorted(guard.feedback[3].residuals) == [1]
    assert np.array_equal(guard.feedback[3].residuals[1], guard.feedback[1].residuals[1])
