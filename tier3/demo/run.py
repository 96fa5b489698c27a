"""``tier3 demo``: the whole flywheel on this machine, with the shipped widget-selector example.

What it does, in order:

1. Kafka: brings up the local broker (``tier3 broker up``), unless ``KAFKA_BOOTSTRAP_SERVERS`` names a cluster;
   creates the four topics under a fresh prefix (``demo-<time>-<id>.``), so running it twice never mixes runs.
2. The student: ``TIER3_BASE_MODEL`` if set, else SmolLM2-135M-Instruct (``smollm2-135m``); a named model is
   pulled into the model cache once by ``tier3 models pull NAME`` (a subprocess), which prints its folder.
3. Starts ``tier3 worker`` (recorded teacher: ``examples/widget_selector/recorded_teacher.jsonl``) and
   ``tier3 trainer`` as subprocesses, each in its own process group with its log in the demo folder.
4. Publishes the example experiences through the capture library, spread over ``--publish-seconds``, as the
   production app would (each stamped with the time it is published).
5. Follows every stage by reading the topics (experiences, enriched-traces, dead-letters, training-runs), the
   trainer group's committed offsets and the worker's ``/status``, with one progress bar per stage.
6. When every sampled experience is enriched (or dead-lettered), every trace is inside a trained model (the
   trainer's committed offsets reach the end of enriched-traces) and every run has its verdict, and a version
   is promoted and exported: the A/B phase (``ab``): ``tier3 serve`` on that student, ``--ab-prompts`` of the
   prompts through the router in ``ab`` mode, and the served version's online agreement (n, JSON validity, F1
   vs the teacher, latency) from the worker's ``/status`` ``online_eval`` block; skipped, saying why, when it
   cannot serve. Then it prints a summary table and the evaluation report's path, writes ``summary.json``,
   and stops what it started (unless ``--keep-running``: then it prints the status and dashboard URLs, which
   still answer). Ctrl-C at any point stops everything cleanly.

The pieces: ``options`` (what was asked, what was set up), ``supervise`` (the processes and the signals),
``monitor`` (what the topics say), ``display`` (the bars and event lines), ``progress`` (when is it done, and the
demo's own steps), ``ab`` (the A/B phase), ``summary`` (the JSON and the table). This module runs them in that order.
"""

from __future__ import annotations

import contextlib
import copy
import os
import signal
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import orjson
import typer
from confluent_kafka import KafkaException
from rich.live import Live

from schemas import Experience, decode
from schemas.settings import KafkaSettings
from streams.errors import StreamsError
from streams.sampling import sample_reason
from tier3.demo.ab import run_ab_phase
from tier3.demo.display import Display, console, narrate, say
from tier3.demo.monitor import Monitor, Observed
from tier3.demo.options import EXAMPLES_DIR, DemoError, DemoOptions, Session
from tier3.demo.progress import finished, force_promote, maybe_train_now, start_closers
from tier3.demo.summary import build_summary, print_summary, process_list
from tier3.demo.supervise import (
    STOP_SIGNALS,
    DemoState,
    build_student,
    free_port,
    start_child,
    stop_everything,
    stop_signals_as_interrupt,
    student_name,
)

if TYPE_CHECKING:
    from streams.client.capture import Capture


def load_examples(path: Path, limit: int) -> list[Experience]:
    if not path.exists():
        raise DemoError(f"no example experiences at {path} (run examples/widget_selector/make_examples.py)")
    out = [decode(line, Experience) for line in path.read_bytes().splitlines() if line.strip()]
    return out[:limit] if limit > 0 else out


def demo(
    examples: Annotated[int, typer.Option(help="publish only the first N example experiences (0 = all)")] = 0,
    publish_seconds: Annotated[float, typer.Option(help="spread publishing over this many seconds")] = 60.0,
    keep_running: Annotated[bool, typer.Option(help="leave the broker, worker and trainer running at the end")]
    = False,
    timeout_s: Annotated[float, typer.Option(help="give up waiting for the pipeline after this many seconds")]
    = 1500.0,
    sample_rate: Annotated[float, typer.Option(help="hash-sampled share of experiences (TIER3_SAMPLE_RATE); "
                                               "higher than production's 0.15 so the short demo has data")] = 0.3,
    window_s: Annotated[int, typer.Option(help="tumbling count window (TIER3_WINDOW_S), short for the demo")] = 15,
    examples_file: Annotated[Path | None, typer.Option(help="Experience JSONL to publish")] = None,
    recorded_teacher: Annotated[Path | None, typer.Option(help="recorded teacher JSONL (the demo's teacher)")]
    = None,
    summary_json: Annotated[Path | None, typer.Option(help="also write the summary here (default: in the demo "
                                                      "folder)")] = None,
    eval_wait_s: Annotated[float, typer.Option(help="seconds to wait for the trainer's evaluation of a run "
                                               "before the demo runs `tier3 close-loop RUN_ID` itself")] = 30.0,
    export_wait_s: Annotated[float, typer.Option(help="seconds to wait for a promoted version's export")] = 600.0,
    promote: Annotated[bool, typer.Option(help="if the gate promotes no version (the tiny CPU student never earns "
                                          "it), promote the newest by hand and export it to GGUF, so the last "
                                          "stages run too (downloads llama.cpp's converter once, ~75 MB)")]
    = False,
    ab_prompts: Annotated[int, typer.Option(help="after a version is promoted and exported: serve it (`tier3 "
                                            "serve`) and send this many of the demo's prompts through the router "
                                            "in ab mode, then show its online agreement from /status (0 = no A/B "
                                            "phase)")] = 8,
    ab_max_tokens: Annotated[int, typer.Option(help="max output tokens of a student answer in the A/B phase")]
    = 128,
    shadow_rate: Annotated[float, typer.Option(help="the worker's TIER3_SHADOW_RATE: share of the student's answers "
                                               "scored against the teacher (production's default is 0.2)")] = 1.0,
    ab_wait_s: Annotated[float, typer.Option(help="seconds to wait for /status to count the A/B phase's shadow "
                                             "samples")] = 60.0,
) -> None:
    """Run the whole flywheel on this machine: broker, worker, trainer, the example traffic, every stage live."""
    opts = DemoOptions(examples_path=examples_file or EXAMPLES_DIR / "experiences.jsonl",
                       recorded_path=recorded_teacher or EXAMPLES_DIR / "recorded_teacher.jsonl", limit=examples,
                       publish_seconds=publish_seconds, keep_running=keep_running, timeout_s=timeout_s,
                       sample_rate=sample_rate, window_s=window_s, summary_json=summary_json,
                       eval_wait_s=eval_wait_s, export_wait_s=export_wait_s, promote=promote,
                       ab_prompts=ab_prompts, ab_max_tokens=ab_max_tokens, shadow_rate=shadow_rate,
                       ab_wait_s=ab_wait_s)
    state = DemoState()
    exit_code = 0
    completed = False  # only a demo that ran to its summary may leave things running (--keep-running)
    with stop_signals_as_interrupt():
        try:
            exit_code = _run(state, opts)
            completed = True
        except KeyboardInterrupt:
            say("\n[yellow]interrupted: stopping everything the demo started…[/]")
            exit_code = 130
        except DemoError as exc:
            say(f"[bold red]demo failed:[/] {exc}")
            exit_code = 1
        finally:
            # a second Ctrl-C (or SIGTERM) must not leave half-stopped processes behind: ignore them meanwhile
            old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
            try:
                stop_everything(state, keep_running and completed)
            finally:
                for sig, h in old.items():
                    signal.signal(sig, h)
    if exit_code:
        raise typer.Exit(exit_code)


def _run(state: DemoState, opts: DemoOptions) -> int:
    from streams.client.capture import Capture, CaptureSettings

    t_start = time.monotonic()
    experiences = load_examples(opts.examples_path, opts.limit)
    if not opts.recorded_path.exists():
        raise DemoError(f"no recorded teacher answers at {opts.recorded_path}")
    base = KafkaSettings()
    run_name = f"demo-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    prefix = f"{run_name}."
    demo_dir = (base.tier3_data_dir / "demo" / run_name).resolve()
    demo_dir.mkdir(parents=True, exist_ok=True)
    settings = base.model_copy(update={"tier3_topic_prefix": prefix, "tier3_data_dir": demo_dir})
    console.rule(f"[bold]tier3 demo[/] · {len(experiences)} widget-selector experiences over "
                 f"{opts.publish_seconds:.0f} s")

    # 1. Kafka
    settings = _kafka(state, settings)
    console.print(f"topics: [bold]{prefix}[/]{{experiences, enriched-traces, dead-letters, training-runs}}")

    # which experiences the worker will sample: the same pure function it uses
    expected_sampled = sum(sample_reason(e.experience_id, e.confidence, rate=opts.sample_rate) is not None
                           for e in experiences)
    session = Session(settings=settings, run_name=run_name, demo_dir=demo_dir, web_port=free_port(),
                      trainer_group=f"{prefix}trainer", n_examples=len(experiences),
                      expected_sampled=expected_sampled)

    # 2. the student, 3. the processes
    _start_processes(state, session, opts)

    obs = Observed()
    state.monitor = Monitor(settings, session.trainer_group, session.status_url, obs)
    state.monitor.start()
    display = Display(len(experiences), expected_sampled)

    # 4. publish, 5. follow
    capture = Capture(CaptureSettings.model_validate(settings.model_dump()))
    done_reason = _follow(state, session, opts, experiences, obs, capture, display)

    # the pipeline's figures, before the A/B phase adds its own traffic (its experiences and traces)
    with state.monitor.lock:
        summary = copy.deepcopy(build_summary(obs, session, opts, state, capture_stats=capture.stats().as_dict(),
                                              done_reason=done_reason, wall_s=time.monotonic() - t_start))

    # 7. the A/B phase: the promoted student served, prompts through the router, its online agreement
    if done_reason == "complete":
        summary["ab"] = run_ab_phase(state, session, opts, obs, display, experiences)
    else:
        summary["ab"] = {"status": "skipped", "reason": f"the pipeline did not finish ({done_reason})"}
    summary["processes"] = process_list(state)
    summary["wall_s"] = round(time.monotonic() - t_start, 1)

    # 8. summary
    print_summary(summary)
    path = opts.summary_json or demo_dir / "summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
    if path != demo_dir / "summary.json":
        (demo_dir / "summary.json").write_bytes(path.read_bytes())
    console.print(f"summary: {path}")
    if opts.keep_running:
        pids = ", ".join(f"{c.name} {c.pid}" for c in state.children)
        console.print(f"[bold]still running[/] ({pids}); stop them with `kill <pid>`"
                      + (" and the broker with `tier3 broker down`" if state.started_broker else ""))
    return 0 if done_reason == "complete" else 1


def _kafka(state: DemoState, settings: KafkaSettings) -> KafkaSettings:
    """The configured cluster, a broker that already answers, or the local broker started here; the run's topics
    created on it. The settings with its bootstrap servers."""
    from streams.topics import ensure_topics

    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        console.print(f"Kafka: the configured cluster at [bold]{settings.kafka_bootstrap_servers}[/]")
    else:
        from tier3.devbroker import server as devbroker

        state.broker_settings = devbroker.BrokerSettings()
        st = devbroker.status(state.broker_settings)
        if st.running:  # ours from an earlier `tier3 broker up`, or another broker on that port: use it, leave it
            console.print(f"Kafka: a broker already answers at [bold]{st.bootstrap}[/]; using it")
        else:
            state.started_broker = True  # before up(): a Ctrl-C while it starts must still stop it
            with console.status("starting the local Kafka broker (the first time resolves its jars with Maven)…"):
                try:
                    st = devbroker.up(state.broker_settings)
                except devbroker.BrokerError as exc:
                    raise DemoError(f"the local broker did not start: {exc}") from None
            console.print(f"Kafka {st.version}: started a local broker at [bold]{st.bootstrap}[/]")
        settings = settings.model_copy(update={"kafka_bootstrap_servers": st.bootstrap})
    try:
        ensure_topics(settings)
    except (KafkaException, StreamsError) as exc:
        raise DemoError(f"cannot create the topics on {settings.kafka_bootstrap_servers}: {exc}. Check "
                        "KAFKA_BOOTSTRAP_SERVERS (and its SASL/SSL settings), or unset it to let the demo run the "
                        "local broker") from None
    return settings


def _start_processes(state: DemoState, session: Session, opts: DemoOptions) -> None:
    """The student's base model, then ``tier3 worker`` and ``tier3 trainer`` with the demo's settings."""
    settings, demo_dir = session.settings, session.demo_dir
    env = {**os.environ, **settings.as_env(), "PYTHONUNBUFFERED": "1"}
    with console.status(f"getting the student base model {student_name()} (`tier3 models pull`, cached after "
                        "the first time)…"):
        student = build_student(demo_dir / "student-build.log")
    console.print(f"student base model: [bold]{student_name()}[/] ({student})")
    worker_env = {**env, "TIER3_TEACHER": "recorded",
                  "TIER3_TEACHER_RECORDED_PATH": str(opts.recorded_path.resolve()),
                  "TIER3_WEB_HOST": "127.0.0.1", "TIER3_WEB_PORT": str(session.web_port),
                  "TIER3_WORKER_ID": f"{session.run_name}-worker", "TIER3_SAMPLE_RATE": str(opts.sample_rate),
                  "TIER3_WINDOW_S": str(opts.window_s), "TIER3_RECENT_WINDOWS": "40",
                  "TIER3_SHADOW_RATE": str(opts.shadow_rate)}
    state.children.append(start_child("worker", ["worker"], worker_env, demo_dir,
                                      keep_running=opts.keep_running))
    # Two runs in a typical demo, so the flywheel shows two model versions: the first by count when just over
    # half the traces are there; the rest can then never reach the count, so the second is the demo's
    # `tier3 train-now` once every trace is in (the manual trigger). The check interval is only a fallback
    # and long on purpose: right after a run it has always passed, and a short one would start a run for
    # every trace that trickles in meanwhile.
    # A real student on CPU (SmolLM2) trains once, on every trace, when all are in: two runs would not fit
    # the demo's 20 minutes on 2 cores. The tiny test student trains twice.
    tiny_student = student_name() == "tiny"
    min_traces = max(8, session.expected_sampled // 2 + 1) if tiny_student else session.expected_sampled + 1
    overrides: dict[str, str] = {}
    if tiny_student:
        # the random-weight student never stops: bound its evaluation; batches of 4 keep its many tiny
        # steps few (the defaults are for real students)
        overrides = {k: v for k, v in (("TIER3_EVAL_MAX_NEW_TOKENS", "128"), ("TIER3_BATCH_SIZE", "4"))
                     if not os.environ.get(k)}
    if not tiny_student and not os.environ.get("TIER3_PHASES"):
        # four answer-only epochs: ~145 traces x 4 x ~1.25 s on 2 idle CPU cores (batches of 8 with the
        # system prompt computed once per batch) fit the demo's 20 minutes; the product default (answer:6)
        # takes half as long again and agrees more with the teacher (bench/quality.py)
        overrides["TIER3_PHASES"] = "answer:4"
    console.print(f"demo training: {'two runs' if tiny_student else 'one run, on every trace, when all are in'}"
                  f", curriculum {overrides.get('TIER3_PHASES') or os.environ.get('TIER3_PHASES') or 'default'}; "
                  "the gate keeps the product's thresholds (docs/settings.md)")
    golden = EXAMPLES_DIR / "golden.jsonl"  # the example's hand-written golden set: its own slice at the gate
    if golden.is_file() and not os.environ.get("TIER3_GOLDEN_SET"):
        overrides["TIER3_GOLDEN_SET"] = str(golden.resolve())
    trainer_env = {**env, **overrides, "TIER3_BASE_MODEL": student, "TIER3_TRAINER_GROUP": session.trainer_group,
                   "TIER3_MIN_TRACES": str(min_traces),
                   "TIER3_CHECK_INTERVAL_S": str(opts.publish_seconds + 90.0),
                   "TIER3_TRAINER_STATUS_INTERVAL_S": "1", "TIER3_TRAINER_BACKOFF_INITIAL_S": "2",
                   "TIER3_TRAINER_BACKOFF_MAX_S": "10"}
    state.children.append(start_child("trainer", ["trainer"], trainer_env, demo_dir,
                                      keep_running=opts.keep_running))
    state.closer_env = trainer_env
    state.train_now_env = trainer_env
    for child in state.children:
        console.print(f"started {child.name} (pid {child.pid}), log: {child.log_path}")
    console.print(f"status: [bold]{session.status_url}[/]   "
                  f"dashboard: [bold]http://127.0.0.1:{session.web_port}/[/]")


def _follow(state: DemoState, session: Session, opts: DemoOptions, experiences: list[Experience], obs: Observed,
            capture: Capture, display: Display) -> str:
    """Publish the experiences spread over ``--publish-seconds`` and follow every stage until the demo is done
    (``progress.finished``) or times out; why it ended ("complete", "timed out")."""
    monitor = state.monitor
    assert monitor is not None
    told: set[tuple[str, int]] = set()
    deadline = time.monotonic() + opts.publish_seconds + opts.timeout_s
    done_reason = "timed out"
    next_line, last_line = 0.0, ""
    # a live display redraws in a terminal; in a log (CI) it would print only at the end: lines instead
    live_ctx = Live(display.renderable(), console=console, refresh_per_second=4, transient=False) \
        if console.is_terminal else contextlib.nullcontext()
    with live_ctx as live:
        t0 = time.monotonic()
        i = 0
        while True:
            now = time.monotonic()
            # publish the ones that are due: evenly spread over publish_seconds
            due = (len(experiences) if opts.publish_seconds <= 0
                   else int(len(experiences) * (now - t0) / opts.publish_seconds))
            while i < min(due, len(experiences)):
                e = experiences[i]
                capture.publish(e.model_copy(update={"created_at_ms": int(time.time() * 1000)}))
                i += 1
            if i == len(experiences):
                capture.flush(0)
            for child in state.children:
                if not child.alive():
                    raise DemoError(f"{child.name} exited with code {child.proc.returncode}; its log "
                                    f"({child.log_path}) ends with:\n{child.log_tail()}")
            with monitor.lock:
                display.update(capture.stats().delivered, obs, session.expected_sampled)
                narrate(display, obs, told)
                start_closers(obs, session, opts, state)
                maybe_train_now(obs, session, state)
                done, why = finished(obs, session, opts, state, all_published=i == len(experiences),
                                     delivered=capture.stats().delivered)
                line = display.text_line()
                # in a log: a line when something moved (at most every 2 s), else one every 30 s as a heartbeat
                if not console.is_terminal and (time.monotonic() >= next_line + 28.0
                                                or (line != last_line and time.monotonic() >= next_line)):
                    next_line, last_line = time.monotonic() + 2.0, line
                    console.print(line)
                if done and opts.promote and not state.forced and state.closer_env is not None:
                    done = not force_promote(obs, session, state)
            if live is not None:
                live.update(display.renderable())
            if done:
                done_reason = why
                break
            if now > deadline:
                break
            time.sleep(0.25)
        capture.close()
        display.update(capture.stats().delivered, obs, session.expected_sampled)
        if live is not None:
            live.update(display.renderable())
        else:
            console.print(display.text_line())
    return done_reason
