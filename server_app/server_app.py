"""FederiMed ServerApp: runs at the consortium, never sees a patient record.

Sends the global adapter to the sampled hospitals each round, aggregates their updates with the
configured strategy, evaluates on the common test set, checkpoints and records every round as
it ends (``rounds.jsonl``), and saves the final model where `transformers` and `peft` load it.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from federimed.consortium.run import ServerRun
from federimed.learning.model import quiet_libraries
from federimed.priority import yield_once_started
from federimed.runconfig import RunConfig

quiet_libraries()
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    yield_once_started()
    run = RunConfig.from_flower(context.run_config)
    ServerRun(run, context.run_id).start(grid)
