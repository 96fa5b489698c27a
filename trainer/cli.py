"""The trainer's commands, added to the ``tier3`` CLI through the ``tier3.commands`` entry point.

- ``tier3 trainer``: the consumer (``trainer/consumer.py``); runs until SIGTERM / SIGINT.
- ``tier3 train-now``: asks the running trainer to start a run at once. It creates the file
  ``<runs dir>/train-now``; the trainer checks for it on every loop turn (sub-second), removes it and trains
  whatever new traces wait (none: it says so and does nothing). A file, not a message, because it needs no
  extra topic and works while the broker is the thing being debugged; the trainer and the command must share
  ``TIER3_RUNS_DIR`` (the same volume in docker-compose).
- ``tier3 replay``: rebuild a dataset (``--train``: and a model) from the log without touching the trainer group.

``python -m trainer.cli ...`` runs the same commands without the streams CLI (tests use it for subprocesses).
"""

from __future__ import annotations

import logging
import signal
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from pydantic import ValidationError

from trainer.errors import TrainerError


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _settings() -> Any:
    from trainer.settings import TrainerSettings
    from trainer.sft_config import SFTConfig

    try:
        return TrainerSettings(), SFTConfig()
    except ValidationError as exc:  # names the variable and the reason; no traceback for a config mistake
        typer.echo(f"error: invalid settings:\n{exc}", err=True)
        raise typer.Exit(2) from None


def trainer_cmd(
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING")] = "INFO",
    max_runs: Annotated[int | None, typer.Option(help="exit after this many committed runs (testing)")] = None,
) -> None:
    """Consume enriched traces; train a LoRA student when enough are new; commit offsets only after success."""
    from trainer.consumer import TrainerConsumer

    _setup_logging(log_level)
    settings, cfg = _settings()
    evaluate: Any = None
    after_success: Any = None
    if settings.tier3_trainer_close_loop:
        # evaluation inside the protocol (before the manifest), gate + export after the commit
        from trainer.close_loop_settings import CloseLoopSettings
        from trainer.evaluate import evaluation_hook
        from trainer.gate import after_run

        try:
            loop_settings = CloseLoopSettings()
        except ValidationError as exc:
            typer.echo(f"error: invalid settings:\n{exc}", err=True)
            raise typer.Exit(2) from None
        evaluate = evaluation_hook(loop_settings)

        def after_success(m: Any) -> None:
            after_run(loop_settings, m.run_id)

    tc = TrainerConsumer(settings, cfg, evaluate=evaluate, after_success=after_success)

    def on_signal(signum: int, _frame: Any) -> None:
        logging.getLogger("tier3.trainer").info("signal %d: stopping (a run in progress is abandoned, not "
                                                "committed)", signum)
        tc.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stats = tc.run(max_runs=max_runs)
    typer.echo(orjson.dumps({"runs_succeeded": stats.runs_succeeded, "runs_failed": stats.runs_failed,
                             "recognised": stats.recognised, "last_run_id": stats.last_run_id}).decode())


def train_now_cmd() -> None:
    """Ask the running trainer to start a run now (creates <runs dir>/train-now; the trainer removes it)."""
    from trainer.manifest import write_atomic
    from trainer.settings import TrainerSettings

    settings = TrainerSettings()
    write_atomic(settings.train_now_path, f"{time.time():.3f}\n".encode())
    typer.echo(f"requested a run: {settings.train_now_path} (the trainer picks it up within a second)")


def _parse_time(value: str) -> int:
    """Epoch milliseconds, or an ISO 8601 time (UTC unless it says otherwise)."""
    if value.isdigit():
        return int(value)
    dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
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
    from trainer.manifest import find_manifest, read_manifest
    from trainer.replay import ranges_from_beginning, ranges_from_time, replay

    _setup_logging(log_level)
    settings, cfg = _settings()
    if sum(x is not None for x in (run, manifest, since)) > 1:
        typer.echo("error: give at most one of --run, --manifest, --since", err=True)
        raise typer.Exit(2)
    try:
        m = find_manifest(settings.runs_dir, run) if run else read_manifest(manifest) if manifest else None
        topic = m.topic if m else settings.traces_topic
        if m is not None:
            ranges = dict(m.dataset_offsets)
            # the run's own dataset settings (holdout fraction, phases, ...) are what its sha256 depends on
            cfg = type(cfg)(**{k: v for k, v in m.hyperparameters.items() if k in type(cfg).model_fields})
        elif since is not None:
            ranges = ranges_from_time(settings, topic, _parse_time(since))
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
    """Entry point of the ``tier3.commands`` group: add the trainer's commands to the ``tier3`` CLI."""
    app.add_typer(models_app, name="models")
    app.command("trainer")(trainer_cmd)
    app.command("train-now")(train_now_cmd)
    app.command("replay")(replay_cmd)


def main() -> None:
    app = typer.Typer(help="tier3 trainer commands", no_args_is_help=True, pretty_exceptions_enable=False)
    register(app)
    app()


if __name__ == "__main__":
    main()
