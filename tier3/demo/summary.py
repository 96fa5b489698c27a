"""The demo's summary: the JSON it writes (``summary.json``) and the table it prints."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from tier3.demo.display import ab_figures_note, console, headline_metrics, version_label
from tier3.demo.monitor import Observed
from tier3.demo.options import DemoOptions, Session
from tier3.demo.supervise import DemoState


def build_summary(obs: Observed, session: Session, opts: DemoOptions, state: DemoState, *,
                  capture_stats: dict[str, int], done_reason: str, wall_s: float) -> dict[str, Any]:
    """``summary.json``: what the demo saw, from the monitor's :class:`Observed` (read under its lock)."""
    settings, status_url = session.settings, session.status_url
    runs = sorted(obs.runs.values(), key=lambda r: r.first_ms)
    reports = [r.report for r in runs if r.report]
    notes = []
    closed_by_demo = [version_label(r) for r in runs if r.run_id in state.closers and r.run_id != state.forced]
    if state.forced:
        forced = obs.runs.get(state.forced)
        notes.append(f"--promote: {version_label(forced) if forced else state.forced} was promoted by hand "
                     f"(`tier3 promote --force`), not by the gate; log: {state.closers[state.forced].log_path}")
    if closed_by_demo:
        notes.append(f"the trainer sent no evaluation for {', '.join(closed_by_demo)}: the demo ran "
                     "`tier3 close-loop RUN_ID` (evaluation, gate, export) itself")
    unevaluated = [version_label(r) for r in runs if "succeeded" in r.events and "evaluated" not in r.events]
    if unevaluated:
        logs = ", ".join(str(state.closers[r.run_id].log_path) for r in runs if r.run_id in state.closers)
        notes.append(f"no `evaluated` event for {', '.join(unevaluated)}"
                     + (f" (see {logs})" if logs else " and no `tier3 close-loop` command here"))
    promoted_not_exported = [version_label(r) for r in runs if r.verdict == "promoted" and "exported" not in r.events]
    if promoted_not_exported:
        notes.append(f"promoted but not exported (yet): {', '.join(promoted_not_exported)}")
    base_models = list(dict.fromkeys(r.base_model for r in runs if r.base_model))  # distinct, oldest run first
    if len(base_models) > 1:
        notes.append(f"the runs were trained from different base models: {', '.join(base_models)}")
    counts = (obs.status or {}).get("counts") or {}
    return {
        "result": done_reason,
        "run_name": session.run_name,
        "topic_prefix": settings.tier3_topic_prefix,
        "bootstrap": settings.kafka_bootstrap_servers,
        "demo_dir": str(session.demo_dir),
        "status_url": status_url,
        "dashboard_url": status_url.removesuffix("status"),
        "wall_s": round(wall_s, 1),
        "published": capture_stats,
        "experiences_in_log": obs.experiences,
        "expected_sampled": session.expected_sampled,
        "worker_counts": counts,
        "traces": {"distinct": len(obs.trace_ids), "messages": obs.trace_messages},
        "counted_in_windows": obs.counted(),
        "dead_letters": {"count": obs.dead_letters, "by_reason": obs.dead_by_reason},
        "trainer_group": session.trainer_group,
        # what the student was trained from: the runs' base model (the newest run's if they differ; see notes)
        "base_model": next((r.base_model for r in reversed(runs) if r.base_model), None),
        "offsets": {"topic": settings.traces_topic, "end": {str(p): o for p, o in sorted(obs.traces_end.items())},
                    "committed": {str(p): o for p, o in sorted(obs.committed.items())},
                    "all_committed": bool(obs.traces_end) and obs.traces_committed == obs.traces_total},
        "runs": [{"run_id": r.run_id, "model_version": r.model_version, "base_model": r.base_model,
                  "events": r.events, "verdict": r.verdict,
                  "metrics": r.metrics, "report": r.report, "reasons": r.reasons, "error": r.error,
                  "gguf": r.exported, "ollama": r.ollama} for r in runs],
        "evaluation_report": reports[-1] if reports else None,
        "processes": process_list(state),
        "kept_running": opts.keep_running,
        "errors": obs.errors,
        "notes": notes,
    }


def process_list(state: DemoState) -> list[dict[str, Any]]:
    """Every process the demo started (the worker, the trainer, `tier3 serve`, the close-loop commands)."""
    return [{"name": c.name, "pid": c.pid, "log": str(c.log_path)} for c in [*state.children, *state.closers.values()]]


def print_summary(s: dict[str, Any]) -> None:
    """The summary as a table, then its notes, the evaluation report and where the logs are."""
    table = Table(title="tier3 demo: summary", show_header=True, header_style="bold")
    table.add_column("stage")
    table.add_column("result", justify="right")
    table.add_column("detail")
    pub = s["published"]
    table.add_row("published", str(pub.get("delivered", 0)), f"of {pub.get('sent', 0)} sent; "
                  f"{pub.get('dropped', 0)} dropped, {pub.get('failed', 0)} failed")
    wc = s["worker_counts"]
    table.add_row("sampled", str(wc.get("sampled", "?")), f"expected {s['expected_sampled']} "
                  f"(hash share + confidence > 0.8); {wc.get('not_sampled', '?')} not sampled")
    table.add_row("enriched", str(s["traces"]["distinct"]), f"{s['traces']['messages']} trace messages (recorded "
                  "teacher)")
    table.add_row("dead letters", str(s["dead_letters"]["count"]),
                  ", ".join(f"{k} {v}" for k, v in s["dead_letters"]["by_reason"].items()) or "-")
    table.add_row("counted", str(s["counted_in_windows"]), "enriched traces in the worker's tumbling windows")
    off = s["offsets"]
    table.add_row("committed", f"{sum(min(off['committed'].get(p, 0), e) for p, e in off['end'].items())}"
                  f"/{sum(off['end'].values())}", "traces inside a trained model (trainer group's offsets)")
    if s.get("base_model"):
        table.add_row("base model", "", str(s["base_model"]))
    for r in s["runs"]:
        served = served_figures(r["metrics"] or {})
        m = headline_metrics(r["metrics"])
        detail = served or ", ".join(f"{k} {v:.2f}" for k, v in m.items()) or (r["error"] or "")
        if r["verdict"] == "rejected" and r.get("reasons"):
            detail += "\nwhy not promoted: " + "; ".join(map(str, r["reasons"]))
        table.add_row(f"run {r['model_version'] if r['model_version'] is not None else '?'}",
                      r["verdict"] or r["events"][-1] if r["events"] else "-", detail)
        if "exported" in r["events"]:
            table.add_row("exported", str(len(r["gguf"])) + " GGUF", "\n".join([*r["gguf"], r["ollama"] or ""]))
    ab = s.get("ab") or {}
    if ab.get("status") in ("done", "partial"):
        arms = ", ".join(f"{k} {v}" for k, v in sorted((ab.get("arms") or {}).items()))
        table.add_row("A/B served", f"{ab['sent']}/{ab['prompts']}",
                      f"router in ab mode: {arms}" + (f", {ab['fallbacks']} fallbacks" if ab.get("fallbacks") else "")
                      + f"; v{ab['version']} served by `tier3 serve`")
        fig = ab.get("online_eval")
        offline = f"; offline holdout F1 {ab['offline_f1']:.2f}" if ab.get("offline_f1") is not None else ""
        table.add_row(f"online v{ab['version']}", f"{fig['n'] if fig else 0}/{ab['expected_shadow']}",
                      ab_figures_note(fig) + offline + " (worker /status online_eval)")
    elif ab.get("status") == "skipped" and ab.get("reason") != "--ab-prompts 0":
        table.add_row("A/B phase", "skipped", str(ab.get("reason")))
    console.print(table)
    if s["result"] != "complete":
        console.print(f"[yellow]the pipeline did not finish: {s['result']}[/]")
    for e in [*s["notes"], *s["errors"], *ab.get("notes", []), *ab.get("errors", [])]:
        console.print(f"[yellow]{e}[/]")
    console.print(f"evaluation report: [bold]{s['evaluation_report'] or '(none yet)'}[/]")
    # the URLs only while they answer: printed at the start when the worker started, and here only when it keeps
    # running (without --keep-running the worker is stopped right after this summary)
    if s["status_url"] and s["kept_running"]:
        console.print(f"status: [bold]{s['status_url']}[/]   dashboard: [bold]{s['dashboard_url']}[/] "
                      "(the worker keeps running)")
    console.print(f"logs and state: {s['demo_dir']}")


def _n(v: Any) -> str:
    return f"{v:.2f}" if isinstance(v, int | float) else "–"


def served_figures(m: dict[str, Any]) -> str:
    """The honest numbers of one run, as the gate saw them: what is served (the quantised GGUF through llama.cpp)
    on the near-twin-free holdout and on the golden set, beside production and the constant answer; the paired
    comparison with production; the f16 and PyTorch figures as diagnostics. Empty for an evaluation without
    slices."""
    slices = m.get("slices")
    if not isinstance(slices, dict):
        return ""
    metric = str(m.get("primary_metric") or "task_f1")
    lines = []
    for name, sl in slices.items():
        served, const = sl.get("served") or {}, sl.get("constant") or {}
        text = (f"{name} (n {served.get('n_examples')}): served {metric} {_n(served.get(metric))}, widget F1 "
                f"{_n(served.get('set_f1_widgets'))}, field F1 {_n(served.get('f1'))}, JSON "
                f"{_n(served.get('json_valid_rate'))}")
        if name == "holdout":
            text += f" · production {_n(served.get('baseline_' + metric))}"
        text += f" · constant answer {_n(const.get(metric))}"
        if sl.get("f16"):
            text += f" · f16 {_n(sl['f16'].get(metric))}"
        lines.append(text)
    pt = m.get("pytorch") or {}
    if pt:
        lines.append(f"PyTorch (diagnostic) {metric} {_n(pt.get(metric))}, field F1 {_n(pt.get('f1'))}; holdout "
                     f"contamination {_n(m.get('contamination_rate'))}")
    for name, p in (m.get("paired") or {}).items():
        lines.append(f"paired {name}: diff {_n(p.get('mean_diff'))} [{_n(p.get('ci_low'))}, {_n(p.get('ci_high'))}]"
                     f" → {p.get('verdict')}")
    return "\n".join(lines)
