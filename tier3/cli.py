"""``tier3``: the one command-line entry point, assembled from the commands of each side.

- ``streams/cli.py``: ``topics``, ``publish``, ``worker``, ``dlq``;
- ``trainer/cli.py``: ``trainer``, ``train-now``, ``replay``, ``models``;
- ``trainer/close_loop/cli.py``: ``eval``, ``promote``, ``rollback``, ``export``, ``close-loop``, ``watch``,
  ``serve``;
- ``tier3/devbroker/commands.py``: ``broker`` (the development broker);
- ``tier3/demo``: ``demo``, which runs all of them together.

The other ``python -m`` entry points are internal: ``trainer.close_loop.llama_server`` (started by ``tier3 serve``),
``trainer.close_loop.gguf_converter`` (run by ``tier3 export``; ``fetch`` at install time by ``make setup``) and
``schemas.write_json_schemas`` (a developer tool).

Each side is imported only when one of its commands runs (or its help is asked for): ``tier3 replay`` does not
import the streams side (pydantic-settings, confluent-kafka, rich tables...), and ``tier3 --help`` imports none of
them. The root help lists every command with its one-paragraph summary from :data:`COMMANDS`, a copy of each
command's docstring summary kept equal to it by ``tests/test_cli_startup.py``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup

from schemas.runtime.preflight import run_cli
from schemas.runtime.redaction import install_excepthook, install_log_redaction, redact


def _streams(app: typer.Typer) -> None:
    from streams import cli as streams_cli

    streams_cli.register(app)


def _broker(app: typer.Typer) -> None:
    from tier3.devbroker import commands as broker_commands

    broker_commands.register(app)


def _demo(app: typer.Typer) -> None:
    from tier3.demo import demo

    app.command("demo")(demo)


def _trainer(app: typer.Typer) -> None:
    from trainer import cli as trainer_cli

    trainer_cli.register(app)


def _close_loop(app: typer.Typer) -> None:
    from trainer.close_loop import cli as close_loop_cli

    close_loop_cli.register(app)


#: every command, in the order of ``tier3 --help``: (the side that registers it, the first paragraph of its help)
COMMANDS: dict[str, tuple[Callable[[typer.Typer], None], str]] = {
    "publish": (_streams, "Publish experiences from a JSONL file through the capture library, as an application "
                          "would."),
    "worker": (_streams, "Run the streams worker: sample experiences, enrich them with the teacher, write traces / "
                         "dead letters."),
    "dlq": (_streams, "Dead letters: counts by stage and reason, the latest ones, and re-drive."),
    "demo": (_demo, "Run the whole flywheel on this machine: broker, worker, trainer, the example traffic, every "
                    "stage live."),
    "trainer": (_trainer, "Consume enriched traces; train a LoRA student when enough are new; commit offsets only "
                          "after success."),
    "train-now": (_trainer, "Ask the trainer to start a run now: a train_now request on trainer-control; prints the "
                            "trainer's answer."),
    "replay": (_trainer, "Rebuild a dataset from enriched-traces (from the beginning, --since a time, or --run's "
                         "offsets) and print\nits sha256. Uses assign() and never commits: the trainer group's "
                         "offsets are untouched."),
    "eval": (_close_loop, "Re-run the holdout evaluation of a run: metrics into its manifest, a report, an "
                          "`evaluated` event."),
    "promote": (_close_loop, "Apply the promotion rule to an evaluated run and publish `promoted` or `rejected` "
                             "with the reasons."),
    "rollback": (_close_loop, "Withdraw the promoted student in force; the previous one (or the teacher) serves "
                              "again."),
    "export": (_close_loop, "Merge the run's LoRA adapter, write GGUF (f16 and the quantised type), register with "
                            "Ollama. A run the close\nloop exported as a candidate already is registered from those "
                            "files (nothing is converted again)."),
    "close-loop": (_close_loop, "Export the candidate, evaluate the served GGUF, the gate's verdict and (when "
                                "promoted) the registration."),
    "watch": (_close_loop, "Roll the promoted student back (reason online_eval) when its online agreement with the "
                           "teacher drifts."),
    "serve": (_close_loop, "Serve the exported students with llama-cpp-python's OpenAI-compatible server, until "
                           "Ctrl-C / SIGTERM."),
    "topics": (_streams, "tier3's topics."),
    "models": (_trainer, "named base models: pulled once, cached, checksummed (trainer/models.py)"),
    "broker": (_broker, "A local single-node Kafka broker (KRaft), no Docker."),
}


def side_commands(register: Callable[[typer.Typer], None]) -> dict[str, Any]:
    """The click commands (and groups) one side registers, as the root group would have built them."""
    sub = typer.Typer(pretty_exceptions_enable=False)
    register(sub)
    return dict(typer.main.get_group(sub).commands)


class LazyGroup(TyperGroup):
    """The root group: its commands are placeholders (name and summary) until one is resolved, which imports its
    side and puts the side's real commands in their place. The root help is drawn from the placeholders."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name, (_, summary) in COMMANDS.items():
            self.commands[name] = TyperCommand(name, help=summary)
        self._loaded: set[Callable[[typer.Typer], None]] = set()
        self._listing = False

    def _load(self, side: Callable[[typer.Typer], None]) -> None:
        if side not in self._loaded:
            self._loaded.add(side)
            self.commands.update(side_commands(side))

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if not self._listing:
            entry = COMMANDS.get(cmd_name)
            if entry is not None:
                self._load(entry[0])
            elif cmd_name not in self.commands:  # a command not in COMMANDS (yet): every side is asked
                for side in dict.fromkeys(side for side, _ in COMMANDS.values()):
                    self._load(side)
        return super().get_command(ctx, cmd_name)

    def format_help(self, ctx: Any, formatter: Any) -> None:
        self._listing = True  # the summaries: no side is imported
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False


app = typer.Typer(cls=LazyGroup, help="tier3: distil a teacher model into a local student from live traffic, on "
                  "Kafka.", no_args_is_help=True, pretty_exceptions_enable=False)


@app.callback()
def _root() -> None:
    # a callback makes the root a group whatever commands are registered (none are: LazyGroup has them)
    pass


def main() -> None:
    # every command: secrets (and their encoded / masked forms) out of every log record of every logger, whatever
    # handlers the command adds, and out of a crash's traceback
    install_log_redaction()
    install_excepthook()
    try:
        run_cli(app)  # a user's mistake (settings, arguments, no broker, missing topics): one line, exit 2
    except Exception as exc:
        errors = sys.modules.get("streams.errors")  # a StreamsError comes only from a side that imported it
        if errors is None or not isinstance(exc, errors.StreamsError):
            raise
        from streams import cli as streams_cli

        streams_cli.console.print(f"[bold red]error:[/] {redact(str(exc))}")
        sys.exit(1)

