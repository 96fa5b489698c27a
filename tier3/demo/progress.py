"""When is the demo done? The state machine over what the monitor saw: every stage finished, each run through its
close-the-loop steps (bounded waits), and the demo's own steps (``tier3 train-now``, ``tier3 close-loop``,
``--promote``) taken when they are due."""

from __future__ import annotations

import shlex
import subprocess
import sys
import time

from schemas import TrainingRun
from tier3.demo.display import version_label
from tier3.demo.monitor import Observed, RunInfo
from tier3.demo.options import REPO_ROOT, DemoOptions, Session
from tier3.demo.supervise import Child, DemoState, start_child


def finished(obs: Observed, session: Session, opts: DemoOptions, state: DemoState, *, all_published: bool,
             delivered: int) -> tuple[bool, str]:
    """Is every stage done? Every sampled experience enriched or dead-lettered, every trace inside a trained model
    (committed), and every run through its close-the-loop steps (see :func:`run_pending`)."""
    if not all_published or delivered < session.n_examples:
        return False, ""
    if len(obs.trace_ids) + obs.dead_letters < session.expected_sampled:
        return False, ""
    # (the offsets probe runs every second: until it has seen every trace the consumer read, it is stale)
    if obs.traces_total == 0 or obs.traces_total < obs.trace_messages or obs.traces_committed < obs.traces_total:
        return False, ""
    if any(run_pending(r, state.closers.get(r.run_id), opts) for r in obs.runs.values()):
        return False, ""
    if trainer_busy(obs.heartbeat):
        return False, ""
    return True, "complete"


def trainer_busy(hb: TrainingRun | None) -> bool:
    """The trainer's heartbeat says a run trains or a committed run's close loop runs (its partitions are held
    for ``run`` or ``close_loop``, trainer/hold.py); ``training_in_progress`` alone is true only while training."""
    if hb is None:
        return False
    return bool(hb.training_in_progress) or bool({"run", "close_loop"} & set(hb.details.get("held_for") or ()))


def run_pending(r: RunInfo, closer: Child | None, opts: DemoOptions) -> bool:
    """Is this run still on its way? started -> succeeded|failed -> evaluated -> promoted|rejected -> exported
    (when promoted). The trainer, or the demo's ``tier3 close-loop`` (``closer``) when the trainer sends no
    evaluation, takes the later steps; each wait is bounded, so a missing step ends in a note, not a hang."""
    if "started" in r.events and not {"succeeded", "failed"} & set(r.events):
        return True  # still training
    if "succeeded" not in r.events:
        return False
    if closer is not None and closer.alive():
        return True
    if "evaluated" not in r.events:
        since, bound = r.seen_mono["succeeded"], opts.eval_wait_s
    elif r.verdict is None:
        since, bound = r.seen_mono["evaluated"], opts.eval_wait_s
    elif r.verdict == "promoted" and "exported" not in r.events:
        since, bound = r.seen_mono["promoted"], opts.export_wait_s
    else:
        return False
    if closer is not None:
        return closer.exited_for_s() < 10.0  # it just finished: its events may still be on their way to us
    if r.trainer_closes:  # the trainer's gate and export follow its commit: give them the export's time
        bound = max(bound, opts.export_wait_s)
    return time.monotonic() - since < bound


def maybe_train_now(obs: Observed, session: Session, state: DemoState) -> None:
    """Once every sampled experience is enriched, ask the trainer for a run over the traces it has not trained on
    (``tier3 train-now``, the manual trigger) instead of waiting for its check interval."""
    env, requested = state.train_now_env, state.train_now_requested
    if env is None or len(obs.trace_ids) + obs.dead_letters < session.expected_sampled:
        return
    total = obs.traces_total
    if total < obs.trace_messages:  # the offsets probe (every second) has not caught up with the consumer yet
        return
    if total == 0 or obs.traces_committed >= total or total in requested:
        return
    hb = obs.heartbeat
    if hb is None or trainer_busy(hb):
        return
    # only once the trainer has read every trace it has not trained on (else the run would take a few of them
    # and the rest would wait for the next trigger)
    if int(hb.details.get("pending_messages") or 0) < total - obs.traces_committed:
        return
    if any("started" in r.events and not {"succeeded", "failed"} & set(r.events) for r in obs.runs.values()):
        return
    requested.add(total)
    state.oneshots.append(start_child(f"train-now-{len(requested)}", ["train-now"], env, session.demo_dir))
    display_note = f"all {len(obs.trace_ids)} traces are in: `tier3 train-now` for the ones not yet trained"
    obs.notes_live.append(display_note)


def force_promote(obs: Observed, session: Session, state: DemoState) -> bool:
    """``--promote``: when no version earned a promotion, promote the newest evaluated one by hand (``tier3 promote
    --force``, as an operator would) and export it (``tier3 export``), so the last stages run too. True if it
    started."""
    env = state.closer_env
    if env is None or any(r.verdict == "promoted" for r in obs.runs.values()):
        return False
    evaluated = sorted((r for r in obs.runs.values() if "evaluated" in r.events), key=lambda r: r.first_ms)
    if not evaluated:
        return False
    run = evaluated[-1]
    state.forced = run.run_id
    cli = [sys.executable, "-m", "tier3"]
    script = (f"{shlex.join([*cli, 'promote', run.run_id, '--force', '--reason', 'tier3 demo --promote'])} && "
              f"{shlex.join([*cli, 'export', run.run_id])}")
    log_path = session.demo_dir / f"promote-{version_label(run)}.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(["/bin/sh", "-c", script], env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, cwd=str(REPO_ROOT))
    state.closers[run.run_id] = Child(f"promote-{version_label(run)}", proc, log_path)
    obs.notes_live.append(f"--promote: promoting {version_label(run)} by hand (`tier3 promote --force`) and "
                          "exporting it")
    return True


def start_closers(obs: Observed, session: Session, opts: DemoOptions, state: DemoState) -> None:
    """``tier3 close-loop RUN_ID`` (evaluation, the gate's verdict, export when promoted) for each run that
    succeeded ``eval_wait_s`` ago with no ``evaluated`` event: a trainer that does not close the loop itself."""
    env, closers = state.closer_env, state.closers
    if env is None:
        return
    for r in obs.runs.values():
        if ("succeeded" in r.events and "evaluated" not in r.events and r.run_id not in closers
                and not r.trainer_closes and time.monotonic() - r.seen_mono["succeeded"] >= opts.eval_wait_s):
            closers[r.run_id] = start_child(f"close-loop-{version_label(r)}", ["close-loop", r.run_id], env,
                                           session.demo_dir)
