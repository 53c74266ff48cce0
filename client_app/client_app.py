"""FederiMed ClientApp: runs inside a hospital, next to its data, and sends back only weights.

The hospital's data folder comes from the SuperNode's node config (``data-path``); the text
never leaves this process. Replies carry the LoRA adapter (and the encoder's head) and numeric
metrics only.
The hospital's site policy (``FEDERIMED_SITE_POLICY``, never the run config) sets the floors a
training task must meet and the bound on each update's norm; without one, nothing runs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import ModuleType

import psutil
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from federimed.model import quiet_libraries
from federimed.policy import policy_from_env
from federimed.runconfig import RunConfig
from federimed.task import NodeIdentity

quiet_libraries()
app = ClientApp()


def _process_age() -> float:
    """Seconds since this process started.  On Linux from the kernel's own clock (psutil's
    start time counts from the boot time rounded down to a whole second: up to 1 s too old)."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, ticks after boot
        return time.clock_gettime(time.CLOCK_BOOTTIME) - started
    except (OSError, AttributeError, IndexError, ValueError):
        return time.time() - psutil.Process().create_time()


def _identity(msg: Message, context: Context) -> ConfigRecord:
    """Which hospital answered, for which round: lets the server report per hospital."""
    return ConfigRecord(
        {
            "hospital": str(context.node_config.get("hospital", "")),
            "server-round": int(msg.content["config"]["server-round"]),
        }
    )


def _track(run: RunConfig) -> ModuleType:
    """The round's steps for the run's track: the encoder's or the causal LM's."""
    if run.track == "generative":
        from federimed import generative

        return generative
    from federimed import task

    return task


@app.train()
def train(msg: Message, context: Context) -> Message:
    # Flower starts a process per message: what that costs before any work, per round.
    startup = _process_age()
    run = RunConfig.from_flower(context.run_config)
    config = msg.content["config"]
    state, metrics = _track(run).train_round(
        run,
        NodeIdentity.from_node_config(context.node_config),
        msg.content["arrays"].to_torch_state_dict(),
        server_round=int(config["server-round"]),
        proximal_mu=float(config.get("proximal-mu", 0.0)),
        policy=policy_from_env(),
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord(state),
            "metrics": MetricRecord(metrics | {"startup_seconds": startup}),
            "node": _identity(msg, context),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    policy_from_env()  # no usable site policy, no task
    run = RunConfig.from_flower(context.run_config)
    metrics = _track(run).evaluate_round(
        run,
        NodeIdentity.from_node_config(context.node_config),
        msg.content["arrays"].to_torch_state_dict(),
    )
    content = RecordDict({"metrics": MetricRecord(metrics), "node": _identity(msg, context)})
    return Message(content=content, reply_to=msg)
