"""Every name FederiMed rebinds inside Flower, in one place, for one Flower version.

Flower's public API (its CLIs' flags, run config, node config, the app API) covers what an app
and a deployment declare, not how its processes wait, launch or store.  Where FederiMed needs
to change one of those, it rebinds a name inside Flower; each function here is one such
rebinding, its docstring says why no public setting does it, and each starts by refusing a
Flower other than the one it was written against (:data:`WRITTEN_FOR`): an upgrade must look
at every rebinding again, never run on one that now misses its target.
``tests/test_flower_patches.py`` pins the Flower code each one relies on.

Who calls what:

- the local federation's SuperLink (``federimed/deploy/local_superlink.py``):
  :func:`superlink_sqlite_busy_timeout`;
- a hospital's SuperNode (``federimed/hospital/supernode.py``): :func:`supernode_waits`,
  :func:`supernode_message_steps` (the guard);
- a ClientApp runner, ``federimed superexec`` (``federimed/cli.py``, ``site_runner.py``,
  ``warm.py``): :func:`superexec_task_types`, :func:`superexec_popen`,
  :func:`clientapp_first_pull_backoff`.
"""

from __future__ import annotations

import importlib.metadata
import types
from collections.abc import Callable, Collection
from typing import Any

WRITTEN_FOR = "1.42"  # major.minor of the flwr these rebindings were read against


class FlowerVersionError(RuntimeError):
    """The installed Flower is not the one this module's rebindings were written against."""


def require_written_for() -> None:
    installed = importlib.metadata.version("flwr")
    if ".".join(installed.split(".")[:2]) != WRITTEN_FOR:
        raise FlowerVersionError(
            f"flwr {installed} is installed, but FederiMed's rebindings of Flower's internals "
            f"(federimed/deploy/flower_patches.py) were written against flwr {WRITTEN_FOR}.x: "
            f"install flwr=={WRITTEN_FOR}.* (pyproject.toml pins it), or check each rebinding "
            f"against the new Flower (tests/test_flower_patches.py) and update WRITTEN_FOR"
        )


def superlink_sqlite_busy_timeout(timeout_ms: int) -> None:
    """The SuperLink's SQLite connections wait ``timeout_ms`` for the write lock, not 5 s.

    Flower sets ``PRAGMA busy_timeout = 5000`` on every connection from the constant
    ``SQLITE_PRAGMAS`` (``flwr/supercore/sql_mixin.py``, read at connect time) and has no flag
    for it.  Why the local federation needs longer: ``local_superlink.py``."""
    require_written_for()
    import flwr.supercore.sql_mixin as sql_mixin

    pragmas = tuple(sql_mixin.SQLITE_PRAGMAS)
    if "busy_timeout" not in dict(pragmas):
        raise FlowerVersionError("flwr.supercore.sql_mixin.SQLITE_PRAGMAS sets no busy_timeout")
    longer = tuple(
        (name, str(timeout_ms) if name == "busy_timeout" else value) for name, value in pragmas
    )
    setattr(sql_mixin, "SQLITE_PRAGMAS", longer)  # noqa: B010 (a rebinding, on purpose)


def supernode_waits(sleep: Callable[[float], None]) -> None:
    """The SuperNode's loop sleeps through ``sleep`` (the rest of its ``time`` is the real one).

    Its idle pull sleeps a fixed 3 s and its local waits 0.5 s, written as ``time.sleep(...)``
    in ``flwr/supernode/start_client_internal.py``, with no setting.  Why shorter:
    ``supernode.py``."""
    require_written_for()
    import time

    from flwr.supernode import start_client_internal

    names = {name: getattr(time, name) for name in dir(time) if not name.startswith("_")}
    clock = types.SimpleNamespace(**(names | {"sleep": sleep}))
    setattr(start_client_internal, "time", clock)  # noqa: B010 (a rebinding, on purpose)


def supernode_message_steps(
    wrap: Callable[[types.ModuleType], tuple[Callable[..., Any], Callable[..., Any]]],
) -> None:
    """Replace the two steps of the SuperNode's loop that every message of a run crosses,
    ``_pull_and_store_message`` (in) and ``_push_messages`` (out), by what ``wrap(loop
    module)`` makes of them (the hospital's guard: ``supernode.guard_messages``).

    Flower has no hook on either: a SuperNode stores, runs and sends whatever its SuperLink
    hands it and its ClientApp returns, and the guard must sit on both crossings, in the
    process the app cannot reach."""
    require_written_for()
    from flwr.supernode import start_client_internal

    pull, push = wrap(start_client_internal)
    start_client_internal._pull_and_store_message = pull
    start_client_internal._push_messages = push


def superexec_task_types(clientapp_command: str, task_types: Collection[Any]) -> None:
    """This process's SuperExec starts ``clientapp_command`` for a ClientApp task (instead of
    ``flwr-clientapp``) and no task type outside ``task_types``.

    The command comes from the constant ``TASK_TYPE_TO_COMMAND`` (``flwr/supercore/
    constant.py``) and the task types from ``AutoExecPlugin.supported_task_types``, every
    ``TaskType`` (``flwr/supercore/superexec/plugin/base_exec_plugin.py``); neither has a
    flag.  Why: ``site_runner.py`` (the approved bundle's own code, in a fresh home; never an
    AgentApp)."""
    require_written_for()
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND, TaskType
    from flwr.supercore.superexec.plugin.base_exec_plugin import AutoExecPlugin

    TASK_TYPE_TO_COMMAND[TaskType.CLIENT_APP] = clientapp_command
    AutoExecPlugin.supported_task_types = frozenset(task_types)


def superexec_popen(popen: Callable[..., Any]) -> None:
    """This process's SuperExec starts its task processes through ``popen``.

    Its subprocess executor calls ``subprocess.Popen(argv)`` (``flwr/supercore/superexec/
    executor/subprocess_executor.py``) and takes no launcher.  Why: ``warm.py`` (a ClientApp
    forked from a parent that has imported torch once)."""
    require_written_for()
    import subprocess

    import flwr.supercore.superexec.executor.subprocess_executor as executor

    launcher = types.SimpleNamespace(Popen=popen, DEVNULL=subprocess.DEVNULL)
    setattr(executor, "subprocess", launcher)  # noqa: B010 (a rebinding, on purpose)


def clientapp_first_pull_backoff(seconds: float) -> None:
    """A ClientApp's first wait for its message's objects is ``seconds``, not 1 s.

    ``pull_and_inflate_object_from_tree`` (``flwr/supernode/runtime/run_clientapp.py``) backs
    off from its keyword default ``initial_backoff=1`` and its caller passes none.  Why
    shorter: ``site_runner.quicker_first_pulls``."""
    require_written_for()
    import flwr.supernode.runtime.run_clientapp as flower_clientapp

    defaults = flower_clientapp.pull_and_inflate_object_from_tree.__kwdefaults__
    if not defaults or "initial_backoff" not in defaults:
        raise FlowerVersionError("pull_and_inflate_object_from_tree has no initial_backoff")
    defaults["initial_backoff"] = seconds
