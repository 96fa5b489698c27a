"""The trainer's commands, added to the ``tier3`` CLI by the composition root (``tier3/cli.py``).

- ``tier3 trainer``: the consumer (``trainer/consumer.py``); runs until SIGTERM / SIGINT.
- ``tier3 train-now``: asks the trainer to start a run at once, from any machine that reaches the bootstrap
  servers: a ``train_now`` request (:class:`schemas.TrainerControl`) on the ``trainer-control`` topic, where the
  trainer answers it (``accepted`` with the run id, or ``declined`` with the reason: nothing new to train). The
  command waits for the answer and prints it; both stay on the topic (who asked, which run it started).
- ``tier3 replay``: rebuild a dataset (``--train``: and a model) from the log without touching the trainer group.
- ``tier3 models``: named base models, pulled once and cached.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer

from schemas.runtime.preflight import UserError, check_topics, load_settings
from schemas.runtime.redaction import install_log_redaction, redact
from trainer.errors import TrainerError


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_log_redaction()  # secrets out of every record of every logger (its handler included)


def _settings() -> Any:
    from trainer.settings import TrainerSettings
    from trainer.sft_config import SFTConfig

    # an invalid setting: one line each (name and reason, never the value), exit 2
    return load_settings(TrainerSettings), load_settings(SFTConfig)


def trainer_cmd(
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING")] = "INFO",
    max_runs: Annotated[int | None, typer.Option(help="exit after this many committed runs (testing)")] = None,
) -> None:
    """Consume enriched traces; train a LoRA student when enough are new; commit offsets only after success."""
    from trainer.consumer import TrainerConsumer

    _setup_logging(log_level)
    settings, cfg = _settings()
    from trainer.consumer import busy_workers, inject_fault

    # its topics exist as `tier3 topics create` made them (else one line saying so, exit 2): a consumer that
    # subscribes to a missing topic waits forever, and one that made the broker create it broke the partitioning
    check_topics(settings, settings.specs_of(settings.traces_topic, settings.training_runs_topic,
                                             settings.trainer_status_topic, settings.trainer_control_topic))
    evaluate: Any = None
    after_success: Any = None
    after_pending: Any = None
    if settings.tier3_trainer_close_loop:
        # evaluation inside the protocol (before the manifest), gate + export after the commit
        from trainer.close_loop.evaluate import evaluation_hook
        from trainer.close_loop.gate import after_run, close_loop_pending
        from trainer.close_loop.settings import CloseLoopSettings

        loop_settings = load_settings(CloseLoopSettings)
        hook = evaluation_hook(loop_settings)

        def fault(point: str) -> None:
            inject_fault(settings, point)

        def evaluate(adapter_dir: Any, built: Any, run_cfg: Any, *, run_id: str, model_version: int) -> Any:
            metrics = hook(adapter_dir, built, run_cfg, run_id=run_id, model_version=model_version)
            fault("kill_in_evaluation")  # testing: evaluated, the metrics not yet in a manifest
            return metrics

        def after_success(m: Any) -> None:
            after_run(loop_settings, m.run_id, fault=fault)

        def after_pending(manifests: Any) -> list[str]:
            return close_loop_pending(loop_settings, manifests)

    tc = TrainerConsumer(settings, cfg, evaluate=evaluate, after_success=after_success, after_pending=after_pending)

    def on_signal(signum: int, _frame: Any) -> None:
        logging.getLogger("tier3.trainer").info("signal %d: stopping (a run in progress is abandoned, not "
                                                "committed)", signum)
        tc.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stats = tc.run(max_runs=max_runs)  # closes every Kafka client before it returns
    typer.echo(orjson.dumps({"runs_succeeded": stats.runs_succeeded, "runs_failed": stats.runs_failed,
                             "recognised": stats.recognised, "last_run_id": stats.last_run_id}).decode())
    busy = busy_workers()
    if busy:
        # a worker thread did not end within TIER3_TRAINER_STOP_GRACE_S (an evaluation or export in native code):
        # letting the interpreter finalise under it aborts the process ("terminate called without an active
        # exception"). Nothing durable depends on it (the protocol commits only after it): leave at once.
        logging.getLogger("tier3.trainer").warning("stopping without waiting for %s", [t.name for t in busy])
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def train_now_cmd(
    wait_s: Annotated[float, typer.Option("--wait", help="seconds to wait for the trainer's answer (0: send "
                                                          "and exit)")] = 60.0,
    group: Annotated[str | None, typer.Option(help="the trainer group asked (default TIER3_TRAINER_GROUP)")] = None,
) -> None:
    """Ask the trainer to start a run now: a train_now request on trainer-control; prints the trainer's answer.

    Exit codes: 0 accepted (a run started), 3 declined (the reason is printed), 4 no answer within --wait (the
    request stays on the topic: a trainer that starts later answers it), 1 the request could not be sent."""
    from trainer.control import send_train_now

    settings, _cfg = _settings()
    check_topics(settings, settings.specs_of(settings.trainer_control_topic))
    try:
        req, answer = send_train_now(settings, group=group or settings.tier3_trainer_group, wait_s=wait_s)
    except TrainerError as exc:
        typer.echo(f"error: {redact(str(exc))}", err=True)
        raise typer.Exit(1) from None
    if answer is None:
        typer.echo(orjson.dumps({"request_id": req.request_id, "answer": None}).decode())
        if wait_s > 0:
            typer.echo(f"no trainer of group {req.group} answered within {wait_s:.0f} s; the request is on "
                       f"{settings.trainer_control_topic} and is answered when one runs", err=True)
            raise typer.Exit(4)
        return
    typer.echo(orjson.dumps({"request_id": req.request_id, "answer": answer.answer, "run_id": answer.run_id,
                             "reason": answer.reason, "trainer_id": answer.trainer_id}).decode())
    if answer.answer != "accepted":
        raise typer.Exit(3)


def _parse_time(value: str) -> int:
    """Epoch milliseconds, or an ISO 8601 time (UTC unless it says otherwise)."""
    if value.isdigit():
        return int(value)
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise UserError(f"--since {value!r} is not a time: give ISO 8601 (2026-05-01T12:00:00Z, 2026-05-01) or "
                        "epoch milliseconds") from None
    if dt.tzinfo is None:
        from datetime import UTC

        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


def replay_cmd(
    run: Annotated[str | None, typer.Option(help="replay up to a past run's offsets (its run id, looked up in "
                                                 "the runs dir); prints whether the sha256 matches")] = None,
    manifest: Annotated[Path | None, typer.Option(help="like --run, from a manifest file")] = None,
    since: Annotated[str | None, typer.Option(help="from this time (ISO 8601 or epoch ms) to the end")] = None,
    out: Annotated[Path | None, typer.Option(help="output folder (default <data dir>/replays/<id>)")] = None,
    train: Annotated[bool, typer.Option("--train/--no-train", help="also train a new adapter")] = False,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING")] = "WARNING",
) -> None:
    """Rebuild a dataset from enriched-traces (from the beginning, --since a time, or --run's offsets) and print
    its sha256. Uses assign() and never commits: the trainer group's offsets are untouched."""
    _setup_logging(log_level)
    settings, cfg = _settings()
    if sum(x is not None for x in (run, manifest, since)) > 1:
        raise UserError("give at most one of --run, --manifest, --since")
    since_ms = _parse_time(since) if since is not None else None
    if manifest is not None and not manifest.is_file():
        raise UserError(f"--manifest {manifest}: no such file")
    if run is not None and not (settings.runs_dir / run).is_dir():
        raise UserError(f"--run {run}: no such run in {settings.runs_dir} (TIER3_RUNS_DIR)")
    try:
        m = None
        if run or manifest:
            from trainer.manifest import find_manifest, read_manifest

            m = find_manifest(settings.runs_dir, run) if run else read_manifest(manifest) if manifest else None
        topic = m.topic if m else settings.traces_topic
        if topic == settings.traces_topic:
            check_topics(settings, settings.specs_of(topic))
        else:  # a run recorded under another prefix: its topic must still be there
            _require_topic(settings, topic)
        # the reader, the codec and the dataset code once a broker has answered (`tier3 replay` starts sooner)
        from trainer.replay import ranges_from_beginning, ranges_from_time, replay

        if m is not None:
            ranges = dict(m.dataset_offsets)
            # the run's own dataset settings (holdout fraction, phases, ...) are what its sha256 depends on
            cfg = type(cfg)(**{k: v for k, v in m.hyperparameters.items() if k in type(cfg).model_fields})
        elif since_ms is not None:
            ranges = ranges_from_time(settings, topic, since_ms)
        else:
            ranges = ranges_from_beginning(settings, topic)
        out_dir = out or settings.tier3_data_dir / "replays" / time.strftime(
            f"replay-%Y%m%dT%H%M%SZ-{uuid.uuid4().hex[:6]}", time.gmtime())
        result = replay(settings, cfg, ranges, out_dir, topic=topic, manifest=m, train=train)
    except TrainerError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(orjson.dumps(result.summary(), option=orjson.OPT_INDENT_2).decode())
    if result.matches is False:
        typer.echo(f"error: sha256 {result.dataset.sha256} differs from the run's {result.expected_sha256}", err=True)
        raise typer.Exit(3)


def _require_topic(settings: Any, topic: str) -> None:
    from schemas.runtime.preflight import TopicsNotReady, kafka_metadata

    if topic not in kafka_metadata(settings).topics:
        raise TopicsNotReady(f"topic {topic} (from the run's manifest) does not exist on "
                             f"{settings.kafka_bootstrap_servers}: its traces are gone; replay from the beginning "
                             "instead")
models_app = typer.Typer(help="named base models: pulled once, cached, checksummed (trainer/models.py)",
                         no_args_is_help=True)


@models_app.command("pull")
def models_pull_cmd(
    name: Annotated[str, typer.Argument(help="a model name (see `tier3 models list`)")] = "smollm2-135m",
    force: Annotated[bool, typer.Option(help="pull again even if it is cached")] = False,
) -> None:
    """Download and convert a named base model into the cache (once); print its folder on the last line."""
    from trainer.models import pull, read_stamp

    _setup_logging("WARNING")
    try:
        folder = pull(name, force=force)
    except TrainerError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    stamp = read_stamp(folder) or {}
    typer.echo(f"{name}: {stamp.get('source', '?')}"
               + (f", gguf sha256 {stamp['gguf_sha256']}" if stamp.get("gguf_sha256") else ""), err=True)
    typer.echo(str(folder))


@models_app.command("list")
def models_list_cmd() -> None:
    """The known model names and what is cached (JSON)."""
    from trainer.models import list_models

    typer.echo(orjson.dumps(list_models(), option=orjson.OPT_INDENT_2).decode())


def register(app: typer.Typer) -> None:
    """Add the trainer's commands to the ``tier3`` CLI (``tier3/cli.py``)."""
    app.add_typer(models_app, name="models")
    app.command("trainer")(trainer_cmd)
    app.command("train-now")(train_now_cmd)
    app.command("replay")(replay_cmd)

