"""The training history of /status (and the dashboard), folded from every lifecycle event on ``training-runs``.

The fold is the one every reader of the log shares, :class:`schemas.runs.RunsFold`: one record per run (its
stages and when each happened, its model version, its evaluation metrics and the gate's verdict), the promotion
stack (the model in force), and totals that count every run and every event ever read, so they stay right however
many runs there were; memory is bounded by runs (the newest ``max_runs`` keep a record, plus one id per run for the
count), never by a number of events.
"""

from __future__ import annotations

from typing import Any

from schemas.runs import LIFECYCLE, RunRecord, RunsFold


class RunHistory(RunsFold):
    """The shared fold, bounded; ``block()`` is the trainer block's history part of /status."""

    def __init__(self, max_runs: int = 1000, shown_runs: int = 50, shown_versions: int = 50) -> None:
        super().__init__(max_runs=max_runs)
        self.shown_runs, self.shown_versions = shown_runs, shown_versions

    def block(self) -> dict[str, Any]:
        return self.summary(self.shown_runs, self.shown_versions)


__all__ = ["LIFECYCLE", "RunHistory", "RunRecord"]
