"""``tier3``: the one command-line entry point, assembled from the commands of each side.

- ``streams/cli.py``: ``broker``, ``topics``, ``publish``, ``worker``, ``dlq``;
- ``trainer/cli.py``: ``trainer``, ``train-now``, ``replay``, ``models``;
- ``trainer/close_loop/cli.py``: ``eval``, ``promote``, ``rollback``, ``export``, ``close-loop``, ``watch``,
  ``serve``;
- ``tier3/demo``: ``demo``, which runs all of them together.
"""

from __future__ import annotations

import sys

import typer

from schemas.preflight import run_cli
from streams import cli as streams_cli
from streams.errors import StreamsError
from streams.redaction import install_excepthook, install_log_redaction, redact
from tier3.demo import demo
from trainer import cli as trainer_cli
from trainer.close_loop import cli as close_loop_cli

app = typer.Typer(help="tier3: distil a teacher model into a local student from live traffic, on Kafka.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
streams_cli.register(app)
app.command("demo")(demo)
trainer_cli.register(app)
close_loop_cli.register(app)


def main() -> None:
    # every command: secrets (and their encoded / masked forms) out of every log record of every logger, whatever
    # handlers the command adds, and out of a crash's traceback
    install_log_redaction()
    install_excepthook()
    try:
        run_cli(app)  # a user's mistake (settings, arguments, no broker, missing topics): one line, exit 2
    except StreamsError as exc:
        streams_cli.console.print(f"[bold red]error:[/] {redact(str(exc))}")
        sys.exit(1)


if __name__ == "__main__":
    main()
