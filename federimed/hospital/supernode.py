"""Flower's SuperNode, asking the SuperLink for work more often while it is idle.

An idle Flower 1.42 SuperNode sleeps a fixed 3 s between two pulls
(``flwr/supernode/start_client_internal.py``, no setting), so each round's task waits
1.5 s on average at every hospital before it even starts, and the round waits for the last
of them.  ``python -m federimed.hospital.supernode --idle-poll-seconds S <flower-supernode
flags>`` runs Flower's own ``flower-supernode`` with that sleep cut to ``S`` seconds
(``FEDERIMED_NODE_IDLE_POLL_SECONDS``), and its local 0.5 s waits to 0.1 s
(:data:`LOCAL_WAIT_SECONDS`); everything else is Flower's.  Each pull is one request
to the SuperLink, so the setting trades round latency for SuperLink load (docs/scale.md).
Both rebindings are in :mod:`federimed.deploy.flower_patches`.

The same process is where the hospital's guard sits (:mod:`federimed.hospital.guard`):
:func:`guard_messages` wraps the two steps of Flower's SuperNode loop that every message of a
run crosses, ``_pull_and_store_message`` (in: a message becomes a task only if the guard admits
it) and ``_push_messages`` (out: only the message the guard rebuilt from the app's reply
leaves, and ``send`` refuses any other).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import types
from collections.abc import Callable
from typing import Any

from federimed.deploy.flower_patches import supernode_message_steps, supernode_waits
from federimed.hospital.guard import SiteGuard

log = logging.getLogger("flwr.federimed.guard")

FLOWER_IDLE_SLEEP = 3  # seconds, the constant in Flower's SuperNode loop
# Its other waits poll the node's own state every 0.5 s: for its ClientApp's reply, and for
# an object's bytes to arrive from it.  Each check is a lookup in the SuperNode's memory, so
# checking every 0.1 s costs nothing and sends a finished hospital's reply on sooner.
LOCAL_WAIT_SECONDS = 0.1


def capped_sleep(seconds: float) -> Callable[[float], None]:
    """A ``sleep`` that waits at most ``seconds`` for the idle pull's 3 s and at most
    :data:`LOCAL_WAIT_SECONDS` for the shorter, local waits."""

    def sleep(duration: float) -> None:
        cap = seconds if duration >= FLOWER_IDLE_SLEEP else LOCAL_WAIT_SECONDS
        time.sleep(min(duration, cap))

    return sleep


# How long the guard waits for the last bytes of a reply the app has announced: an app that
# never sends them must not hold the hospital's SuperNode (it would reply to nothing more).
REPLY_OBJECTS_TIMEOUT = 300.0


def _reply_contents(object_store: Any, message_id: str) -> dict[str, bytes] | None:
    """Every object of a reply, once the app has pushed them all; None if it never does."""
    from flwr.supercore.inflatable.inflatable_object import iterate_object_tree

    deadline = time.monotonic() + REPLY_OBJECTS_TIMEOUT
    contents = {}
    for tree in iterate_object_tree(object_store.get_object_tree(message_id)):
        while not (content := object_store.get(tree.object_id)):
            if time.monotonic() > deadline:
                return None
            time.sleep(LOCAL_WAIT_SECONDS)
        contents[tree.object_id] = content
    return contents


def _inflate(message_id: str, contents: dict[str, bytes]) -> Any:
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    return inflate_object_from_contents(message_id, contents, keep_object_contents=True)


def received_contents(tree: Any, pulled: dict[str, bytes], object_store: Any) -> dict[str, bytes]:
    """Every object of the message the node admitted: those pulled for it, and those the node
    already held.  Flower pulls only the objects its store lacks (ids are content hashes), so
    a message that repeats an earlier one's arrays (a run that starts from the same seeded
    model as a run before it, while that run's objects are still stored) brings fewer."""
    from flwr.supercore.inflatable.inflatable_object import iterate_object_tree

    contents = dict(pulled)
    for node in iterate_object_tree(tree):
        if node.object_id not in contents and (held := object_store.get(node.object_id)):
            contents[node.object_id] = held
    return contents


def _app_reply(reply: Any, object_store: Any) -> Any:
    """The app's reply as the app pushed it, or its metadata with no content when its objects
    never came or do not read (the guard refuses both; a hostile app must not stop the
    SuperNode)."""
    from flwr.app import Message, RecordDict

    contents = _reply_contents(object_store, reply.metadata.message_id)
    if contents:
        try:
            return _inflate(reply.metadata.message_id, contents)
        except Exception:
            log.exception("the ClientApp's reply does not read")
    # Flower's Message takes ``metadata`` as a keyword its typed overloads leave out
    build: Callable[..., Message] = Message
    return build(metadata=reply.metadata, content=RecordDict())


class _Outbox:
    """The SuperNode's state as Flower's ``_push_messages`` sees it: the replies it is to send
    are the guard's, and nothing else (Flower marks what it lists as retrieved, so the state
    cannot be asked twice)."""

    def __init__(self, state: Any, replies: list[Any]):
        self._state, self._replies = state, replies

    def get_messages_legacy(self, **_: Any) -> list[Any]:
        return self._replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._state, name)


def guard_messages(
    guard_for: Callable[[dict], SiteGuard],
) -> Callable[[types.ModuleType], tuple[Callable[..., Any], Callable[..., Any]]]:
    """The guard ``guard_for(node_config)`` on both crossings of Flower's SuperNode loop: what
    :func:`~federimed.deploy.flower_patches.supernode_message_steps` puts in place of
    ``_pull_and_store_message`` and ``_push_messages`` (``module``: the loop's module)."""
    return lambda module: _guarded_steps(module, guard_for)


def _guarded_steps(
    module: types.ModuleType, guard_for: Callable[[dict], SiteGuard]
) -> tuple[Callable[..., Any], Callable[..., Any]]:
    pull_and_store, push = module._pull_and_store_message, module._push_messages
    guards: list[SiteGuard] = []

    def guarded_pull_and_store(**kwargs: Any) -> int | None:
        if not guards:
            guards.append(guard_for(kwargs["node_config"]))
        guard, state, store = guards[0], kwargs["state"], kwargs["object_store"]
        if (received := kwargs["receive"]()) is None:
            return None
        message, tree = received
        run_id = message.metadata.run_id
        try:
            run = state.get_run(run_id) or kwargs["get_run"](run_id)
            fab = state.get_fab(run.fab_hash) or kwargs["get_fab"](run.fab_hash, run_id)
        except module.RunNotRunningException:
            return None
        if (refusal := guard.admit(message, run, fab)) is not None:
            state.store_message(message)  # a reply is stored only beside what it answers
            # Flower reports the task's runtime from these; a refused task had none
            state.record_message_processing_start(message_id=message.metadata.message_id)
            state.record_message_processing_end(message_id=message.metadata.message_id)
            module._insert_message(refusal, state, store)
            return run_id
        pulled: dict[str, bytes] = {}
        pull_object = kwargs["pull_object"]

        def keeping_pull(run: int, object_id: str) -> bytes:
            pulled[object_id] = content = pull_object(run, object_id)
            return content

        result = pull_and_store(
            **kwargs
            | {
                "receive": lambda: received,
                "get_run": lambda _: run,
                "get_fab": lambda *_: fab,
                "pull_object": keeping_pull,
            }
        )
        try:
            contents = received_contents(tree, pulled, store)
            guard.received(message.metadata.message_id, _inflate(tree.object_id, contents))
        except Exception:  # the guard then refuses the update: it has nothing to check it by
            log.exception("the guard could not read the message it admitted")
        return result

    def guarded_push(state: Any, object_store: Any, send: Callable, push_object: Callable) -> None:
        guard, outbox = guards[0], []
        while not (replies := state.get_messages_legacy(is_reply=True)):
            module.time.sleep(0.5)  # Flower's local wait, shortened by capped_sleep
        for reply in replies:
            reply_id = reply.metadata.message_id
            if reply_id in guard.cleared:  # the guard's own refusal, made at intake
                outbox.append(reply)
                continue
            outgoing = guard.screen(_app_reply(reply, object_store))
            state.delete_messages(message_ids=[reply_id])
            object_store.delete(reply_id)
            if outgoing is not None:
                module._insert_message(outgoing, state, object_store)
                outbox.append(outgoing)
        if outbox:
            push(_Outbox(state, outbox), object_store, cleared_only(send), push_object)

    def cleared_only(send: Callable) -> Callable:
        def guarded_send(message: Any, *args: Any) -> Any:
            if message.metadata.message_id not in guards[0].cleared:
                raise PermissionError("the hospital's guard did not clear this message")
            guards[0].cleared.discard(message.metadata.message_id)
            return send(message, *args)

        return guarded_send

    return guarded_pull_and_store, guarded_push


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="federimed-supernode", add_help=False)
    parser.add_argument("--idle-poll-seconds", type=float, required=True)
    ours, flower_args = parser.parse_known_args(argv)
    from flwr.supernode.cli.flower_supernode import flower_supernode

    supernode_waits(capped_sleep(ours.idle_poll_seconds))
    supernode_message_steps(guard_messages(SiteGuard.from_node_config))
    sys.argv = ["flower-supernode", *flower_args]
    flower_supernode()


if __name__ == "__main__":
    main()
