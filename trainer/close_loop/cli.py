"""``tier3 eval | promote | rollback | export``: the close-the-loop steps by hand (``tier3/cli.py`` adds them).

- ``tier3 eval RUN_ID``: evaluate the run's merged PyTorch model on its holdout again (a diagnostic); ``--served``:
  the gate's evaluation of the exported GGUF through the real server (slices, paired comparisons); metrics into
  its manifest, a report folder (markdown, JSON, PNG) and an ``evaluated`` event.
- ``tier3 promote RUN_ID``: apply the promotion rule to the run's latest evaluation and publish the verdict
  (``promoted`` / ``rejected`` with the reasons); ``--force`` promotes regardless and says so in the event.
- ``tier3 rollback``: withdraw the promoted model in force; the router goes back to the one before (or the
  teacher).
- ``tier3 export RUN_ID``: merge, GGUF f16 + quantised, Ollama registration (or a Modelfile and the command).
- ``tier3 close-loop RUN_ID``: all of it as the trainer does after a run: export the candidate, evaluate the
  served GGUF, the verdict, and a promoted version's registration.
- ``tier3 watch``: watch the promoted version's online agreement (``online-eval``) and roll it back when it
  drifts (``trainer/close_loop/online_watch.py``); ``--once`` judges once and prints the judgement.
- ``tier3 serve``: llama-cpp-python's OpenAI-compatible server on the exported GGUF files, each version under
  ``<name>:v<N>``, the version in force first (``trainer/close_loop/serve.py``); the router's student arm calls it.

``python -m trainer.close_loop.cli ...`` runs them without the streams CLI.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer

from schemas.runtime.preflight import UserError, check_topics, load_settings
from trainer.errors import TrainerError


def _settings(**overrides: Any) -> Any:
    """The settings (an invalid one: one line each, exit 2), after checking that a broker answers and
    training-runs exists as `tier3 topics create` made it: every command here reads or writes its events."""
    from trainer.close_loop.settings import CloseLoopSettings

    s = load_settings(CloseLoopSettings, **{k: v for k, v in overrides.items() if v is not None})
    check_topics(s, s.specs_of(s.training_runs_topic))
    return s


def _run_dir(s: Any, run_id: str) -> None:
    if not (s.runs_dir / run_id).is_dir():
        raise UserError(f"no run {run_id!r} in {s.runs_dir} (TIER3_RUNS_DIR)")


def _fail(exc: Exception) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(exc.exit_code if isinstance(exc, UserError) else 1)


def _print(doc: Any) -> None:
    typer.echo(json.dumps(doc, indent=2, sort_keys=True, default=str))


def eval_cmd(
    run_id: Annotated[str, typer.Argument(help="the run to evaluate (a folder under the runs dir)")],
    max_examples: Annotated[int | None, typer.Option(help="evaluate only the first N holdout examples")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="generation bound per example (tokens)")] = None,
    served: Annotated[bool, typer.Option("--served", help="evaluate the run's exported GGUF through a real "
                                         "llama-cpp-python server started for it (what ships), not the adapter"
                                         )] = False,
    server_url: Annotated[str | None, typer.Option(help="evaluate through this running OpenAI-compatible "
                                                   "endpoint (e.g. `tier3 serve`'s), asking for <name>:v<N>"
                                                   )] = None,
) -> None:
    """Re-run the holdout evaluation of a run: metrics into its manifest, a report, an `evaluated` event."""
    from trainer.close_loop.evaluate import evaluate_run

    s = _settings(tier3_eval_max_examples=max_examples, tier3_eval_max_new_tokens=max_new_tokens)
    _run_dir(s, run_id)
    try:
        if served or server_url:
            res = _eval_served(s, run_id, server_url)
        else:
            res = evaluate_run(s, run_id)
    except TrainerError as exc:
        raise _fail(exc) from None
    _print({"run_id": run_id, "model_version": res.model_version, "metrics": res.metrics,
            "report": str(res.report_paths["report_md"])})


def _eval_served(s: Any, run_id: str, server_url: str | None) -> Any:
    """Evaluate the run's exported model through an OpenAI-compatible server (started here unless given)."""
    from trainer.close_loop.evaluate import evaluate_run
    from trainer.close_loop.serve import chat_generator, run_export, served_name
    from trainer.manifest import find_manifest

    if server_url:
        version = find_manifest(s.runs_dir, run_id).model_version
        alias = served_name(s, version)
        gen = chat_generator(server_url, alias, s.tier3_eval_max_new_tokens)
        return evaluate_run(s, run_id, generate=gen, source={"via": "server", "server_url": server_url,
                                                            "model": alias})
    from trainer.close_loop.served_eval import evaluate_served_run

    run_export(s, run_id)  # a clear error when the run has no exported GGUF here
    return evaluate_served_run(s, run_id)  # what the gate decides on: slices, paired comparisons, diagnostics


def promote_cmd(
    run_id: Annotated[str, typer.Argument(help="an evaluated run")],
    force: Annotated[bool, typer.Option("--force", help="promote even if the rule says no")] = False,
    reason: Annotated[str | None, typer.Option(help="why (recorded in the event)")] = None,
) -> None:
    """Apply the promotion rule to an evaluated run and publish `promoted` or `rejected` with the reasons."""
    from trainer.close_loop.gate import gate_run

    s = _settings()
    try:  # from the events on training-runs: the run's folder may be on another machine
        ev = gate_run(s, run_id, force=force, reason=reason)
    except TrainerError as exc:
        raise _fail(exc) from None
    _print({"run_id": run_id, "event": ev.event, "model_version": ev.model_version,
            "reasons": ev.details["reasons"]})
    if ev.event != "promoted":
        raise typer.Exit(3)  # scripts can tell a rejection from an error (1) and a config mistake (2)


def rollback_cmd(
    reason: Annotated[str, typer.Option(help="why (recorded in the event)")] = "manual rollback (tier3 rollback)",
) -> None:
    """Withdraw the promoted student in force; the previous one (or the teacher) serves again."""
    from trainer.close_loop.gate import rollback

    s = _settings()
    try:
        ev = rollback(s, reason=reason)
    except TrainerError as exc:
        raise _fail(exc) from None
    _print({"rolled_back_run_id": ev.run_id, **ev.details, "version_in_force": ev.model_version})


def export_cmd(run_id: Annotated[str, typer.Argument(help="the run to export")]) -> None:
    """Merge the run's LoRA adapter, write GGUF (f16 and the quantised type), register with Ollama. A run the close
    loop exported as a candidate already is registered from those files (nothing is converted again)."""
    from schemas.runs import fold_runs
    from trainer.close_loop.export import export_run, register_run
    from trainer.events import read_run_events

    s = _settings()
    _run_dir(s, run_id)
    try:
        if run_id in fold_runs(read_run_events(s)).exported:
            reg = register_run(s, run_id)
            res_files, res_gguf, res_ollama = reg.event.details.get("files"), reg.event.details.get("gguf"), reg.ollama
            version = reg.event.model_version
        else:
            res = export_run(s, run_id)
            res_files, res_gguf, res_ollama, version = res.files, res.gguf, res.ollama, res.model_version
    except TrainerError as exc:
        raise _fail(exc) from None
    _print({"run_id": run_id, "model_version": version, "files": res_files, "gguf": res_gguf,
            "ollama": res_ollama.as_dict()})
    if not res_ollama.registered:
        typer.echo(f"no Ollama server answered at {res_ollama.host}; to register by hand run:", err=True)
        for cmd in res_ollama.commands:
            typer.echo(f"  {cmd}", err=True)


def close_loop_cmd(run_id: Annotated[str, typer.Argument(help="a trained run")]) -> None:
    """Export the candidate, evaluate the served GGUF, the gate's verdict and (when promoted) the registration."""
    from trainer.close_loop.gate import after_run

    s = _settings()
    _run_dir(s, run_id)
    try:
        out = after_run(s, run_id)
    except TrainerError as exc:
        raise _fail(exc) from None
    _print({"verdict": out["verdict"].event, "reasons": out["verdict"].details["reasons"],
            "exported": out["exported"].details if out["exported"] else None, "export_error": out["export_error"]})


def watch_cmd(
    once: Annotated[bool, typer.Option("--once", help="judge once, print the judgement, exit")] = False,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING")] = "INFO",
) -> None:
    """Roll the promoted student back (reason online_eval) when its online agreement with the teacher drifts."""
    import logging
    import signal
    import threading

    from trainer.close_loop.online_watch import Watcher, watch

    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    s = _settings()
    check_topics(s, s.specs_of(s.online_eval_topic))  # the worker's closed windows: made by `tier3 topics create`
    if once:
        w = Watcher(s)
        try:
            ev = w.step()
        except TrainerError as exc:
            raise _fail(exc) from None
        finally:
            w.close()
        j = w.last
        _print({"action": j.action if j else None, "why": j.why if j else None,
                "numbers": j.numbers if j else None, "published": ev.details if ev else None})
        return
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    published = watch(s, stop=stop)
    _print({"rollbacks": [ev.details for ev in published]})


def serve_cmd(
    version: Annotated[list[int] | None, typer.Option("--version", help="serve only these versions (repeat); "
                                                      "default: every exported one")] = None,
    host: Annotated[str | None, typer.Option(help="listen address (TIER3_SERVE_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="port (TIER3_SERVE_PORT; 0 = a free one)")] = None,
    follow: Annotated[bool, typer.Option(help="restart the server when the exported versions or the version "
                                         "in force change")] = True,
    poll_s: Annotated[float, typer.Option(help="how often --follow reads training-runs (s)")] = 5.0,
    replicas: Annotated[int | None, typer.Option(help="servers on consecutive ports, the threads shared out "
                                                  "(TIER3_SERVE_REPLICAS): each answers one request at a time")
                        ] = None,
) -> None:
    """Serve the exported students with llama-cpp-python's OpenAI-compatible server, until Ctrl-C / SIGTERM."""
    import signal
    import threading

    from trainer.close_loop.serve import models_to_serve, pool_for
    from trainer.events import read_run_events

    s = _settings(tier3_serve_host=host, tier3_serve_port=port, tier3_serve_replicas=replicas)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    srv = None
    try:
        models = models_to_serve(s, read_run_events(s), version or ())
        srv = pool_for(s, models).start(s.tier3_serve_start_timeout_s)
        _announce(srv)
        while not stop.wait(poll_s):
            if not srv.running():
                raise _fail(RuntimeError(f"the server stopped: {srv.log_tail()}"))
            if not follow:
                continue
            try:
                now = models_to_serve(s, read_run_events(s), version or ())
            except TrainerError as exc:  # nothing exported any more (files removed): keep serving what runs
                typer.echo(f"warning: {exc}", err=True)
                continue
            if now != srv.models:
                typer.echo(f"exported versions changed: restarting with {[m.alias for m in now]}", err=True)
                srv.stop()
                srv = pool_for(s, now, port=srv.port if s.tier3_serve_port else 0).start(
                    s.tier3_serve_start_timeout_s)
                _announce(srv)
    except TrainerError as exc:
        raise _fail(exc) from None
    finally:
        if srv is not None:
            srv.stop()


def _announce(srv: Any) -> None:
    _print({"base_url": srv.base_url, "models": {m.alias: str(m.gguf) for m in srv.models},
            "default": srv.models[0].alias,
            "pids": [x.proc.pid for x in srv.servers if x.proc is not None]})
    typer.echo(f"serving; point the router here: TIER3_STUDENT_BASE_URL={srv.base_url}", err=True)
    sys.stdout.flush()


def register(app: typer.Typer) -> None:
    """Add these commands to the ``tier3`` CLI (``tier3/cli.py``)."""
    app.command("eval")(eval_cmd)
    app.command("promote")(promote_cmd)
    app.command("rollback")(rollback_cmd)
    app.command("export")(export_cmd)
    app.command("close-loop")(close_loop_cmd)
    app.command("watch")(watch_cmd)
    app.command("serve")(serve_cmd)
