"""The hospital's ClientApp runner: Flower's own ``flwr-clientapp``, in a clean room per task.

The hospital's checks do not live here: this process runs the consortium's code, so nothing in
it can be trusted to hold a promise.  They live in the hospital's SuperNode
(:mod:`federimed.hospital.guard`), which admits a task before this process is started and
rebuilds every reply before it leaves.  What this runner does is make sure that what runs is
exactly the bundle the hospital approved, and nothing left over from another:

- each task installs the bundle into a fresh, empty ``FLWR_HOME`` (removed when the task ends).
  Flower installs into a folder named by publisher, name, version and the first 8 hex digits of
  the hash, and skips the install if that folder exists (``flwr/cli/install.py``): a bundle
  crafted to share those with a revoked one would otherwise run the revoked code;
- the hospital's own ``federimed`` (imported by this runner and its warm parent) is dropped from
  ``sys.modules`` before the bundle loads, so the bundle's own modules run, not the hospital's
  copies of them: the hash approves the code that executes.

``federimed superexec`` makes Flower's SuperExec start this command instead of
``flwr-clientapp``, and launch no AgentApp or other task type (:func:`use_site_clientapp`).
One more rebinding is about time, not trust (:func:`quicker_first_pulls`).  The rebindings
are in :mod:`federimed.deploy.flower_patches`.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

from flwr.supercore.constant import TaskType

from federimed.deploy.flower_patches import clientapp_first_pull_backoff, superexec_task_types

COMMAND = "federimed-clientapp"
# The packages a bundle brings: the hospital's copies must not answer its imports.
BUNDLE_PACKAGES = ("federimed", "client_app", "server_app")


# What a `federimed superexec` starts: ClientApps at a hospital's SuperNode (the only tasks its
# guard lets exist there), ServerApps at the consortium's SuperLink; never an AgentApp, a
# model, a connector or a simulation.
RUNNER_TASK_TYPES = frozenset({TaskType.CLIENT_APP, TaskType.SERVER_APP})


def use_site_clientapp() -> None:
    """Make this process's SuperExec launch ClientApps through :func:`main`, and no task type
    but :data:`RUNNER_TASK_TYPES`.

    The SuperNode's guard already refuses every other task type before a task exists; this
    is the second lock: Flower's ``AutoExecPlugin`` would start any, an AgentApp included."""
    superexec_task_types(COMMAND, RUNNER_TASK_TYPES)


def fresh_flwr_home() -> str:
    """An empty ``FLWR_HOME`` for this task alone (:func:`main` removes it at the end)."""
    home = tempfile.mkdtemp(prefix="federimed-task-")
    os.environ["FLWR_HOME"] = home
    return home


def forget_hospital_modules() -> None:
    """Drop the hospital's copies of the bundle's packages, so the bundle imports its own."""
    for name in list(sys.modules):
        if name.partition(".")[0] in BUNDLE_PACKAGES:
            del sys.modules[name]


FIRST_PULL_BACKOFF = 0.1  # seconds; Flower's is 1 (flwr.supercore.constant)


def quicker_first_pulls() -> None:
    """The SuperNode hands out a task before it holds all of the task's message (it pulls the
    arrays from the SuperLink after creating the task), so a warm-started task can ask for
    them too early, and Flower's pull then sleeps 1 s, then 2 s more, whatever the arrays'
    actual arrival.  From 0.1 s it asks a few more times, locally, and starts within a tenth
    of a second of their arrival.  (The wait itself, the SuperNode fetching 0.7 MB from the
    SuperLink, stays: 1.5-1.8 s of the demo's round-2 start-up, traced.)"""
    clientapp_first_pull_backoff(FIRST_PULL_BACKOFF)


def main() -> None:
    """``federimed-clientapp``: what Flower's SuperExec starts for each ClientApp task."""
    quicker_first_pulls()
    home = fresh_flwr_home()
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    forget_hospital_modules()
    try:
        flwr_clientapp()
    finally:
        shutil.rmtree(home, ignore_errors=True)
