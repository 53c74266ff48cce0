"""The hospital's ClientApp runner: Flower's own ``flwr-clientapp``, with the hospital's checks.

A SuperNode runs whatever app bundle (FAB) the SuperLink hands it.  Flower 1.42 pulls the
bundle, installs it, imports it, runs it and pushes the reply all inside
:func:`flwr.supernode.runtime.run_clientapp.run_clientapp`; the three steps that matter to
the hospital are module-level names there, so ``federimed-clientapp`` rebinds exactly those
and then calls Flower's entry point unchanged:

- ``install_from_fab``: the bundle's SHA-256 (the hash ``flwr run`` builds and
  ``federimed app hash`` prints) must be in the site policy, else the task is refused before a
  byte of it is unpacked or imported;
- ``get_load_client_app_fn``: any exception from the app becomes a refusal whose text carries
  no record content (the full error goes to the hospital's own log);
- ``push_message``: metrics not on the allow-list are held back, and the reply is appended to
  the hash-chained egress ledger before it leaves.

One more rebinding is about time, not trust: the task's first pull of the round's message
backs off 0.1 s instead of Flower's 1 s (:func:`quicker_first_pulls`).

``federimed superexec`` makes Flower's SuperExec start this command instead of
``flwr-clientapp`` (:func:`use_site_clientapp`).  ``tests/test_site.py`` pins the names
against the installed Flower, so an upgrade that moves them fails loudly, not open.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from typing import Any

import flwr.supernode.runtime.run_clientapp as flower_clientapp
from flwr.app import Message, MetricRecord
from flwr.app.error import Error
from flwr.supercore.constant import TASK_TYPE_TO_COMMAND, TaskType

from federimed import ledger
from federimed.policy import POLICY_ENV, PolicyError, SitePolicy, SiteRefusal, policy_from_env

COMMAND = "federimed-clientapp"
# Read by the approved app (the ledger and logs name the bundle that produced a reply).
APP_HASH_ENV = "FEDERIMED_APP_HASH"
log = logging.getLogger("flwr.federimed.site")


def use_site_clientapp() -> None:
    """Make this process's SuperExec launch ClientApps through :func:`main`."""
    TASK_TYPE_TO_COMMAND[TaskType.CLIENT_APP] = COMMAND


class SiteGuard:
    """The hospital's checks around one ClientApp task (one process per task in Flower)."""

    def __init__(self, policy: SitePolicy | None):
        self.policy = policy  # None: unusable (logged at start), so every task is refused
        self.app_hash: str | None = None
        self.refusal: str | None = None  # what the server is told when the task fails
        self.server_round: int | None = None  # from the task's config, when the app ran

    @classmethod
    def from_env(cls) -> SiteGuard:
        try:
            return cls(policy_from_env())
        except PolicyError as error:
            log.error("%s", error)
            return cls(None)

    @property
    def site(self) -> str:
        return self.policy.site if self.policy else "this hospital"

    def _refuse(self, code: str, reason: str) -> SiteRefusal:
        refusal = SiteRefusal(self.site, code, reason)
        self.refusal = str(refusal)
        return refusal

    def install(self, content: bytes, *args: Any, **kwargs: Any) -> Any:
        app_hash = hashlib.sha256(content).hexdigest()
        if self.policy is None:
            raise self._refuse("NO_SITE_POLICY", "the hospital's site policy is not usable")
        if not self.policy.approves(app_hash):
            log.error(
                "refused app bundle %s: not in the site policy %s; after review, approve it "
                "with: federimed approve --policy %s %s",
                app_hash,
                os.environ.get(POLICY_ENV),
                os.environ.get(POLICY_ENV),
                app_hash,
            )
            raise self._refuse(
                "APP_NOT_APPROVED", f"app bundle {app_hash} is not approved by {self.site}"
            )
        self.app_hash = app_hash
        os.environ[APP_HASH_ENV] = app_hash
        return _install_from_fab(content, *args, **kwargs)

    def loader(self, get_loader: Callable[..., Callable]) -> Callable[..., Callable]:
        def get(*args: Any, **kwargs: Any) -> Callable:
            load = get_loader(*args, **kwargs)
            return lambda *ids: self._guarded(load(*ids))

        return get

    def _guarded(self, app: Callable) -> Callable:
        def run(message: Message, context: Any) -> Message:
            self.server_round = _server_round(message)
            try:
                return app(message=message, context=context)
            except SiteRefusal as refusal:
                self.refusal = str(refusal)
                raise
            except Exception as error:
                log.exception("the ClientApp failed (kept in this log, not sent)")
                raise self._refuse(
                    "CLIENTAPP_FAILED",
                    f"the ClientApp failed ({type(error).__name__}); details in the hospital's log",
                ) from error

        return run

    def push(self, client: Any, message: Message, context: Any) -> Any:
        if message.has_error():
            reason = self.refusal or "the task failed at the hospital [code TASK_FAILED]"
            message.error = Error(code=message.error.code, reason=reason)
        else:
            self._hold_back_metrics(message)
        if self.policy is not None:
            ledger.append(self.policy.ledger, self._entry(message, context))
        return _push_message(client, message, context)

    def _hold_back_metrics(self, message: Message) -> None:
        for name, record in list(message.content.metric_records.items()):
            kept, held = self.policy.split_metrics(dict(record))
            if held:
                log.warning("held back metrics not in the site policy's allow-list: %s", held)
                message.content[name] = MetricRecord(kept)

    def _entry(self, message: Message, context: Any) -> dict[str, Any]:
        arrays = []
        metrics: dict[str, float] = {}
        if message.has_content():
            for record in message.content.array_records.values():
                arrays += [(key, array.data) for key, array in record.items()]
            for record in message.content.metric_records.values():
                metrics |= {key: value for key, value in record.items()}
        return {
            "site": self.site,
            "run_id": int(context.run_id) if context else None,
            "app_hash": self.app_hash,
            "round": self.server_round,
            "kind": message.metadata.message_type,
            "error": message.error.reason if message.has_error() else None,
            "arrays_sha256": ledger.arrays_digest(arrays) if arrays else None,
            "metrics": metrics,
            "bytes": sum(len(data) for _, data in arrays),
            "steps": _local_steps(message, context),
        }


def _local_steps(message: Message, context: Any) -> int | None:
    """The training steps behind a training reply that leaves: the run's ``local-steps``
    (the hospital's floors held the app to it), for the hospital's exporter."""
    if message.has_error() or message.metadata.message_type != "train" or context is None:
        return None
    steps = context.run_config.get("local-steps")
    return int(steps) if isinstance(steps, int) else None


def _server_round(message: Message) -> int | None:
    """Flower's strategies put ``server-round`` into the task's ``config`` record."""
    try:
        return int(message.content["config"]["server-round"])
    except (KeyError, TypeError, ValueError):
        return None


_install_from_fab = flower_clientapp.install_from_fab
_push_message = flower_clientapp.push_message


FIRST_PULL_BACKOFF = 0.1  # seconds; Flower's is 1 (flwr.supercore.constant)


def quicker_first_pulls() -> None:
    """The SuperNode hands out a task before it holds all of the task's message (it pulls the
    arrays from the SuperLink after creating the task), so a warm-started task can ask for
    them too early, and Flower's pull then sleeps 1 s, then 2 s more, whatever the arrays'
    actual arrival.  From 0.1 s it asks a few more times, locally, and starts within a tenth
    of a second of their arrival.  (The wait itself, the SuperNode fetching 0.7 MB from the
    SuperLink, stays: 1.5-1.8 s of the demo's round-2 start-up, traced.)"""
    defaults = flower_clientapp.pull_and_inflate_object_from_tree.__kwdefaults__
    defaults["initial_backoff"] = FIRST_PULL_BACKOFF


def main() -> None:
    """``federimed-clientapp``: what Flower's SuperExec starts for each ClientApp task."""
    quicker_first_pulls()
    guard = SiteGuard.from_env()
    flower_clientapp.install_from_fab = guard.install
    flower_clientapp.get_load_client_app_fn = guard.loader(flower_clientapp.get_load_client_app_fn)
    flower_clientapp.push_message = guard.push
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    flwr_clientapp()
