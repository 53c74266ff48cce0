"""Every rebinding in federimed/deploy/flower_patches.py, pinned to the Flower code it relies
on: a Flower upgrade that moves one of these fails here, not silently at a hospital."""

from __future__ import annotations

import inspect
import sqlite3
import subprocess
import time
from pathlib import Path

import flwr
import pytest
from conftest import train_task

from federimed.deploy import flower_patches
from federimed.hospital import site_runner, supernode, warm


def test_the_rebindings_refuse_a_flower_they_were_not_written_for(monkeypatch):
    assert flwr.__version__.startswith(flower_patches.WRITTEN_FOR + ".")
    flower_patches.require_written_for()
    monkeypatch.setattr(flower_patches.importlib.metadata, "version", lambda _: "1.43.0")
    with pytest.raises(flower_patches.FlowerVersionError, match=r"flwr 1\.43\.0 is installed"):
        flower_patches.supernode_waits(time.sleep)


def test_the_superlink_state_waits_longer_for_its_write_lock(tmp_path, monkeypatch):
    """The pragmas are read at connect time, from the constant the rebinding replaces."""
    import flwr.supercore.sql_mixin as sql_mixin

    from federimed.deploy import local_superlink

    monkeypatch.setattr(sql_mixin, "SQLITE_PRAGMAS", sql_mixin.SQLITE_PRAGMAS)
    assert dict(sql_mixin.SQLITE_PRAGMAS)["busy_timeout"] == "5000"  # Flower 1.42's default
    flower_patches.superlink_sqlite_busy_timeout(local_superlink.BUSY_TIMEOUT_MS)
    connection = sqlite3.connect(tmp_path / "state.db")
    sql_mixin._set_sqlite_pragmas(connection, None)
    timeout = connection.execute("PRAGMA busy_timeout").fetchone()[0]
    assert timeout == local_superlink.BUSY_TIMEOUT_MS
    assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # the rest kept


def test_an_idle_supernode_asks_for_work_at_the_set_interval(monkeypatch):
    """An idle pull sleeps `time.sleep(3)` through the loop module's own `time`, its local
    waits 0.5 s; the rebound `time` waits at most the setting, and is the real one otherwise."""
    from flwr.supernode import start_client_internal

    source = inspect.getsource(start_client_internal.start_client_internal)
    assert f"time.sleep({supernode.FLOWER_IDLE_SLEEP})" in source
    waits = inspect.getsource(start_client_internal._push_messages)
    assert waits.count("time.sleep(0.5)") == 2  # for its ClientApp's reply, for an object
    monkeypatch.setattr(start_client_internal, "time", time)  # restored after the test
    flower_patches.supernode_waits(supernode.capped_sleep(1.5))
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)  # what the capped sleep asks for
    for flower_wait in (supernode.FLOWER_IDLE_SLEEP, 0.5, 0.05):
        start_client_internal.time.sleep(flower_wait)
    assert slept == [1.5, supernode.LOCAL_WAIT_SECONDS, 0.05]
    assert start_client_internal.time.monotonic is time.monotonic


def test_the_guard_sits_on_both_crossings_of_the_supernode_loop(monkeypatch):
    """The two steps every message crosses, with the arguments the guard uses."""
    from flwr.supernode import start_client_internal as loop

    pull = inspect.signature(loop._pull_and_store_message).parameters
    assert {"state", "object_store", "node_config", "receive", "get_run", "get_fab"} <= set(pull)
    assert {"pull_object", "confirm_message_received"} <= set(pull)
    assert list(inspect.signature(loop._push_messages).parameters) == [
        "state",
        "object_store",
        "send",
        "push_object",
    ]
    assert callable(loop._insert_message) and loop.RunNotRunningException
    source = inspect.getsource(loop.start_client_internal)
    assert "_pull_and_store_message(" in source and "_push_messages(" in source
    for name in ("_pull_and_store_message", "_push_messages"):
        monkeypatch.setattr(loop, name, getattr(loop, name))  # restored after the test
    flower_patches.supernode_message_steps(supernode.guard_messages(lambda config: None))
    assert loop._pull_and_store_message.__name__ == "guarded_pull_and_store"
    assert loop._push_messages.__name__ == "guarded_push"


def test_the_runner_starts_its_clientapp_command_and_no_other_task_type():
    """The command for a ClientApp task, and the task types the SuperExec's plugin accepts
    (Flower's AutoExecPlugin would start any, an AgentApp included)."""
    import flwr.supercore.superexec.executor.subprocess_executor as executor
    import flwr.supernode.runtime.run_clientapp as flower_clientapp
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND, TaskType
    from flwr.supercore.superexec import run_superexec
    from flwr.supercore.superexec.plugin.base_exec_plugin import AutoExecPlugin

    source = Path(flower_clientapp.__file__).read_text()
    for name in ("install_from_fab(", "get_load_client_app_fn(", "push_message("):
        assert name in source and callable(getattr(flower_clientapp, name[:-1]))
    assert executor.TASK_TYPE_TO_COMMAND is TASK_TYPE_TO_COMMAND
    # federimed superexec shortens the task poll through Flower's own variable
    assert run_superexec._TASK_POLL_INTERVAL_ENV == "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
    original = TASK_TYPE_TO_COMMAND[TaskType.CLIENT_APP], AutoExecPlugin.supported_task_types
    try:
        site_runner.use_site_clientapp()
        assert TASK_TYPE_TO_COMMAND[TaskType.CLIENT_APP] == "federimed-clientapp"
        # ClientApps at a hospital, ServerApps at the consortium's runner; nothing else
        assert AutoExecPlugin.supported_task_types == {TaskType.CLIENT_APP, TaskType.SERVER_APP}
        plugin = AutoExecPlugin("127.0.0.1:1", True, None, executor=None)
        for task_type in set(TaskType) - {TaskType.CLIENT_APP, TaskType.SERVER_APP}:
            task = type("Task", (), {"type": task_type.value, "task_id": 1})()
            assert plugin._get_supported_task_type(task) is None, task_type
    finally:
        TASK_TYPE_TO_COMMAND[TaskType.CLIENT_APP], AutoExecPlugin.supported_task_types = original


def _spec(task_type):
    from flwr.supercore.superexec.executor.types import ExecutionSpec

    return ExecutionSpec(
        task_type=task_type,
        runtime_api_address="127.0.0.1:9094",
        token="token-1",
        insecure=True,
        root_certificates_path=None,
        runtime_dependency_install=False,
        parent_pid=4321,
        suppress_output=False,
        task_id=1,
    )


def test_clientapp_launches_go_to_the_warm_parent_and_fall_back_when_it_is_gone(monkeypatch):
    """Flower's subprocess executor, unchanged, with the module it starts processes through."""
    import flwr.supercore.superexec.executor.subprocess_executor as executor
    from flwr.supercore.constant import TaskType

    assert "subprocess.Popen(" in Path(executor.__file__).read_text()

    class Starter:
        command, alive, started = "federimed-clientapp", True, []

        def start(self, argv):
            self.started.append(argv)
            return self.alive

    cold = []
    monkeypatch.setattr(subprocess, "Popen", lambda argv, **kwargs: cold.append(argv))
    monkeypatch.setattr(executor, "subprocess", executor.subprocess)  # restored afterwards
    monkeypatch.setitem(executor.TASK_TYPE_TO_COMMAND, TaskType.CLIENT_APP, "federimed-clientapp")
    starter = Starter()
    warm.use_warm_starts(starter)
    executor.SubprocessExecutor().launch(_spec(TaskType.CLIENT_APP))
    assert starter.started == [
        ["federimed-clientapp", "--runtime-api-address", "127.0.0.1:9094",
         "--token", "token-1", "--insecure", "--parent-pid", "4321"]
    ]  # fmt: skip
    assert cold == []
    starter.alive = False  # the warm parent died: the task still starts, cold
    executor.SubprocessExecutor().launch(_spec(TaskType.CLIENT_APP))
    assert cold == [starter.started[-1]]
    executor.SubprocessExecutor().launch(_spec(TaskType.SERVER_APP))  # not ours to warm
    assert cold[-1][0] == executor.TASK_TYPE_TO_COMMAND[TaskType.SERVER_APP]


def test_a_task_first_asks_for_its_message_after_a_tenth_of_a_second(monkeypatch):
    """Flower's task pulls its message through pull_and_inflate_object_from_tree with the
    function's default backoff."""
    import flwr.supernode.runtime.run_clientapp as flower_clientapp

    pull = flower_clientapp.pull_and_inflate_object_from_tree
    monkeypatch.setattr(pull, "__kwdefaults__", dict(pull.__kwdefaults__))  # restored after
    assert pull.__kwdefaults__["initial_backoff"] == 1
    source = inspect.getsource(flower_clientapp.pull_task_input)
    assert "pull_and_inflate_object_from_tree(" in source and "initial_backoff" not in source
    site_runner.quicker_first_pulls()
    assert pull.__kwdefaults__["initial_backoff"] == site_runner.FIRST_PULL_BACKOFF


def test_the_guard_reads_a_message_whose_arrays_the_node_already_held():
    """Flower pulls only what the node's object store lacks: a run that starts from the same
    seeded model as one before it brings its arrays' objects no more.  The guard still reads
    the whole message (it once got a KeyError, and refused the hospital's update)."""
    import numpy as np
    from flwr.app import Array, ArrayRecord
    from flwr.supercore.inflatable.inflatable_object import (
        get_all_nested_objects,
        get_object_tree,
        iterate_object_tree,
    )
    from flwr.supercore.object_store.in_memory_object_store import InMemoryObjectStore

    arrays = ArrayRecord({"exchanged": Array(np.arange(6, dtype=np.float32))})
    message = train_task(arrays)
    objects = {oid: obj.deflate() for oid, obj in get_all_nested_objects(message).items()}
    tree, store = get_object_tree(message), InMemoryObjectStore()
    held = get_object_tree(arrays)  # an earlier message's arrays, still stored
    store.preregister(1, held)
    held_ids = {node.object_id for node in iterate_object_tree(held)}
    for oid in held_ids:
        store.put(oid, objects[oid])
    to_pull = set(store.preregister(1, tree))
    assert to_pull and not to_pull & held_ids  # Flower would pull only these
    pulled = {oid: objects[oid] for oid in to_pull}
    contents = supernode.received_contents(tree, pulled, store)
    assert contents == objects
    inflated = supernode._inflate(tree.object_id, contents)
    received = inflated.content["arrays"].to_numpy_ndarrays()[0]
    assert received.tolist() == [0, 1, 2, 3, 4, 5]
