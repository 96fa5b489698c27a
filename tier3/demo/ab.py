"""The demo's A/B phase: the promoted, exported student served for real, a handful of the demo's prompts through
the router in ``ab`` mode, and the served version's online agreement read back from the worker's ``/status``.

After the pipeline is done and a version is promoted and exported (by the gate, or by ``--promote``):

1. the trainer is stopped (unless ``--keep-running``): the phase's traces are training data for a *next* run, not
   for this demo, and a run started on them would compete with the student's server for the CPU;
2. ``tier3 serve --port P --no-follow`` (llama-cpp-python's OpenAI-compatible server on the exported GGUF) starts
   as a supervised child, stopped with the others at the end or on Ctrl-C;
3. :class:`streams.client.router.Router` in ``ab`` mode (the application's client path) answers ``--ab-prompts`` of the
   demo's prompts, half of them from users whose sticky arm is the student; every answer is published on
   ``experiences`` with its arm and model version;
4. the worker (started with ``TIER3_SHADOW_RATE`` = ``--shadow-rate``) enriches the student's answers as shadow
   samples and scores them against the teacher in its online-eval table; the phase waits (``--ab-wait-s``) until
   ``/status``'s ``online_eval`` block counts every shadow sample it expects, and reports the served version's
   figures from that block.

When serving is impossible (no promoted and exported version, llama-cpp-python's server not installed, the server
not starting) the phase is skipped and the summary says why; the demo does not fail for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
from rich.live import Live

from schemas import Experience, get_task
from schemas.runs import RunsFold
from streams.sampling import is_shadow
from tier3.demo.display import Display, ab_figures_note, console, headline_metrics, version_label
from tier3.demo.monitor import Observed, RunInfo
from tier3.demo.options import DemoOptions, Session
from tier3.demo.supervise import DemoState, free_port, start_child

if TYPE_CHECKING:
    from streams.client.router import Router
    from streams.teachers import Teacher, TeacherReply

AB_SHARE = 0.5  # the student's share of users in the demo's ab split (production's default is 0.1)
SERVE_WAIT_S = 240.0  # `tier3 serve`: the server loads the GGUF (its own bound is TIER3_SERVE_START_TIMEOUT_S)
SEND_BUDGET_S = 180.0  # the prompts: stop sending after this long (a slow student on a loaded machine)
STUDENT_TIMEOUT_S = 60.0  # one student call


@dataclass
class AbProgress:
    """What the phase did so far (shown by the display, written into the summary)."""

    prompts: int
    sent: int = 0
    arms: dict[str, int] = field(default_factory=lambda: {"student": 0, "teacher": 0})
    fallbacks: int = 0
    expected_shadow: int = 0
    figures: dict[str, Any] | None = None  # the served version's pooled online figures, from /status
    errors: list[str] = field(default_factory=list)


def promoted_exported(obs: Observed, fold: RunsFold) -> tuple[RunInfo | None, RunInfo | None]:
    """(the run in force by the one fold of training-runs, that run if the demo can serve it: exported)."""
    in_force = fold.in_force
    run = obs.runs.get(in_force[0]) if in_force is not None else None
    return run, (run if run is not None and "exported" in run.events and run.exported else None)


def ab_users(n: int, share: float, salt: str) -> list[str]:
    """``n`` user ids, alternately on the student's and the teacher's sticky arm (the router's own hash), so a
    handful of prompts is enough for both arms; the router still chooses each arm itself."""
    from streams.client.router import ab_bucket

    student = [u for u in (f"demo-user-{i}" for i in range(10_000)) if ab_bucket(u, salt) < share][:(n + 1) // 2]
    teacher = [u for u in (f"demo-user-{i}" for i in range(10_000)) if ab_bucket(u, salt) >= share][:n // 2]
    out = []
    for i in range(n):
        pool = student if i % 2 == 0 else teacher
        out.append(pool[i // 2])
    return out


def online_figures(status: Mapping[str, Any] | None, task: str, version: int) -> dict[str, Any] | None:
    """The served version's online agreement over every window of ``/status``'s ``online_eval`` block: n summed,
    rates weighted by each window's n, latency percentiles the worst window's (a block holds per-window
    percentiles, which do not pool); None while the block has nothing for it."""
    block = (status or {}).get("online_eval") or {}
    series = ((block.get("tasks") or {}).get(task) or {}).get("versions", {}).get(str(version))
    windows = [w for w in (series or {}).get("history") or [] if int(w.get("n") or 0) > 0]
    if not windows:
        return None
    n = sum(int(w["n"]) for w in windows)

    def pooled(key: str) -> float | None:
        have = [(int(w["n"]), float(w[key])) for w in windows if w.get(key) is not None]
        total = sum(k for k, _ in have)
        return round(sum(k * v for k, v in have) / total, 6) if total else None

    def worst(key: str) -> float | None:
        vals = [float(w[key]) for w in windows if w.get(key) is not None]
        return max(vals) if vals else None

    return {"n": n, "json_valid_rate": pooled("json_valid_rate"), "schema_valid_rate": pooled("schema_valid_rate"),
            "exact_match": pooled("exact_match"), "f1": pooled("f1"), "latency_ms_p50": worst("latency_ms_p50"),
            "latency_ms_p95": worst("latency_ms_p95"),
            "extra_teacher_calls": sum(int(w.get("extra_teacher_calls") or 0) for w in windows),
            "windows": [{k: w.get(k) for k in ("start_ms", "end_ms", "n", "json_valid_rate", "schema_valid_rate",
                                                "exact_match", "f1", "latency_ms_p50", "latency_ms_p95")}
                        for w in windows]}


def skipped(reason: str, **extra: Any) -> dict[str, Any]:
    console.print(f"[yellow]A/B phase skipped: {reason}[/]")
    return {"status": "skipped", "reason": reason, **extra}


def run_ab_phase(state: DemoState, session: Session, opts: DemoOptions, obs: Observed, display: Display,
                 experiences: list[Experience]) -> dict[str, Any]:
    """The phase (module docstring): its summary block, ``status`` ``done`` / ``partial`` / ``skipped``."""
    monitor = state.monitor
    assert monitor is not None
    if opts.ab_prompts <= 0:
        return {"status": "skipped", "reason": "--ab-prompts 0"}
    with monitor.lock:
        in_force, run = promoted_exported(obs, monitor.fold)
    if run is None or run.model_version is None:
        return skipped("no version was promoted (pass --promote to promote the newest by hand)" if in_force is None
                       else f"the version in force ({version_label(in_force)}) has no exported GGUF")
    version = run.model_version
    if state.closer_env is None:
        return skipped("the demo started no trainer (its settings serve the student)", version=version)
    from trainer.close_loop.serve import server_installed

    if not server_installed():
        return skipped("llama-cpp-python's server is not installed (pip install 'tier3[serve]')", version=version)

    t0 = time.monotonic()
    console.rule(f"[bold]A/B phase[/] · {version_label(run)} served by `tier3 serve`, {opts.ab_prompts} prompts "
                 f"through the router (ab, student share {AB_SHARE})")
    notes: list[str] = []
    trainer = next((c for c in state.children if c.name == "trainer"), None)
    if trainer is not None and trainer.alive() and not opts.keep_running:
        console.print("stopping the trainer: the phase's traces are training data for a next run, not this demo's")
        trainer.stop()
        notes.append("the trainer was stopped before the A/B phase: its traces wait on enriched-traces for the "
                     "next run")

    # 2. the student's server, supervised like the others
    port = free_port()
    serve = start_child("serve", ["serve", "--port", str(port), "--no-follow"], state.closer_env, session.demo_dir,
                        keep_running=opts.keep_running)
    state.children.append(serve)
    base_url = f"http://127.0.0.1:{port}/v1"
    base = {"version": version, "run_id": run.run_id, "base_url": base_url, "serve_log": str(serve.log_path),
            "serve_pid": serve.pid}
    console.print(f"started serve (pid {serve.pid}), log: {serve.log_path}")
    alias, why = _wait_served(serve, base_url, version)
    if alias is None:
        serve.stop()
        return skipped(f"`tier3 serve` did not serve {version_label(run)}: {why}", **base, notes=notes,
                       serve_log_tail=serve.log_tail(8))
    console.print(f"serving {alias} at {base_url} (ready in {time.monotonic() - t0:.0f} s)")

    # 3. the prompts through the router, 4. the online figures from /status
    prog = AbProgress(prompts=min(opts.ab_prompts, len(experiences)))
    display.add_stage("A/B served", prog.prompts)
    display.add_stage("online eval", None)
    live_ctx = Live(display.renderable(), console=console, refresh_per_second=4, transient=False) \
        if console.is_terminal else contextlib.nullcontext()
    task = experiences[0].task if experiences else "widget_selector"
    last_line = [""]
    with live_ctx as live:
        def refresh() -> None:
            with monitor.lock:
                prog.figures = online_figures(obs.status, task, version)
            display.update_ab(prog.sent, prog.arms, prog.expected_shadow, prog.figures)
            if live is not None:
                live.update(display.renderable())
            else:
                line = display.ab_line()
                if line != last_line[0]:
                    last_line[0] = line
                    console.print(line)

        asyncio.run(_send(session, opts, experiences[:prog.prompts], alias, base_url, version, prog, refresh))
        deadline = time.monotonic() + opts.ab_wait_s
        while time.monotonic() < deadline:
            refresh()
            if prog.expected_shadow and prog.figures and prog.figures["n"] >= prog.expected_shadow:
                break
            time.sleep(0.5)
        refresh()
    fig = prog.figures
    status = "done" if fig and fig["n"] >= prog.expected_shadow > 0 else "partial"
    if status == "partial":
        notes.append(f"/status counted {fig['n'] if fig else 0} of the {prog.expected_shadow} shadow samples "
                     f"expected within --ab-wait-s {opts.ab_wait_s:.0f} s")
    with monitor.lock:
        router_block = dict((obs.status or {}).get("router") or {})
    offline = headline_metrics(run.metrics)
    console.print(f"[bold]online agreement of {version_label(run)}[/] (from {session.status_url}, online_eval): "
                  f"{ab_figures_note(fig)}")
    return {"status": status, **base, "model": alias, "task": task, "student_share": AB_SHARE,
            "shadow_rate": opts.shadow_rate, "max_tokens": opts.ab_max_tokens, "prompts": prog.prompts,
            "sent": prog.sent, "arms": prog.arms, "fallbacks": prog.fallbacks,
            "expected_shadow": prog.expected_shadow,
            "online_eval": ({"source": f"{session.status_url} online_eval.tasks.{task}.versions.{version}", **fig}
                            if fig else None),
            "offline_f1": next((v for k, v in offline.items() if k == "f1" or k.endswith(".f1")), None),
            "router": router_block, "errors": prog.errors, "notes": notes,
            "wall_s": round(time.monotonic() - t0, 1)}


class RecordedAsAsked:
    """The demo's teacher arm: the recorded teacher, asked with the prompt its answers were recorded for (the
    worker's teacher prompt: the production messages plus the task's output-format instruction). A live teacher
    answers the production messages as they are; the recorded one only knows the prompts it was recorded on."""

    def __init__(self, inner: Teacher, task: str) -> None:
        self.inner, self.task = inner, get_task(task)
        self.kind, self.model, self.recorded = inner.kind, inner.model, inner.recorded

    async def complete(self, messages: list[dict[str, str]]) -> TeacherReply:
        return await self.inner.complete(self.task.messages_for_model(messages, reasoning=True))

    async def aclose(self) -> None:
        await self.inner.aclose()


def _wait_served(serve: Any, base_url: str, version: int) -> tuple[str | None, str]:
    """(the alias ``tier3 serve`` lists for ``version``, "") once it does; (None, why) if it exits or never does."""
    deadline = time.monotonic() + SERVE_WAIT_S
    last = "no answer"
    with httpx.Client(timeout=2.0) as http:
        while time.monotonic() < deadline:
            if not serve.alive():
                return None, f"it exited with code {serve.proc.returncode}"
            try:
                resp = http.get(f"{base_url}/models")
                ids = [str(d.get("id")) for d in resp.json().get("data", [])] if resp.status_code == 200 else []
                alias = next((i for i in ids if i.endswith(f":v{version}")), None)
                if alias is not None:
                    return alias, ""
                last = f"it lists {ids}" if resp.status_code == 200 else f"HTTP {resp.status_code}"
            except (httpx.HTTPError, ValueError) as exc:
                last = type(exc).__name__
            time.sleep(0.5)
    return None, f"not within {SERVE_WAIT_S:.0f} s ({last})"


async def _send(session: Session, opts: DemoOptions, experiences: list[Experience], alias: str, base_url: str,
                version: int, prog: AbProgress, refresh: Any) -> None:
    """The prompts through :class:`streams.client.router.Router` in ``ab`` mode, one at a time, each published by it."""
    from streams.client.router import Router, RouterSettings

    settings = RouterSettings.model_validate({
        **session.settings.model_dump(), "tier3_serve": "ab", "tier3_ab_student_share": AB_SHARE,
        "tier3_student_base_url": base_url, "tier3_student_model": alias.rsplit(":v", 1)[0] + ":v{version}",
        "tier3_student_max_tokens": opts.ab_max_tokens, "tier3_student_timeout_s": STUDENT_TIMEOUT_S,
        "tier3_teacher": "recorded", "tier3_teacher_recorded_path": opts.recorded_path.resolve()})
    from streams.teachers import make_teacher

    task = experiences[0].task if experiences else "widget_selector"
    router: Router = Router(settings, teacher=RecordedAsAsked(make_teacher(settings), task)).start()
    try:
        cur = router.view.current
        if cur is None or cur.model_version != version:
            prog.errors.append(f"the router's version in force is {cur.model_version if cur else 'none'}, not "
                               f"v{version}")
        users = ab_users(len(experiences), AB_SHARE, settings.tier3_ab_salt)
        deadline = time.monotonic() + SEND_BUDGET_S
        for e, user in zip(experiences, users, strict=True):
            if time.monotonic() > deadline:
                prog.errors.append(f"sent {prog.sent} of {len(experiences)} prompts in {SEND_BUDGET_S:.0f} s")
                break
            messages = [{"role": m.role, "content": m.content} for m in e.messages]
            try:
                reply = await router.complete(messages, task=e.task, user_id=user)
            except Exception as exc:  # a teacher without this prompt, ...: say so, go on with the next one
                prog.errors.append(f"{user}: {type(exc).__name__}: {exc}"[:300])
                continue
            prog.sent += 1
            d = reply.decision
            prog.arms[d.arm] = prog.arms.get(d.arm, 0) + 1
            if d.reason == "fallback":
                prog.fallbacks += 1
            if (reply.experience is not None and reply.published
                    and is_shadow(reply.experience.experience_id, d.arm, d.model_version, rate=opts.shadow_rate)):
                prog.expected_shadow += 1
            refresh()
    finally:
        await router.aclose()  # flushes the experiences it published
