"""A round survives a bad day: bad updates, silent or refusing hospitals, deadlines, resumes.

The strategy is driven here as Flower's ``Strategy.start`` drives it, with a stand-in Grid; the
same code runs against a real federation in tests/test_faults.py.
"""

from __future__ import annotations

import json
import math
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import make_run
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.proto.node_pb2 import NodeInfo
from flwr.supercore.task_identity import TaskIdentity

from federimed.consortium.checks import hospital_name, update_problem
from federimed.consortium.grid import DeadlineGrid, RunDeadline
from federimed.consortium.recorder import RoundRecorder
from federimed.consortium.resume import ResumeError, checkpoint_dir, resume_point
from federimed.consortium.strategy import make_strategy
from federimed.runrecord import RUN_CONFIG_FILE, RoundRecord, append_round, read_rounds

NAMES = {11: "hospital-1", 12: "hospital-2", 13: "hospital-3", 14: "hospital-4"}


class _Grid:
    def get_node_ids(self):
        return list(NAMES)

    def get_nodes(self):
        return [NodeInfo(node_id=n, name=name) for n, name in NAMES.items()]


@pytest.fixture(autouse=True)
def _as_in_a_serverapp():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def _global() -> ArrayRecord:
    return ArrayRecord({"a": torch.zeros(4), "b": torch.zeros(2, 3)})


def _reply(message: Message, arrays: dict, metrics: dict) -> Message:
    content = {"arrays": ArrayRecord(arrays), "metrics": MetricRecord(metrics)}
    return Message(RecordDict(content), reply_to=message)


def _sent(strategy, server_round: int = 1) -> dict[str, Message]:
    messages = strategy.configure_train(server_round, _global(), ConfigRecord(), _Grid())
    return {NAMES[m.metadata.dst_node_id]: m for m in messages}


def test_bad_updates_are_dropped_counted_and_the_round_goes_on(tmp_path):
    recorder = RoundRecorder(tmp_path)
    strategy = make_strategy(make_run(min_nodes=4, max_update_norm=10.0), recorder)
    sent = _sent(strategy)
    good = {"a": torch.ones(4), "b": torch.ones(2, 3)}
    replies = [
        _reply(sent["hospital-1"], good, {"train_loss": 1.0, "num_examples": 5}),
        _reply(
            sent["hospital-2"],
            {"a": torch.tensor([1.0, float("nan"), 1, 1]), "b": torch.ones(2, 3)},
            {"train_loss": 1.0, "num_examples": 5},
        ),
        _reply(
            sent["hospital-3"],
            {"a": torch.ones(5), "b": torch.ones(2, 3)},
            {"train_loss": 1.0, "num_examples": 5},
        ),
        _reply(
            sent["hospital-4"],
            {"a": torch.full((4,), 100.0), "b": torch.ones(2, 3)},
            {"train_loss": 1.0, "num_examples": 5},
        ),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_array_equal(arrays["a"].numpy(), np.ones(4))  # only hospital-1 counted
    record = recorder.write(recorder.close(1), None)
    assert record.participants == ["hospital-1"]
    assert record.dropped == []
    assert record.rejected["hospital-2"] == "a: non-finite values"
    assert "expected float32[4]" in record.rejected["hospital-3"]
    assert "above the bound 10" in record.rejected["hospital-4"]
    assert recorder.rejected_total == 3


def test_the_aggregate_is_the_same_to_the_bit_whatever_order_replies_arrive_in(tmp_path):
    """Float sums depend on their order: replies are aggregated in hospital-name order."""
    rng = np.random.default_rng(0)
    updates = {
        name: {"a": torch.from_numpy(rng.normal(size=4).astype(np.float32)),
               "b": torch.from_numpy(rng.normal(size=(2, 3)).astype(np.float32))}
        for name in ("hospital-1", "hospital-2", "hospital-3")
    }  # fmt: skip
    sizes = {"hospital-1": 7, "hospital-2": 3, "hospital-3": 11}
    aggregates = []
    for order in (["hospital-1", "hospital-2", "hospital-3"], ["hospital-3", "hospital-1",
                  "hospital-2"], ["hospital-2", "hospital-3", "hospital-1"]):  # fmt: skip
        strategy = make_strategy(make_run(min_nodes=3), RoundRecorder(tmp_path))
        sent = _sent(strategy)
        replies = [_reply(sent[n], updates[n], {"num_examples": sizes[n]}) for n in order]
        arrays, _ = strategy.aggregate_train(1, replies)
        aggregates.append({key: array.numpy().tobytes() for key, array in arrays.items()})
    assert aggregates[0] == aggregates[1] == aggregates[2]


def test_a_list_valued_metric_is_left_out_of_the_record_not_a_crash(tmp_path):
    """Flower allows list metrics; the record keeps one number per metric and hospital."""
    recorder = RoundRecorder(tmp_path)
    strategy = make_strategy(make_run(min_nodes=2), recorder)
    sent = _sent(strategy)
    weights = {"a": torch.ones(4), "b": torch.ones(2, 3)}
    metrics = {"train_loss": 1.0, "num_examples": 5, "per_class": [0.5, 0.25]}
    replies = [_reply(sent[name], weights, metrics) for name in ("hospital-1", "hospital-2")]
    strategy.aggregate_train(1, replies)
    record = recorder.write(recorder.close(1), None)
    assert record.participants == ["hospital-1", "hospital-2"]
    assert record.train["hospital-1"] == {"train_loss": 1.0, "num_examples": 5.0}


def test_update_checks_name_what_is_wrong():
    reference = _global()
    missing = ArrayRecord({"a": torch.zeros(4)})
    assert update_problem(missing, reference, 0) == "wrong keys (missing ['b'], unexpected [])"
    doubles = ArrayRecord({"a": torch.zeros(4, dtype=torch.float64), "b": torch.zeros(2, 3)})
    assert "float64[4], expected float32[4]" in update_problem(doubles, reference, 0)
    huge = ArrayRecord({"a": torch.full((4,), 1e6), "b": torch.zeros(2, 3)})
    assert update_problem(huge, reference, 0) is None  # no bound configured


def test_hospital_without_validation_keys_does_not_fail_the_round(tmp_path):
    """Flower refuses replies with different metric keys; the server cuts to the common ones."""
    recorder = RoundRecorder(tmp_path)
    strategy = make_strategy(make_run(min_nodes=2), recorder)
    sent = _sent(strategy)
    weights = {"a": torch.ones(4), "b": torch.ones(2, 3)}
    with_val = {"train_loss": 1.0, "num_examples": 5, "val_accuracy": 0.5, "val_loss": 2.0}
    replies = [
        _reply(sent["hospital-1"], weights, with_val),
        _reply(sent["hospital-2"], weights, {"train_loss": 3.0, "num_examples": 5}),
    ]
    _, metrics = strategy.aggregate_train(1, replies)
    assert dict(metrics) == {"train_loss": 2.0}  # Flower leaves out the weight key
    record = recorder.write(recorder.close(1), None)
    assert record.participants == ["hospital-1", "hospital-2"]
    assert record.train["hospital-1"]["val_accuracy"] == 0.5  # kept per hospital


def test_silent_and_gone_hospitals_are_dropped_and_refusals_by_all_stop_the_run(tmp_path):
    recorder = RoundRecorder(tmp_path)
    strategy = make_strategy(make_run(min_nodes=2), recorder)
    sent = _sent(strategy)
    for name, message in sent.items():  # as Flower's grid does when it pushes them
        message.metadata.__dict__["_message_id"] = f"id-{name}"
    # The SuperLink answers for a node that stopped sending heartbeats, in its own name.
    gone = Message(Error(ErrorCode.NODE_UNAVAILABLE, "node offline"), reply_to=sent["hospital-1"])
    gone.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
    weights = {"a": torch.ones(4), "b": torch.ones(2, 3)}
    answered = _reply(sent["hospital-2"], weights, {"num_examples": 5})
    strategy.aggregate_train(1, [gone, answered])  # hospital-3 and -4: silent past the timeout
    record = recorder.write(recorder.close(1), None)
    assert record.participants == ["hospital-2"]
    assert record.dropped == ["hospital-1", "hospital-3", "hospital-4"]
    assert record.errors == {"hospital-1": "node offline"}

    sent = _sent(strategy, 2)
    assert strategy.aggregate_train(2, [gone]) == (None, None)  # nobody there: a lost round
    sent = _sent(strategy, 3)
    refusal = Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "below floors [refused by h1]")
    refused = [Message(refusal, reply_to=m) for m in sent.values()]
    with pytest.raises(RuntimeError, match="round 3: no hospital trained"):
        strategy.aggregate_train(3, refused)


def test_enrolled_names_that_are_not_plain_never_become_paths():
    assert hospital_name(7, "hospital-1") == "hospital-1"
    for unsafe in ("", "../etc", "a/b", ".hidden", "x" * 80, "h\n1"):
        assert hospital_name(7, unsafe) == "node-7"


def test_resumed_rounds_carry_the_run_s_own_numbers(tmp_path):
    recorder = RoundRecorder(tmp_path)
    strategy = make_strategy(make_run(min_nodes=1), recorder, round_offset=2)
    sent = _sent(strategy, 1)  # Flower's first round of the resumed run
    assert {m.content["config"]["server-round"] for m in sent.values()} == {3}
    weights = {"a": torch.ones(4), "b": torch.ones(2, 3)}
    strategy.aggregate_train(1, [_reply(sent["hospital-1"], weights, {"num_examples": 1})])
    assert recorder.write(recorder.close(3), None).round == 3


class _Replies(_Grid):
    """Replies to messages "a" and "b" that arrive on the given pulls (None: never)."""

    def __init__(self, arrive: dict[str, int | None]):
        super().__init__()
        self.arrive, self.pulls = arrive, 0

    def push_messages(self, messages):
        return list(self.arrive)

    def pull_messages(self, ids):
        self.pulls += 1
        return [
            SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=message_id))
            for message_id in ids
            if self.arrive[message_id] == self.pulls
        ]


def test_the_grid_returns_once_every_reply_is_in_and_polls_faster_than_flower():
    grid = _Replies({"a": 1, "b": 3})
    replies = DeadlineGrid(grid, math.inf).send_and_receive([], timeout=600)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["a", "b"]
    assert grid.pulls == 3


def test_deadline_grid_bounds_every_wait():
    grid = _Replies({"a": 1, "b": None})
    started = time.monotonic()
    replies = DeadlineGrid(grid, started + 1).send_and_receive([], timeout=600)
    assert [r.metadata.reply_to_message_id for r in replies] == ["a"]
    assert time.monotonic() - started >= 1 and grid.pulls >= 2
    assert list(grid.get_node_ids()) == list(NAMES)
    assert [n.name for n in grid.get_nodes()] == list(NAMES.values())
    past = DeadlineGrid(_Replies({"a": None}), time.monotonic() - 1)
    with pytest.raises(RunDeadline):
        past.get_node_ids()  # no new round, no more waiting for nodes
    assert past.send_and_receive([], timeout=5) == []  # a round in flight ends with what arrived
    assert past._grid.pulls == 1


def test_a_round_in_flight_at_the_deadline_still_ends(tmp_path):
    """Past the deadline a federated evaluation is skipped, so the round is still recorded."""
    strategy = make_strategy(make_run(min_nodes=1, fraction_evaluate=1.0), RoundRecorder(tmp_path))
    grid = DeadlineGrid(_Grid(), time.monotonic() - 1)
    assert strategy.configure_evaluate(1, _global(), ConfigRecord(), grid) == []
    with pytest.raises(RunDeadline):
        strategy.configure_train(2, _global(), ConfigRecord(), grid)


def _dead_run(tmp_path, rounds: int, run):
    """What a ServerApp that died after ``rounds`` rounds leaves behind."""
    from federimed.learning.model import build_classifier

    old = tmp_path / "flower" / "41"
    old.mkdir(parents=True)
    (old / RUN_CONFIG_FILE).write_text(json.dumps(run.to_flower()))
    model = build_classifier(run.model, run.label_list, run.lora, seed=run.seed)
    for k in range(1, rounds + 1):
        model.save_pretrained(checkpoint_dir(old, k))
        record = RoundRecord(
            round=k, participants=["h"], dropped=[], train={}, evaluate={}, test=None,
            traffic={}, seconds=1.0,
        )  # fmt: skip
        append_round(old, record)
    return old


def test_resume_point_is_the_last_recorded_round_and_refuses_a_changed_config(tmp_path, tiny_model):
    from federimed.learning.model import build_classifier, exchanged_state, from_wire

    base = {"model": tiny_model, "output_dir": str(tmp_path / "flower")}
    run = make_run(**base)
    _dead_run(tmp_path, 2, run)
    rounds, arrays = resume_point(make_run(**base, resume_from="41", num_server_rounds=6))
    assert [r.round for r in rounds] == [1, 2]
    model = build_classifier(run.model, run.label_list, run.lora, seed=run.seed)  # as saved
    resumed, saved = from_wire(model, arrays.to_torch_state_dict()), exchanged_state(model)
    assert all(torch.equal(resumed[name], saved[name]) for name in saved)
    with pytest.raises(ResumeError, match=r"learning-rate: 0\.005 -> 0\.1"):
        resume_point(make_run(**base, resume_from="41", learning_rate=0.1))
    with pytest.raises(ResumeError, match="not found"):
        resume_point(make_run(**base, resume_from="42"))


def test_resume_refuses_a_run_without_a_completed_round(tmp_path, tiny_model):
    run = make_run(model=tiny_model, output_dir=str(tmp_path / "flower"))
    _dead_run(tmp_path, 0, run)
    with pytest.raises(ResumeError, match="no completed round"):
        resume_point(make_run(model=tiny_model, output_dir=run.output_dir, resume_from="41"))
    assert read_rounds(tmp_path / "flower" / "41") == []


def test_a_run_that_never_gets_enough_hospitals_ends_at_its_deadline(tmp_path, tiny_model):
    """Flower would wait for min-nodes for ever; run-deadline ends the run, model saved."""
    from federimed.consortium.run import ServerRun

    class Empty(_Grid):
        def get_node_ids(self):
            return []

    run = make_run(
        model=tiny_model, max_length=16, min_nodes=3, run_deadline=2, output_dir=str(tmp_path)
    )
    summary = ServerRun(run, 7).start(Empty())
    assert summary.status == "deadline" and summary.rounds_completed == 0
    assert (tmp_path / "7" / "final" / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "7" / RUN_CONFIG_FILE).read_text())["run-deadline"] == 2


def test_a_run_the_serverapp_gives_up_records_why(tmp_path, tiny_model):
    """Not left "in progress" on the dashboard: failure.json says why, the error goes on."""
    from federimed.consortium.run import ServerRun
    from federimed.runrecord import read_failure

    class Refusing(_Grid):
        def get_node_ids(self):
            raise RuntimeError("round 1: no hospital trained (hospital-1: below the floor)")

    run = make_run(model=tiny_model, max_length=16, output_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match="no hospital trained"):
        ServerRun(run, 8).start(Refusing())
    failure = read_failure(tmp_path / "8")
    assert failure.reason == "round 1: no hospital trained (hospital-1: below the floor)"
    assert failure.run_id == 8 and failure.rounds_completed == 0
    assert not (tmp_path / "8" / "summary.json").exists()


def test_round_one_is_timed_from_the_end_of_round_zero(tmp_path, tiny_model, monkeypatch):
    """The server's start is not round 1's time, and neither is the initial model's scoring,
    which runs beside round 1."""
    from federimed.consortium.run import ServerRun
    from federimed.learning.model import exchanged_state, to_wire

    run = make_run(model=tiny_model, max_length=16, output_dir=str(tmp_path))
    server = ServerRun(run, 7)
    seeded = ArrayRecord(to_wire(exchanged_state(server.global_model.model)))
    monkeypatch.setattr(server.global_model, "score", lambda _round: time.sleep(0.3) or None)
    server._end_of_round(0, seeded)
    assert time.monotonic() - server.recorder.started < 0.2


def test_scoring_runs_beside_the_next_round_and_lines_stay_in_order(tmp_path, tiny_model):
    """A round goes back to Flower before its test score is in; the next round waits for that
    score before replacing the model, and every line carries its own round's score."""
    import threading

    from federimed.consortium.run import ServerRun
    from federimed.learning.model import exchanged_state

    run = make_run(model=tiny_model, max_length=16, output_dir=str(tmp_path))
    server = ServerRun(run, 7)
    arrays = ArrayRecord(exchanged_state(server.global_model.model))
    gates = {server_round: threading.Event() for server_round in (0, 1, 2)}
    scored: list[int] = []
    loaded: list[tuple[int, list[int]]] = []

    def gated_score(server_round: int) -> dict[str, float]:
        gates[server_round].wait(timeout=10)
        scored.append(server_round)
        return {"accuracy": server_round / 10, "macro_f1": 0.0, "loss": 1.0, "num_examples": 4}

    server.global_model.score = gated_score
    server.global_model.load = lambda server_round, _: loaded.append((server_round, list(scored)))
    for flower_round in (0, 1, 2):
        server._end_of_round(flower_round, arrays)  # returns while its scoring waits at the gate
        assert flower_round not in scored
        gates[flower_round].set()
    server.wait_for_scoring()
    assert loaded == [(0, []), (1, [0]), (2, [0, 1])]
    assert [(r.round, r.test.accuracy) for r in read_rounds(tmp_path / "7")] == [(1, 0.1), (2, 0.2)]
    assert server.scores[0]["accuracy"] == 0
