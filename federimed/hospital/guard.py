"""The hospital's guard: what runs and what leaves, decided in the hospital's own SuperNode.

Every message of a run crosses the hospital's SuperNode twice: in, when the SuperNode pulls it
from the SuperLink and makes a task of it, and out, when it sends the ClientApp's reply.  The
guard sits at both crossings, inside the SuperNode's process (``federimed supernode``; the
hooks are in :mod:`federimed.hospital.supernode`).  The consortium's app runs in other
processes (in compose and Kubernetes, another container and user) that reach the SuperNode only
through Flower's Runtime API: it can neither import, patch nor write to anything here, and the
egress ledger is written by this process alone.

Default deny, both ways:

- **What runs** (:meth:`SiteGuard.admit`): only ClientApp tasks (a run whose primary task is an
  AgentApp, or a message that is neither ``train`` nor ``evaluate``, is refused), only from a
  bundle whose SHA-256, computed here from the bytes the app would install, is approved by the
  site policy as read now (a revoked hash is refused whatever is installed on disk), only above
  the policy's floors (computed from the run config and the hospital's own case counts), an
  evaluation only on validation data, and never more rounds or evaluations than the policy caps.
  A refused message never becomes a task: the app's code never runs.
- **What leaves** (:meth:`SiteGuard.screen`): the reply is rebuilt by the guard from checked
  parts.  A training reply holds exactly one ArrayRecord ``arrays`` whose names, shapes and
  dtypes are those the hospital received for that task (8-bit weights as decoded), finite
  values only, clipped here to the policy's bound on the update's norm; when the weights came
  8 bits a value, the guard itself sends the change at 8 bits (:mod:`federimed.learning.wire`, with
  error feedback), so what leaves is what it quantized; an evaluation reply holds none.  Both
  hold one MetricRecord ``metrics`` of single finite numbers (keys off the allow-list are held
  back and ledgered).  Any other record, type or name refuses the whole reply.  The guard adds one
  record of its own, ``node``, with the hospital's name and the round.  An app's error text can
  carry record content, so it stays in the hospital's log and the server gets a code.

Every outgoing reply and every refusal is appended to the hash-chained ledger before it is
sent (:mod:`federimed.hospital.ledger`), with each record's type, name, size and digest.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    ConfigRecordValues,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.app.message_type import MessageType
from flwr.common.config import get_fused_config_from_fab
from flwr.common.constant import ErrorCode
from flwr.supercore.constant import TaskType

from federimed.data.records import DataError
from federimed.hospital import ledger
from federimed.hospital.policy import (
    POLICY_ENV,
    PolicyError,
    Privacy,
    SitePolicy,
    SiteRefusal,
    clip_update,
    policy_from_env,
)
from federimed.hospital.privacy import Mechanism, lifetime_spent
from federimed.learning import wire
from federimed.tracks import UnknownTrack, track_for

log = logging.getLogger("flwr.federimed.guard")

ALLOWED_MESSAGE_TYPES = (MessageType.TRAIN, MessageType.EVALUATE)
# A ClientApp task is what the SuperNode makes of any run whose primary task is not an
# AgentApp (flwr/supernode/start_client_internal.py); the guard names the primary task types it
# admits instead of the one it refuses, so a task type Flower adds later is refused too.
ADMITTED_PRIMARY_TASKS = ("", TaskType.SERVER_APP, TaskType.SIMULATION)
ARRAYS, METRICS, NODE = "arrays", "metrics", "node"
# Runs whose 8-bit updates' rounding is kept (one float32 per exchanged value each).
FEEDBACK_RUNS = 4
# Metrics computed from the training cases themselves, outside DP-SGD's noise: under DP they
# stay home (the update's ε would not bound them).
TRAINING_STATISTICS = ("train_loss",)


@dataclass
class Pending:
    """What the guard keeps of a message it admitted, until the reply to it leaves."""

    request: Message  # its metadata: the reply is rebuilt as a reply to exactly this
    run_id: int
    app_hash: str
    server_round: int | None
    local_steps: int | None
    received: dict[str, np.ndarray] = field(default_factory=dict)
    quantized: bool = False  # the weights came 8 bits a value, and the update leaves so
    privacy: Spending | None = None  # a training task's DP-SGD, as the guard accounted it


@dataclass(frozen=True)
class Spending:
    """What one training reply of a run spends: ε after it and before it, at δ."""

    mechanism: Mechanism
    delta: float
    rounds_before: int

    @property
    def epsilon_before(self) -> float:
        return self.mechanism.epsilon(self.rounds_before, self.delta)

    @property
    def epsilon_after(self) -> float:
        return self.mechanism.epsilon(self.rounds_before + 1, self.delta)

    def ledger_fields(self) -> dict[str, Any]:
        """ε spent by this reply and by the run so far (None without noise: unbounded)."""
        if not self.mechanism.private:
            return {"epsilon": None, "epsilon_run": None, "delta": self.delta}
        return {
            "epsilon": self.epsilon_after - self.epsilon_before,
            "epsilon_run": self.epsilon_after,
            "delta": self.delta,
            "noise_multiplier": self.mechanism.noise_multiplier,
            "sample_rate": self.mechanism.sample_rate,
        }


@dataclass
class Counts:
    """The hospital's own case counts, from its data volume."""

    train: int
    validation: int


def _server_round(message: Message) -> int | None:
    """Flower's strategies put ``server-round`` in the task's ``config`` record, and the round
    as the message's group id (all the guard has of a message it refuses unread)."""
    try:
        value = message.content.config_records["config"]["server-round"]
        if isinstance(value, int | float | str):
            return int(value)
    except (KeyError, ValueError):
        pass
    group = message.metadata.group_id
    return int(group) if group.isdigit() else None


def _at_most(value: object, limit: float) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value <= limit


def count_cases(data_path: Path, track: str) -> Counts:
    """Training and validation cases in the hospital's folder for ``track`` (never sent),
    read by this hospital's own code for the track, whatever the app brings."""
    return Counts(*track_for(track).count_cases(data_path))


def record_facts(content: RecordDict) -> list[dict[str, Any]]:
    """Each record's type, name, size in bytes and SHA-256, for the ledger (an ArrayRecord's
    size and digest are its arrays', as :func:`federimed.hospital.ledger.arrays_digest` takes
    them)."""
    facts = []
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            arrays = [(key, array.data) for key, array in record.items()]
            size, digest = sum(len(data) for _, data in arrays), ledger.arrays_digest(arrays)
        else:
            data = record.deflate()
            size, digest = len(data), hashlib.sha256(data).hexdigest()
        facts.append({"type": type(record).__name__, "name": name, "bytes": size, "sha256": digest})
    return facts


class SiteGuard:
    """The hospital's checks at its SuperNode; ``node_config`` names the hospital and its data."""

    def __init__(self, hospital: str, data_path: Path):
        self.hospital = hospital
        self.data_path = Path(data_path)
        self.pending: dict[str, Pending] = {}
        self.cleared: set[str] = set()  # ids of the messages the guard built to be sent
        # run id -> the rounding its 8-bit updates have left out so far (federimed/learning/wire.py)
        self.feedback: dict[int, wire.ErrorFeedback] = {}

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, object]) -> SiteGuard:
        return cls(str(node_config.get("hospital", "")), Path(str(node_config["data-path"])))

    def policy(self) -> SitePolicy | None:
        """Read at every message: an approval revoked a second ago holds now."""
        try:
            return policy_from_env()
        except PolicyError as error:
            log.error("%s", error)
            return None

    @property
    def site(self) -> str:
        return self.hospital or "this hospital"

    # --- in: what runs ------------------------------------------------------------------------

    def admit(self, message: Message, run: Any, fab: Any) -> Message | None:
        """None if the message may become a task; otherwise the error reply that replaces it
        (already ledgered)."""
        self._forget_expired()
        policy = self.policy()
        app_hash = hashlib.sha256(fab.content).hexdigest()
        try:
            steps, spending = self._check_task(policy, message, run, fab, app_hash)
        except SiteRefusal as refusal:
            return self._refused(policy, message, run.run_id, app_hash, refusal)
        self.pending[message.metadata.message_id] = Pending(
            request=message,
            run_id=run.run_id,
            app_hash=app_hash,
            server_round=_server_round(message),
            local_steps=steps,
            privacy=spending,
        )
        return None

    def _forget_expired(self) -> None:
        """Drop what the guard kept of messages past their time to live: their replies can no
        longer be sent (an app that never answered must not grow the SuperNode's memory)."""
        now = time.time()
        for message_id, pending in list(self.pending.items()):
            metadata = pending.request.metadata
            if metadata.created_at + metadata.ttl < now:
                del self.pending[message_id]

    def _refuse(self, code: str, reason: str) -> SiteRefusal:
        return SiteRefusal(self.site, code, reason)

    def _refuse_unsent(self, reason: str, details: str) -> SiteRefusal:
        """A reply that is not what the policy allows.  Names in it (records, metrics, arrays)
        are the app's own text, which can carry a record: they go to the hospital's log only."""
        log.warning("reply refused: %s; %s", reason, details)
        return self._refuse("REPLY_NOT_ALLOWED", f"{reason} (details in the hospital's log)")

    def _check_task(
        self, policy: SitePolicy | None, message: Message, run: Any, fab: Any, app_hash: str
    ) -> tuple[int, Spending | None]:
        """Raise the first rule the task breaks; the local steps it was admitted with, and
        for a training task what it spends of the privacy budget."""
        if policy is None:
            raise self._refuse("NO_SITE_POLICY", "the hospital's site policy is not usable")
        if run.primary_task_type not in ADMITTED_PRIMARY_TASKS:
            raise self._refuse(
                "TASK_TYPE_REFUSED",
                f"only ClientApp tasks run here, not {run.primary_task_type or 'this task'}",
            )
        kind = message.metadata.message_type
        if kind not in ALLOWED_MESSAGE_TYPES:
            raise self._refuse("MESSAGE_TYPE_REFUSED", f"message type {kind!r} is not run here")
        if app_hash != run.fab_hash:
            raise self._refuse(
                "APP_HASH_MISMATCH", f"the bundle's bytes do not hash to {run.fab_hash}"
            )
        if not policy.approves(app_hash):
            log.error(
                "refused app bundle %s: not in the site policy; after review, approve it with: "
                "federimed approve --policy %s %s",
                app_hash,
                os.environ.get(POLICY_ENV),
                app_hash,
            )
            raise self._refuse(
                "APP_NOT_APPROVED", f"app bundle {app_hash} is not approved by {self.site}"
            )
        config = get_fused_config_from_fab(fab.content, run)
        self._note_resumed(run.run_id, config)
        self._check_caps(policy, run.run_id, kind)
        steps, counts = self._check_floors(policy, kind, config)
        if kind != MessageType.TRAIN:
            return steps, None
        return steps, self._check_privacy(policy, run.run_id, config, counts)

    def _note_resumed(self, run_id: int, config: Mapping[str, Any]) -> None:
        """A run that resumes a dead one (``resume-from``) starts from a copy of its 8-bit
        updates' error feedback, as the uninterrupted run would go on (the residual is this
        hospital's own, of an update it already sent).  A copy: a late reply of the dead run
        must not change what the resumed run sends."""
        resumed = str(config.get("resume-from", ""))
        if resumed.isdigit() and run_id not in self.feedback and int(resumed) in self.feedback:
            self.feedback[run_id] = self.feedback[int(resumed)].copy()

    def _check_privacy(
        self, policy: SitePolicy, run_id: int, config: Mapping[str, Any], counts: Counts
    ) -> Spending:
        """The run's DP-SGD against the hospital's budget: per run (every round the run
        plans, or has had, plus this one) and over the hospital's lifetime."""
        privacy = policy.privacy
        mechanism = self._mechanism(privacy, config, counts)
        done = ledger.count_replies(policy.ledger, run_id, MessageType.TRAIN)
        planned = max(int(config.get("num-server-rounds", 1)), done + 1)
        run_epsilon = mechanism.epsilon(planned, privacy.delta)
        figures = (
            f"ε={run_epsilon:.3g} (σ={mechanism.noise_multiplier:g}, "
            f"q={mechanism.sample_rate:.4f}, {mechanism.steps_per_round} steps x {planned} "
            f"rounds, δ={privacy.delta:g})"
        )
        if privacy.epsilon_per_run is not None and run_epsilon > privacy.epsilon_per_run:
            raise self._refuse(
                "PRIVACY_BUDGET",
                f"run {run_id} would spend {figures}, over "
                f"privacy.epsilon_per_run={privacy.epsilon_per_run:g}",
            )
        if privacy.lifetime_epsilon is not None:
            spent = lifetime_spent(policy.ledger, excluding_run=run_id)
            if spent + run_epsilon > privacy.lifetime_epsilon:
                raise self._refuse(
                    "PRIVACY_BUDGET",
                    f"run {run_id} would spend {figures}; {spent:.3g} of "
                    f"privacy.lifetime_epsilon={privacy.lifetime_epsilon:g} is spent already",
                )
        return Spending(mechanism, privacy.delta, done)

    def _mechanism(self, privacy: Privacy, config: Mapping[str, Any], counts: Counts) -> Mechanism:
        """The task's DP-SGD from its run config and this hospital's case count."""
        sigma, clip = config.get("dp-noise-multiplier", 0.0), config.get("dp-max-grad-norm")
        if isinstance(sigma, bool) or not isinstance(sigma, int | float) or sigma < 0:
            raise self._refuse("PRIVACY_REFUSED", "dp-noise-multiplier is not a number >= 0")
        steps, batch_size = int(config["local-steps"]), int(config["batch-size"])
        mechanism = Mechanism.for_hospital(float(sigma), batch_size, counts.train, steps)
        if privacy.required and not mechanism.private:
            raise self._refuse(
                "PRIVACY_REQUIRED", "this hospital trains with DP-SGD only (dp-noise-multiplier=0)"
            )
        limit = privacy.max_grad_norm
        if mechanism.private and limit is not None and not _at_most(clip, limit):
            raise self._refuse(
                "PRIVACY_REFUSED",
                f"dp-max-grad-norm={clip} is above the site policy's privacy.max_grad_norm={limit}",
            )
        return mechanism

    def _check_caps(self, policy: SitePolicy, run_id: int, kind: str) -> None:
        cap = policy.max_train_rounds if kind == MessageType.TRAIN else policy.max_evaluations
        if cap is None:
            return
        done = ledger.count_replies(policy.ledger, run_id, kind)
        if done >= cap:
            what = "max_train_rounds" if kind == MessageType.TRAIN else "max_evaluations"
            raise self._refuse(
                "POLICY_CAP", f"run {run_id} already had {done} {kind} replies ({what}={cap})"
            )

    def _check_floors(
        self, policy: SitePolicy, kind: str, config: Mapping[str, Any]
    ) -> tuple[int, Counts]:
        batch_size, steps = config.get("batch-size"), config.get("local-steps")
        if not (isinstance(batch_size, int) and isinstance(steps, int)):
            raise self._refuse(
                "POLICY_FLOOR", "the run config names no whole batch-size and local-steps"
            )
        try:
            counts = count_cases(self.data_path, str(config.get("track", "classify")))
        except DataError as error:
            log.error("%s", error)
            unusable = "the hospital's data folder is not usable"
            raise self._refuse("DATA_UNUSABLE", unusable) from None
        except UnknownTrack as error:
            raise self._refuse("UNKNOWN_TRACK", f"the run config's {error}") from None
        if kind == MessageType.EVALUATE:
            if counts.validation == 0:
                raise self._refuse(
                    "NO_VALIDATION_DATA",
                    "this hospital has no validation data, so it scores no model",
                )
            policy.check_floors(batch_size, steps, counts.validation)
            return steps, counts
        policy.check_floors(batch_size, steps, min(counts.train, batch_size * steps))
        return steps, counts

    def received(self, message_id: str, message: Message) -> None:
        """Keep the arrays of the admitted message ``message_id`` as they arrived: an update is
        checked and clipped against them (the app's process never sees this copy)."""
        pending = self.pending.get(message_id)
        if pending is not None and message.has_content():
            pending.server_round = _server_round(message)
        if pending is not None and message.has_content() and ARRAYS in message.content:
            record = message.content[ARRAYS]
            if isinstance(record, ArrayRecord):
                pending.received = {name: array.numpy() for name, array in record.items()}
                self._decode_received(pending)

    @staticmethod
    def _decode_received(pending: Pending) -> None:
        """8-bit weights are kept decoded, as the app decodes them: the update is the app's
        float32 weights, which the guard quantizes itself on the way out."""
        if not wire.is_quantized(pending.received):
            return
        try:
            pending.received = {wire.WIRE_ARRAY: wire.decode(pending.received)}
            pending.quantized = True
        except wire.WireError as error:  # the app cannot read them either: it fails, ledgered
            log.error("the server's weights do not read: %s", error)

    # --- out: what leaves ---------------------------------------------------------------------

    def screen(self, reply: Message) -> Message | None:
        """The message to send instead of the app's ``reply`` (ledgered); None if the reply
        answers no message the guard admitted (then nothing is sent).  A reply whose content
        never arrived comes as its metadata alone."""
        pending = self.pending.pop(reply.metadata.reply_to_message_id, None)
        if pending is None:
            log.error("a reply to no admitted message was dropped (%s)", reply.metadata.message_id)
            return None
        policy = self.policy()
        try:
            if policy is None:
                raise self._refuse("NO_SITE_POLICY", "the hospital's site policy is not usable")
            content, held = self._checked_content(policy, reply, pending)
        except SiteRefusal as refusal:
            return self._refused(
                policy, pending.request, pending.run_id, pending.app_hash, refusal, pending
            )
        outgoing = Message(content=content, reply_to=pending.request)
        self._ledger(policy, outgoing, pending, held=held)
        return self._clear(outgoing)

    def _checked_content(
        self, policy: SitePolicy, reply: Message, pending: Pending
    ) -> tuple[RecordDict, list[str]]:
        if not (reply.has_error() or reply.has_content()):
            raise self._refuse("INCOMPLETE_REPLY", "the ClientApp never sent its whole reply")
        if reply.has_error():
            log.error("the ClientApp failed (kept in this log, not sent): %s", reply.error.reason)
            raise self._refuse(
                "CLIENTAPP_FAILED", "the ClientApp failed; details in the hospital's log"
            )
        kind = pending.request.metadata.message_type
        if reply.metadata.message_type != kind:
            raise self._refuse("REPLY_NOT_ALLOWED", f"a {kind} task must reply with {kind}")
        expected = {ARRAYS: ArrayRecord, METRICS: MetricRecord}
        if kind == MessageType.EVALUATE:
            expected.pop(ARRAYS)
        found = {name: type(record) for name, record in reply.content.items()}
        if found != expected:
            shown = ", ".join(f"{n!r} ({t.__name__})" for n, t in found.items()) or "nothing"
            raise self._refuse_unsent(
                f"a {kind} reply holds {' and '.join(expected)} only",
                f"this one held {shown}",
            )
        metrics, held = self._metrics(
            policy, reply.content.metric_records[METRICS], pending.privacy
        )
        content = RecordDict({METRICS: MetricRecord(metrics)})
        if kind == MessageType.TRAIN:
            content[ARRAYS] = self._arrays(policy, reply.content.array_records[ARRAYS], pending)
        node: dict[str, ConfigRecordValues] = {
            "hospital": self.hospital,
            "server-round": pending.server_round or 0,
        }
        if pending.privacy is not None and pending.privacy.mechanism.private:
            node |= {"epsilon": pending.privacy.epsilon_after, "delta": pending.privacy.delta}
        content[NODE] = ConfigRecord(node)
        return content, held

    def _metrics(
        self, policy: SitePolicy, record: MetricRecord, privacy: Spending | None
    ) -> tuple[dict, list[str]]:
        for name, value in record.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise self._refuse_unsent("a metric is not one number", f"metric {name!r}")
            if not math.isfinite(value):
                raise self._refuse_unsent("a metric is not finite", f"metric {name!r}")
        kept, held = policy.split_metrics(dict(record))
        if privacy is not None and privacy.mechanism.private:
            held += sorted(set(kept) & set(TRAINING_STATISTICS))
            kept = {k: v for k, v in kept.items() if k not in TRAINING_STATISTICS}
        if held:
            log.warning(
                "held back metrics (off the site policy's allow-list, or training statistics "
                "outside DP-SGD's noise): %s",
                held,
            )
        return kept, held

    def _arrays(self, policy: SitePolicy, record: ArrayRecord, pending: Pending) -> ArrayRecord:
        received = pending.received
        if list(record.keys()) != list(received):
            raise self._refuse_unsent(
                "the update's array names are not those the hospital received",
                f"received {list(received)}, got {list(record.keys())}",
            )
        trained: dict[str, np.ndarray] = {}
        for name, array in record.items():
            sent = received[name]
            if array.stype != "numpy.ndarray" or array.dtype != str(sent.dtype):
                raise self._refuse_unsent("an array has another type", f"{name!r}: {array.dtype}")
            if tuple(array.shape) != sent.shape:
                raise self._refuse_unsent("an array has another shape", f"{name!r}: {array.shape}")
            values = array.numpy()
            if not np.isfinite(values).all():
                raise self._refuse_unsent("an array is not finite", f"{name!r}")
            trained[name] = values
        bound = policy.max_update_norm
        if pending.quantized:
            trained = self._quantized(pending, received, trained, bound)
        elif bound is not None:
            trained, norm = clip_update(received, trained, bound)
            log.info("%s update norm %.4f (site bound %g)", self.site, norm, bound)
        return ArrayRecord({name: Array(np.ascontiguousarray(v)) for name, v in trained.items()})

    def _quantized(
        self, pending: Pending, received: dict, trained: dict, bound: float | None
    ) -> dict[str, np.ndarray]:
        """The update at 8 bits, with this run's error feedback; the change the server reads
        (rounding and the last round's residual included) within the site's bound."""
        feedback = self.feedback.setdefault(pending.run_id, wire.ErrorFeedback())
        self.feedback[pending.run_id] = self.feedback.pop(pending.run_id)  # kept longest
        while len(self.feedback) > FEEDBACK_RUNS:  # a run long gone keeps no memory here
            del self.feedback[next(iter(self.feedback))]
        weights = wire.WIRE_ARRAY
        return feedback.encode(
            received[weights], trained[weights], pending.server_round or 0, max_norm=bound
        )

    # --- both: refusals and the ledger --------------------------------------------------------

    def _refused(
        self,
        policy: SitePolicy | None,
        request: Message,
        run_id: int,
        app_hash: str,
        refusal: SiteRefusal,
        pending: Pending | None = None,
    ) -> Message:
        log.warning("refused %s: %s", request.metadata.message_type, refusal)
        reply = Message(
            Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=str(refusal)),
            reply_to=request,
        )
        pending = pending or Pending(request, run_id, app_hash, _server_round(request), None)
        self._ledger(policy, reply, pending, code=refusal.code)
        return self._clear(reply)

    def _clear(self, message: Message) -> Message:
        self.cleared.add(message.object_id)
        return message

    def _ledger(
        self,
        policy: SitePolicy | None,
        message: Message,
        pending: Pending,
        code: str | None = None,
        held: list[str] | None = None,
    ) -> None:
        """Write the line before the message leaves; without a usable policy there is no
        ledger to write to, and that is in the SuperNode's log."""
        if policy is None:
            log.error("no site policy, so no ledger: %s", message.error.reason)
            return
        arrays: list[tuple[str, bytes]] = []
        metrics: dict[str, Any] = {}
        if message.has_content():
            for array_record in message.content.array_records.values():
                arrays += [(key, array.data) for key, array in array_record.items()]
            for metric_record in message.content.metric_records.values():
                metrics |= dict(metric_record.items())
        trained = not message.has_error() and message.metadata.message_type == MessageType.TRAIN
        ledger.append(
            policy.ledger,
            {
                "site": self.site,
                "run_id": pending.run_id,
                "app_hash": pending.app_hash,
                "round": pending.server_round,
                "kind": message.metadata.message_type,
                "error": message.error.reason if message.has_error() else None,
                "code": code,
                "records": record_facts(message.content) if message.has_content() else [],
                "arrays_sha256": ledger.arrays_digest(arrays) if arrays else None,
                "metrics": metrics,
                "held_back": held or [],
                "bytes": sum(len(data) for _, data in arrays),
                "steps": pending.local_steps if trained else None,
            }
            | (pending.privacy.ledger_fields() if trained and pending.privacy else {}),
        )
