"""What ``tier3`` imports before it does anything: the root help imports no side, ``tier3 replay --help`` only the
trainer's, ``tier3 replay`` nothing of the dataset code before a broker answers (``tier3/cli.py``: each side is
imported when one of its commands runs). Assertions about imports, not timings (those are in
``bench/cli_startup.py``). The root help's command summaries (``tier3.cli.COMMANDS``) are kept equal to the
commands' own.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import typer
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent

#: never imported by a help or before a broker answers: the worker's, the models', the servers'
HEAVY = ("faust", "torch", "transformers", "datasets", "peft", "trl", "llama_cpp", "numpy", "httpx", "aiohttp")
#: the sides of the CLI, each imported only for its own commands
SIDES = ("streams.cli", "trainer.cli", "trainer.close_loop.cli", "tier3.demo", "streams.dlq",
         "tier3.devbroker.commands")

_PROBE = """
import json, sys
sys.argv = ["tier3", *json.loads(sys.argv[1])]
from tier3.cli import main
code = 0
try:
    main()
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "modules": sorted(sys.modules)}), file=sys.stderr)
"""


def _imports(*args: str, env: dict[str, str] | None = None) -> tuple[object, set[str]]:
    """``tier3 ARGS`` in a fresh interpreter: its exit code and every module imported by then."""
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(list(args))], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **(env or {})}, timeout=120)
    last = json.loads(proc.stderr.strip().splitlines()[-1])
    return last["code"], set(last["modules"])


def _loaded(modules: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(n for n in names if n in modules)


def test_root_help_imports_no_side_and_nothing_heavy() -> None:
    code, modules = _imports("--help")
    assert code == 0
    assert _loaded(modules, SIDES) == []
    # no settings, no Kafka client, no models, no schema validation: only typer (and rich for the help)
    assert _loaded(modules, (*HEAVY, "confluent_kafka", "pydantic", "pydantic_core", "pydantic_settings",
                             "jsonschema", "msgspec", "schemas.messages", "schemas.settings", "schemas.tasks")) == []


def test_replay_help_imports_only_the_trainer_side() -> None:
    code, modules = _imports("replay", "--help")
    assert code == 0
    assert "trainer.cli" in modules
    assert _loaded(modules, tuple(s for s in SIDES if s != "trainer.cli")) == []
    # (typer itself imports pydantic to convert option values)
    assert _loaded(modules, (*HEAVY, "confluent_kafka", "pydantic_settings", "jsonschema", "msgspec",
                             "trainer.replay", "trainer.dataset", "schemas.tasks")) == []


def test_replay_imports_no_dataset_code_before_a_broker_answers() -> None:
    # nothing listens on port 1: the command stops at its first broker contact (one line, exit 2)
    code, modules = _imports("replay", "--out", str(ROOT / ".no-such-replay"),
                             env={"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1", "TIER3_KAFKA_TIMEOUT_S": "0.5"})
    assert code == 2
    assert "confluent_kafka" in modules and "trainer.settings" in modules
    assert _loaded(modules, tuple(s for s in SIDES if s != "trainer.cli")) == []
    assert _loaded(modules, (*HEAVY, "trainer.replay", "trainer.projection", "trainer.dataset", "trainer.manifest",
                             "schemas.tasks", "jsonschema", "msgspec")) == []


def _eager_app() -> typer.Typer:
    """The root command as it was built before it was lazy: every side registered up front."""
    from tier3 import cli

    app = typer.Typer(help=cli.app.info.help, no_args_is_help=True, pretty_exceptions_enable=False)
    for side in dict.fromkeys(side for side, _ in cli.COMMANDS.values()):
        side(app)
    return app


def test_commands_table_matches_the_commands() -> None:
    from tier3 import cli

    eager = typer.main.get_group(_eager_app())
    assert list(cli.COMMANDS) == eager.list_commands(None)  # type: ignore[arg-type]
    for name, (_, summary) in cli.COMMANDS.items():
        first = inspect.cleandoc(eager.commands[name].help or "").split("\n\n")[0]
        assert summary == first, f"tier3.cli.COMMANDS[{name!r}]: the summary of `tier3 {name}` is now {first!r}"


def test_root_help_is_the_eager_one() -> None:
    from tier3 import cli

    runner = CliRunner()
    lazy = runner.invoke(cli.app, ["--help"], prog_name="tier3", terminal_width=100)
    eager = runner.invoke(_eager_app(), ["--help"], prog_name="tier3", terminal_width=100)
    assert lazy.exit_code == eager.exit_code == 0
    assert lazy.output == eager.output


def test_every_command_resolves_to_its_side() -> None:
    from tier3 import cli

    runner = CliRunner()
    for name in cli.COMMANDS:
        res = runner.invoke(cli.app, [name, "--help"], prog_name="tier3", terminal_width=100)
        assert res.exit_code == 0, (name, res.output)
        assert f"tier3 {name}" in res.output
    res = runner.invoke(cli.app, ["replya"], prog_name="tier3")
    assert res.exit_code == 2 and "replay" in res.output  # typer's suggestion still knows every name
