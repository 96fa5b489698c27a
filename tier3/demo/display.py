"""The demo's display: one progress bar per stage, a line per lifecycle event (lines instead of a live display
when the output is a log, as in CI)."""

from __future__ import annotations

import contextlib
import time
from typing import Any

from rich.console import Console, Group
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from schemas import TrainingRun
from tier3.demo.monitor import VERDICTS, Observed, RunInfo

STAGES = ("published", "sampled", "enriched", "counted", "training", "evaluated", "promoted/rejected", "exported")

console = Console()


class Display:
    """One progress bar per stage, plus a line of what is happening."""

    def __init__(self, n_examples: int, expected_sampled: int) -> None:
        self.progress = Progress(TextColumn("[bold]{task.description:>18}"), BarColumn(bar_width=36),
                                 MofNCompleteColumn(), TextColumn("{task.fields[note]}"), TimeElapsedColumn(),
                                 console=console, expand=False)
        self.tasks: dict[str, TaskID] = {}
        totals = {"published": n_examples, "sampled": expected_sampled, "enriched": expected_sampled,
                  "counted": expected_sampled, "training": None, "evaluated": None, "promoted/rejected": None,
                  "exported": None}
        for stage in STAGES:
            self.tasks[stage] = self.progress.add_task(stage, total=totals[stage], note="")
        self.stages: list[str] = list(STAGES)  # the A/B phase adds its own (add_stage)
        self.line = ""
        self.last_events: list[str] = []
        self.training_text: str | None = None  # the training row in a log line: the trainer's stage (update)

    def renderable(self) -> Group:
        return Group(self.progress, *(f"  [dim]{e}[/]" for e in self.last_events[-4:]))

    def text_line(self) -> str:
        """The bars as one line, for a log (CI) where a live display cannot redraw."""
        parts = []
        for stage in self.stages:
            if stage == "training" and self.training_text:
                parts.append(self.training_text)
                continue
            t = self.progress.tasks[self.tasks[stage]]
            total = "?" if t.total is None else f"{t.total:.0f}"
            parts.append(f"{stage} {t.completed:.0f}/{total}")
        return " · ".join(parts)

    def add_stage(self, stage: str, total: int | None) -> None:
        """A bar for a later phase (the A/B phase's), below the others."""
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(stage, total=total, note="")
            self.stages.append(stage)

    def update_ab(self, sent: int, arms: dict[str, int], expected_shadow: int, figures: dict[str, Any] | None
                  ) -> None:
        """The A/B phase's bars: prompts answered (per arm), and the shadow samples /status's online_eval block
        counts for the served version, with its agreement figures."""
        p = self.progress
        p.update(self.tasks["A/B served"], completed=sent,
                 note=" · ".join(f"{arm} {n}" for arm, n in sorted(arms.items())))
        n = int(figures["n"]) if figures else 0
        p.update(self.tasks["online eval"], total=max(expected_shadow, n, 1), completed=n,
                 note=ab_figures_note(figures))

    def ab_line(self) -> str:
        """The A/B phase's bars as one line (for a log)."""
        parts = []
        for stage in ("A/B served", "online eval"):
            t = self.progress.tasks[self.tasks[stage]]
            total = "?" if t.total is None else f"{t.total:.0f}"
            parts.append(f"{stage} {t.completed:.0f}/{total} {t.fields.get('note', '')}".rstrip())
        return " · ".join(parts)

    def update(self, published: int, obs: Observed, expected_sampled: int) -> None:
        p = self.progress
        p.update(self.tasks["published"], completed=published)
        counts = (obs.status or {}).get("counts") or {}
        sampled = int(counts.get("sampled", 0)) if obs.status else len(obs.trace_ids) + obs.dead_letters
        p.update(self.tasks["sampled"], completed=min(sampled, expected_sampled) if expected_sampled else sampled,
                 note=f"{counts.get('consumed', '?')} consumed, {counts.get('not_sampled', '?')} not sampled"
                 if obs.status else f"[yellow]/status: {obs.status_error or 'waiting'}")
        p.update(self.tasks["enriched"], completed=len(obs.trace_ids),
                 note=f"{obs.dead_letters} dead-lettered" if obs.dead_letters else "")
        p.update(self.tasks["counted"], completed=obs.counted(),
                 note=f"in {obs.windows_used()} windows of {obs.window_s()} s" if obs.status else "")
        hb = obs.heartbeat
        activity = trainer_note(hb)
        steps = training_steps(hb)
        if steps is not None:  # a run trains: the bar counts its optimiser steps
            assert hb is not None
            step, total_steps = steps
            p.update(self.tasks["training"], total=total_steps, completed=step,
                     note=" · ".join([*training_figures(hb), f"steps of {str(hb.details.get('run_id'))[:24]}"]))
            self.training_text = activity
        else:  # otherwise the traces inside a trained model (the trainer group's committed offsets)
            total = obs.traces_total
            p.update(self.tasks["training"], total=max(total, 1), completed=obs.traces_committed,
                     note=(activity + " · " if activity else "") + "traces inside a trained model")
            self.training_text = (f"training {obs.traces_committed}/{total} traces"
                                  + (f" · {activity}" if activity else ""))
        ok = obs.runs_with("succeeded")
        evaluated = obs.runs_with("evaluated")
        verdicts = [r for r in obs.runs.values() if r.verdict]
        promoted = obs.runs_with("promoted")
        # every candidate is exported before the gate judges it; this row counts the promoted versions registered
        # for serving (an `exported` event after the promotion)
        exported = [r for r in promoted if "exported" in r.events[r.events.index("promoted"):]]
        failed = obs.runs_with("failed")
        p.update(self.tasks["evaluated"], total=len(ok), completed=len(evaluated),
                 note=f"{len(ok)} runs succeeded" + (f", {len(failed)} failed" if failed else ""))
        p.update(self.tasks["promoted/rejected"], total=len(evaluated), completed=len(verdicts),
                 note=" · ".join(f"{version_label(r)} {r.verdict}" for r in verdicts[-4:]))
        p.update(self.tasks["exported"], total=len(promoted), completed=len(exported),
                 note="" if promoted else "only promoted versions are served (candidates are exported to be judged)")


#: how the display names the stages of the trainer's heartbeat (``details.stage``, trainer/stage.py)
STAGE_LABELS = {"idle": "idle", "training": "training", "evaluating": "evaluating", "close_loop": "closing the loop",
                "exporting": "exporting", "evaluating_served": "evaluating (served)", "gating": "gating",
                "registering": "registering"}


def duration(s: float) -> str:
    """Seconds as ``45s``, ``6m10s``, ``1h02m``."""
    n = max(0, round(s))
    if n < 60:
        return f"{n}s"
    if n < 3600:
        return f"{n // 60}m{n % 60:02d}s"
    return f"{n // 3600}h{n % 3600 // 60:02d}m"


def trainer_stage(hb: TrainingRun | None) -> str | None:
    """The stage of the trainer's heartbeat; from ``training_in_progress`` for a trainer that sends none."""
    if hb is None:
        return None
    st = hb.details.get("stage")
    if isinstance(st, str) and st:
        return st
    return None if hb.training_in_progress is None else "training" if hb.training_in_progress else "idle"


def training_steps(hb: TrainingRun | None) -> tuple[int, int] | None:
    """(step, total_steps) while a run trains and its step count is known, else None."""
    if trainer_stage(hb) != "training" or hb is None:
        return None
    try:
        total, step = int(hb.details.get("total_steps") or 0), int(hb.details.get("step") or 0)
    except (TypeError, ValueError):
        return None
    return (min(step, total), total) if total > 0 else None


def training_figures(hb: TrainingRun, now_ms: int | None = None) -> list[str]:
    """``loss 0.412``, ``ETA 6m10s`` (counted from the heartbeat's time), those the heartbeat has."""
    out = []
    loss, eta = hb.details.get("loss"), hb.details.get("eta_s")
    if isinstance(loss, (int, float)):
        out.append(f"loss {loss:.3f}")
    if isinstance(eta, (int, float)):
        now = now_ms if now_ms is not None else int(time.time() * 1000)
        out.append(f"ETA {duration(eta - max(0, now - hb.at_ms) / 1000)}")
    return out


def trainer_note(hb: TrainingRun | None, now_ms: int | None = None) -> str:
    """What the trainer does, from its latest heartbeat: ``training 37/168 · loss 0.412 · ETA 6m10s``,
    ``exporting for 1m05s``, ``evaluating (served) for 20s``, ``gating for 2s``, or, idle, what it waits for.
    Empty without a heartbeat."""
    st = trainer_stage(hb)
    if hb is None or st is None:
        return ""
    now = now_ms if now_ms is not None else int(time.time() * 1000)
    d = hb.details
    if st == "training":
        steps = training_steps(hb)
        if steps is None:
            return "training: preparing the dataset and the model"
        return " · ".join([f"training {steps[0]}/{steps[1]}", *training_figures(hb, now)])
    if st == "idle":
        if isinstance(d.get("retry_in_s"), (int, float)) and d["retry_in_s"] > 0:
            return f"idle · the failed run is retried in {duration(d['retry_in_s'] - max(0, now - hb.at_ms) / 1000)}"
        if hb.next_check_in_s is not None:
            return (f"idle · {d.get('pending_traces', '?')} new traces waiting (>= {d.get('min_traces', '?')} or "
                    f"{hb.next_check_in_s:.0f} s)")
        return "idle"
    label = STAGE_LABELS.get(st, st)
    since = d.get("stage_since_ms")
    return f"{label} for {duration((now - since) / 1000)}" if isinstance(since, int) and since <= now else label


def ab_figures_note(fig: dict[str, Any] | None) -> str:
    """The served version's online agreement in a few words (from /status's online_eval block)."""
    if not fig:
        return "waiting for /status online_eval"

    def num(key: str, fmt: str) -> str:
        v = fig.get(key)
        return "-" if v is None else format(v, fmt)

    return (f"n {fig['n']} · JSON {num('json_valid_rate', '.2f')} · F1 vs teacher {num('f1', '.2f')} · "
            f"latency p50 {num('latency_ms_p50', '.0f')} ms, p95 {num('latency_ms_p95', '.0f')} ms")


def version_label(run: RunInfo) -> str:
    return f"v{run.model_version}" if run.model_version is not None else run.run_id[:12]


def say(text: str) -> None:
    """Print, unless the terminal is gone (SIGHUP): stopping the processes matters more than saying so."""
    with contextlib.suppress(OSError, ValueError):
        console.print(text)


def narrate(display: Display, obs: Observed, told: set[tuple[str, int]]) -> None:
    """One line per lifecycle event, each once (also what a log without a terminal shows)."""
    for n, note in enumerate(obs.notes_live):
        if ("demo", n) not in told:
            told.add(("demo", n))
            display.last_events.append(f"demo: {note}")
            if not console.is_terminal:
                console.print(f"demo: {note}")
    for r in sorted(obs.runs.values(), key=lambda x: x.first_ms):
        for n, ev in enumerate(r.events):
            if (r.run_id, n) in told:
                continue
            told.add((r.run_id, n))
            text = f"{r.run_id[:24]}: {version_label(r)} {ev}"
            if ev == "evaluated" and r.metrics:
                text += " · " + (served_line(r.metrics) or ", ".join(
                    f"{k} {v:.2f}" for k, v in headline_metrics(r.metrics).items()))
            if ev in VERDICTS and r.reasons:
                text += f" · {'; '.join(map(str, r.reasons))[:160]}" if isinstance(r.reasons, list) else ""
            if ev == "failed" and r.error:
                text += f" · {r.error[:100]}"
            display.last_events.append(text)
            if not console.is_terminal:
                console.print(text)


def headline_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    flat: dict[str, float] = {}

    def walk(d: dict[str, Any], prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                flat[f"{prefix}{k}"] = float(v)

    walk(metrics, "")
    wanted = ("json_valid_rate", "schema_valid_rate", "f1", "field_f1", "exact_match", "baseline_f1",
              "baseline_field_f1", "latency_ms_p95")
    out = {}
    for w in wanted:
        for k, v in flat.items():
            if k == w or k.endswith("." + w):
                out[k] = v
                break
    return out


def served_line(m: dict[str, Any]) -> str:
    """One line of what the gate saw: the served GGUF's primary metric on the holdout and the golden set, beside
    production and the constant answer, and the paired verdict (empty for an evaluation without slices)."""
    slices = m.get("slices")
    if not isinstance(slices, dict):
        return ""
    key = str(m.get("primary_metric") or "task_f1")

    def num(v: Any) -> str:
        return f"{v:.2f}" if isinstance(v, int | float) else "–"

    parts = []
    for name, sl in slices.items():
        served, const = sl.get("served") or {}, sl.get("constant") or {}
        text = f"{name} (n {served.get('n_examples')}): served {key} {num(served.get(key))}"
        if name == "holdout":
            text += f", production {num(served.get('baseline_' + key))}"
        parts.append(text + f", constant {num(const.get(key))}")
    paired = (m.get("paired") or {}).get("vs_production") or {}
    if paired:
        lo, hi = num(paired.get("ci_low")), num(paired.get("ci_high"))
        parts.append(f"vs production {paired.get('verdict')} [{lo}, {hi}]")
    return " · ".join(parts)
