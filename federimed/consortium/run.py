"""One run at the consortium: the strategy's rounds over the grid, the record written as they
end, a dead run resumed, the summary written at the end.

The ServerApp (``server_app/``) only builds a :class:`ServerRun` and starts it; the jobs are
in the modules beside this one (checks, grid, recorder, strategy, resume, global model).
"""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import cast

from flwr.app import ArrayRecord
from flwr.serverapp import Grid

from federimed.consortium.checks import as_sent, record_bytes
from federimed.consortium.global_model import global_model_for
from federimed.consortium.grid import DeadlineGrid, RunDeadline
from federimed.consortium.recorder import RoundRecorder
from federimed.consortium.resume import ResumeError, resume_point
from federimed.consortium.strategy import make_strategy
from federimed.learning.model import (
    count_parameters,
    exchanged_state,
    to_wire,
)
from federimed.runconfig import RunConfig
from federimed.runrecord import (
    RoundRecord,
    RunFailure,
    RunSummary,
    append_round,
    read_rounds,
    write_failure,
    write_provenance,
    write_run_config,
    write_summary,
)

log = logging.getLogger("flwr.federimed.server")


class ServerRun:
    """One run at the consortium: rounds through the strategy, the record written as they end.

    With ``resume-from`` it continues a dead run: that run's rounds are copied into this run's
    record, its last checkpoint is the starting model, and only the rounds left are done.
    """

    def __init__(self, run: RunConfig, run_id: int):
        self.run = run
        self.run_id = run_id
        self.out = Path(run.output_dir) / str(run_id)
        self.recorder = RoundRecorder(self.out, audit=run.audit_messages)
        self.scores: dict[int, dict[str, float] | None] = {}
        self._scorer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="federimed-scoring")
        self._scoring: Future | None = None
        self.resumed: tuple[list[RoundRecord], ArrayRecord] | None = None
        if run.resume_from:
            self.resumed = resume_point(run)
            done = self.resumed[0][-1].round
            if done >= run.num_server_rounds:
                raise ResumeError(
                    f"resume-from={run.resume_from}: it completed {done} round(s), "
                    f"num-server-rounds is {run.num_server_rounds}: nothing is left to do"
                )
        self.out.mkdir(parents=True, exist_ok=True)
        write_run_config(self.out, run)
        self.global_model = global_model_for(run, self.out)
        self.offset = 0
        if self.resumed is not None:
            rounds, _ = self.resumed
            self.offset = rounds[-1].round
            for record in rounds:
                append_round(self.out, record)
                self.scores[record.round] = record.test.model_dump() if record.test else None

    def _end_of_round(self, flower_round: int, arrays: ArrayRecord) -> None:
        """Flower calls this before its round 1 and as the last step of every round.

        The global model is checkpointed and the round's record closed here; scoring the model
        on the common test set (seconds of CPU on a small server) runs beside the next round,
        whose hospitals spend its first seconds starting up, and then appends the round's line.
        The next call waits for it: a model is not replaced while it is scored, and the lines
        stay in round order."""
        server_round = flower_round + self.offset
        self.wait_for_scoring()
        self.global_model.load(server_round, arrays)
        record = self.recorder.close(server_round) if flower_round else None
        if flower_round == 0:
            self.recorder.restart_clock()  # round 1's time starts now, not with the server
            if self.offset:
                return  # a resumed checkpoint: its run scored it
        self._scoring = self._scorer.submit(self._score, server_round, record)

    def _score(self, server_round: int, record: RoundRecord | None) -> None:
        scores = self.global_model.score(server_round)
        self.scores[server_round] = scores
        if record is not None:
            self.recorder.write(record, scores)

    def wait_for_scoring(self) -> None:
        """Until the last round handed to the scoring thread is scored and recorded (its
        failure is raised here)."""
        if self._scoring is not None:
            scoring, self._scoring = self._scoring, None
            scoring.result()

    def _initial_arrays(self, seeded: ArrayRecord) -> ArrayRecord:
        if self.resumed is None:
            return seeded
        self.scores[0] = self.global_model.score(0)  # the seeded model, as the first run saw it
        return self.resumed[1]

    def start(self, grid: Grid) -> RunSummary:
        started = time.monotonic()
        seeded = ArrayRecord(to_wire(exchanged_state(self.global_model.model)))
        strategy = make_strategy(self.run, self.recorder, round_offset=self.offset)
        deadline = started + self.run.run_deadline if self.run.run_deadline else math.inf
        grid = cast(Grid, DeadlineGrid(grid, deadline))  # a Grid by duck typing
        status = "completed"
        try:
            strategy.start(
                grid=grid,
                initial_arrays=self._initial_arrays(seeded),
                num_rounds=self.run.num_server_rounds - self.offset,
                timeout=self.run.round_timeout,
                evaluate_fn=self._end_of_round,
            )
        except RunDeadline:
            status = "deadline"
            log.warning(
                "run-deadline of %g s passed: the run ends after round %d",
                self.run.run_deadline,
                max(self.scores, default=0),
            )
        except Exception as error:
            self._scorer.shutdown(wait=True)  # the rounds already done, recorded
            done = len(read_rounds(self.out))
            write_failure(self.out, RunFailure(run_id=self.run_id, reason=str(error),
                                               rounds_completed=done))  # fmt: skip
            raise
        finally:
            self._scorer.shutdown(wait=True)  # the last round's score, even when a round failed
        self.wait_for_scoring()
        final = self.global_model.save_final()
        trainable, total = count_parameters(self.global_model.model)
        last = max(self.scores, default=0)
        summary = RunSummary(
            run_id=self.run_id,
            status=status,
            run_config=self.run.to_flower(),
            rounds_completed=last,
            resumed_from=self.run.resume_from or None,
            updates_rejected=self.recorder.rejected_total,
            initial_test=self.scores.get(0),
            final_test=self.scores.get(last),
            update_bytes=record_bytes(as_sent(seeded, self.run.wire_precision)),
            trainable_parameters=trainable,
            total_parameters=total,
            final_model=str(final),
            wall_seconds=time.monotonic() - started,
        )
        write_summary(self.out, summary)
        write_provenance(final, self.run, summary, read_rounds(self.out))
        return summary
