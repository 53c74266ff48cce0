"""FederiMed ServerApp: runs at the consortium, never sees a patient record.

Sends the global adapter to the sampled hospitals each round, aggregates their updates with the
configured strategy, evaluates on the common test set, checkpoints every round and saves the
final model where `transformers` and `peft` load it directly.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from federimed.model import count_parameters, exchanged_state, quiet_libraries
from federimed.runconfig import RunConfig
from federimed.server import GlobalModel, RoundLog, make_strategy, record_bytes

quiet_libraries()
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run = RunConfig.from_flower(context.run_config)
    out = Path(run.output_dir) / str(context.run_id)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    round_log = RoundLog(audit_dir=out / "audit" if run.audit_messages else None)
    global_model = GlobalModel(run, out)
    initial = ArrayRecord(exchanged_state(global_model.model))
    result = make_strategy(run, round_log).start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=run.num_server_rounds,
        train_config=ConfigRecord({"learning-rate": run.learning_rate}),
        evaluate_fn=global_model.evaluate,
    )
    final = global_model.save_final(result.arrays)
    trainable, total = count_parameters(global_model.model)
    summary = {
        "run_id": context.run_id,
        "run_config": run.model_dump(),
        "rounds": {str(k): v for k, v in sorted(round_log.rounds.items())},
        "server_evaluation": {str(k): v for k, v in global_model.history.items()},
        "update_bytes": record_bytes(initial),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "final_model": str(final),
        "wall_seconds": time.monotonic() - started,
    }
    (out / "metrics.json").write_text(json.dumps(summary, indent=2, default=str))
