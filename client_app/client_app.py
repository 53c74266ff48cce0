"""FederiMed ClientApp: runs inside a hospital, next to its data, and sends back only weights.

The hospital's data folder comes from the SuperNode's node config (``data-path``); the text
never leaves this process. Replies carry the LoRA adapter (and the encoder's head) and numeric
metrics only.
The hospital's site policy is not this app's business: the guard in the hospital's SuperNode
(federimed/hospital/guard.py) admits each task against it before this code runs, and rebuilds
each reply from its checked parts (one ArrayRecord ``arrays``, one MetricRecord ``metrics``)
before it leaves, clipped to the hospital's bound.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import psutil
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from federimed.learning.model import quiet_libraries
from federimed.runconfig import RunConfig
from federimed.tracks import track_for
from federimed.tracks.hospital_round import NodeIdentity

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


def _number(config: ConfigRecord, key: str, default: float | None = None) -> float:
    """A number the server's config record must carry (a clear error when it does not)."""
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"the server's config record: {key!r} is {value!r}, not a number")
    return float(value)


Metrics = dict[str, int | float | list[int] | list[float]]  # what a MetricRecord holds


@app.train()
def train(msg: Message, context: Context) -> Message:
    # Flower starts a process per message: what that costs before any work, per round.
    startup = _process_age()
    run = RunConfig.from_flower(context.run_config)
    config = msg.content.config_records["config"]
    state, metrics = track_for(run.track).train_round(
        run,
        NodeIdentity.from_node_config(context.node_config),
        msg.content.array_records["arrays"].to_torch_state_dict(),
        server_round=int(_number(config, "server-round")),
        proximal_mu=_number(config, "proximal-mu", 0.0),
    )
    reply: Metrics = {**metrics, "startup_seconds": startup}
    content = RecordDict(
        {
            "arrays": ArrayRecord(state),
            "metrics": MetricRecord(reply),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    run = RunConfig.from_flower(context.run_config)
    metrics = track_for(run.track).evaluate_round(
        run,
        NodeIdentity.from_node_config(context.node_config),
        msg.content.array_records["arrays"].to_torch_state_dict(),
    )
    scores: Metrics = {**metrics}
    content = RecordDict({"metrics": MetricRecord(scores)})
    return Message(content=content, reply_to=msg)
