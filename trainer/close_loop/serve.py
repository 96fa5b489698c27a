"""Serve exported students with a real local inference server: llama-cpp-python's OpenAI-compatible server.

``tier3 export`` writes ``<name>-v<N>-f16.gguf`` and ``<name>-v<N>-<quant>.gguf``; ``tier3 serve`` starts
``python -m llama_cpp.server`` (the ``serve`` extra: ``llama-cpp-python[server]``, run through
``trainer/close_loop/llama_server.py``) on those files:

- **One request at a time per server**: llama-cpp-python's server evaluates one request at a time (one model
  context, behind a lock). ``tier3 serve --replicas N`` (``TIER3_SERVE_REPLICAS``) starts N servers on
  consecutive ports, the threads shared out among them (:class:`ServerPool`); the router sends each call to the
  least busy URL of ``TIER3_STUDENT_BASE_URL`` (comma-separated), so N concurrent calls are answered at once.
  Other ways: a llama.cpp ``llama-server`` with ``--parallel`` slots, or Ollama (``OLLAMA_NUM_PARALLEL``), each an
  OpenAI-compatible URL the router takes as it is.

- **Which versions**: every exported version whose quantised GGUF is on disk (read from the ``exported``
  events on training-runs), each under the alias ``<TIER3_STUDENT_NAME>:v<N>`` — exactly the model name the
  router asks for (``TIER3_STUDENT_MODEL``, default ``cc-widget-selector:v{version}``). The version in force
  (the top of the promotion stack) is the server's default and is loaded at start; another alias is loaded on
  its first request (one model in memory at a time), so a rollback needs no restart.
- **Aliases are checked, not trusted**: llama-cpp-python answers an unknown model name with its default model,
  so the router's student arm first asks ``GET /v1/models`` and refuses (falls back to the teacher, saying
  why) a version the server does not list. ``--follow`` restarts the server when the exported versions change.
- **Greedy, the GGUF's own chat template**: the server renders the chat template stored in the GGUF (written by
  llama.cpp's converter from the merged model's tokenizer) and stops at its eos (``<|im_end|>`` for ChatML). The
  prompt ids are the ones the trainer trained on (``trainer/close_loop/parity.py`` checks it), and a request's
  ``repeat_penalty`` defaults to 1.0 instead of llama-cpp-python's 1.1, so ``temperature`` 0 is plain greedy
  decoding, as in transformers.
- **Evaluation of what ships**: :func:`chat_generator` is an ``evaluate.Generate`` over any OpenAI-compatible
  endpoint; ``tier3 eval RUN_ID --served`` starts this server on the run's exported GGUF and scores it.

The server is a child process in its own session, stopped by its pid (SIGTERM, then SIGKILL). Its settings
come from a JSON config file and its environment is reduced to the basics: llama-cpp-python's settings are
pydantic ``BaseSettings`` without a prefix, so a stray ``MODEL`` or ``PORT`` variable would override them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from schemas import TrainingRun
from schemas.runs import fold_runs
from trainer.close_loop.settings import CloseLoopSettings
from trainer.errors import ServeError

SERVER_MODULE = "llama_cpp.server"
#: the server tier3 runs: ``python -m llama_cpp.server`` with weight repacking off, greedy decoding by default and
#: message content tokenized as plain text (``trainer/close_loop/llama_server.py`` says why)
LAUNCHER_MODULE = "trainer.close_loop.llama_server"
#: what ``python -m llama_cpp.server`` imports besides llama_cpp (the ``[server]`` extra of llama-cpp-python)
_SERVER_DEPS = ("llama_cpp", "fastapi", "uvicorn", "sse_starlette", "starlette_context")
_ENV_KEEP = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "LD_LIBRARY_PATH", "OMP_NUM_THREADS", "VIRTUAL_ENV",
             "XDG_CACHE_HOME")


def server_installed() -> bool:
    """Whether ``python -m llama_cpp.server`` can run here (without importing it)."""
    return all(importlib.util.find_spec(m) is not None for m in _SERVER_DEPS)


def served_name(settings: CloseLoopSettings, version: int) -> str:
    """The alias a version is served under: the router's ``TIER3_STUDENT_MODEL`` with the version filled in."""
    return f"{settings.tier3_student_name}:v{version}"


@dataclass(frozen=True)
class ServedModel:
    alias: str
    gguf: Path
    run_id: str
    version: int


def exported_models(settings: CloseLoopSettings, events: Iterable[TrainingRun], *,
                    candidates: bool = False) -> list[ServedModel]:
    """Every exported version whose quantised GGUF exists, oldest version first (the latest export of a run).
    A candidate's export (made before the gate: ``candidate`` in the event) is not served unless the run was
    promoted since (a rejected candidate's files stay on disk, unserved); ``candidates`` lists them all (the
    served evaluation of ``tier3 eval --served``)."""
    view = fold_runs(events)
    promoted = {rid for rid, v in view.verdicts.items() if v.event == "promoted"}
    out: dict[int, ServedModel] = {}
    for run_id, ev in view.exported.items():
        if not candidates and ev.details.get("candidate") and run_id not in promoted:
            continue
        files = ev.details.get("files") or {}
        info = files.get(settings.tier3_gguf_quant) or next(iter(files.values()), None)
        if ev.model_version is None or not isinstance(info, dict) or not Path(str(info.get("path"))).is_file():
            continue
        out[ev.model_version] = ServedModel(served_name(settings, ev.model_version), Path(str(info["path"])),
                                            run_id, ev.model_version)
    return [out[v] for v in sorted(out)]


def models_to_serve(settings: CloseLoopSettings, events: Sequence[TrainingRun],
                    versions: Sequence[int] = ()) -> list[ServedModel]:
    """The models for the server, its default first: the version in force when it is exported, else the newest.
    ``versions`` restricts the choice (each must be exported)."""
    available = exported_models(settings, events)
    if versions:
        by_version = {m.version: m for m in available}
        missing = [v for v in versions if v not in by_version]
        if missing:
            raise ServeError(f"version(s) {missing} have no exported {settings.tier3_gguf_quant} GGUF on this "
                             f"machine (exported: {sorted(by_version) or 'none'}); run `tier3 export RUN_ID`")
        available = [by_version[v] for v in versions]
    if not available:
        raise ServeError(f"no exported student to serve under {settings.exports_dir}: promote and export one "
                         "first (`tier3 promote RUN_ID`, `tier3 export RUN_ID`)")
    current = fold_runs(events).current
    in_force = current.model_version if current is not None else None
    default = next((m for m in available if m.version == in_force), available[-1])
    return [default, *[m for m in reversed(available) if m is not default]]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class LlamaServer:
    """``python -m llama_cpp.server`` on GGUF files, as a child process: ``with LlamaServer(...) as srv:``."""

    def __init__(self, models: Sequence[ServedModel], *, host: str = "127.0.0.1", port: int = 0,
                 n_ctx: int = 4096, threads: int = 0, log_path: Path | None = None) -> None:
        if not models:
            raise ServeError("LlamaServer needs at least one model")
        self.models = list(models)
        self.host = host
        self.port = port or free_port(host)
        self.n_ctx = n_ctx
        self.threads = threads or (os.cpu_count() or 1)
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._log: IO[bytes] | None = None

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible endpoint (what ``TIER3_STUDENT_BASE_URL`` is set to)."""
        return f"http://{self.host}:{self.port}/v1"

    @property
    def aliases(self) -> list[str]:
        return [m.alias for m in self.models]

    def config(self) -> dict[str, Any]:
        """llama-cpp-python's ``--config_file`` document: server settings and one entry per model."""
        return {
            "host": self.host, "port": self.port,
            "interrupt_requests": False,  # concurrent router calls must all be answered, not cut off
            "models": [{"model": str(m.gguf), "model_alias": m.alias, "n_ctx": self.n_ctx,
                        "n_threads": self.threads, "n_threads_batch": self.threads, "verbose": False}
                       for m in self.models],
        }

    def start(self, timeout_s: float = 180.0) -> LlamaServer:
        if not server_installed():
            raise ServeError("llama-cpp-python's server is not installed: pip install 'tier3[serve]' "
                             "(builds llama.cpp from source once, ~10 min on 2 cores; pip caches the wheel)")
        for m in self.models:
            if not m.gguf.is_file():
                raise ServeError(f"{m.alias}: GGUF file {m.gguf} does not exist")
        self._tmp = tempfile.TemporaryDirectory(prefix="tier3-serve-")
        cfg_path = Path(self._tmp.name) / "llama_server.json"
        cfg_path.write_text(json.dumps(self.config(), indent=2))
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "ab")  # closed in stop()
        else:
            self._log = open(Path(self._tmp.name) / "server.log", "w+b")
        env = {k: v for k, v in os.environ.items() if k in _ENV_KEEP}
        self.proc = subprocess.Popen([sys.executable, "-m", LAUNCHER_MODULE, "--config_file", str(cfg_path)],
                                     stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        last = "no answer yet"
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise ServeError(f"llama_cpp.server exited with code {self.proc.returncode} before serving: "
                                 f"{self.log_tail()}")
            try:
                resp = httpx.get(f"{self.base_url}/models", timeout=2.0)
                if resp.status_code == 200:
                    ids = {d.get("id") for d in resp.json().get("data", [])}
                    if set(self.aliases) <= ids:
                        return
                    last = f"it lists {sorted(map(str, ids))}, not {self.aliases}"
                else:
                    last = f"HTTP {resp.status_code}"
            except (httpx.HTTPError, ValueError) as exc:
                last = f"{type(exc).__name__}"
            time.sleep(0.2)
        raise ServeError(f"llama_cpp.server did not serve {self.aliases} at {self.base_url} within "
                         f"{timeout_s:.0f} s ({last}): {self.log_tail()}")

    def log_tail(self, n: int = 2000) -> str:
        if self._log is None:
            return ""
        with contextlib.suppress(OSError, ValueError):
            self._log.flush()
            with open(self._log.name, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - n))
                return fh.read().decode(errors="replace").strip()
        return ""

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the server (its own process group: uvicorn and nothing else), then SIGKILL after ``grace_s``."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> LlamaServer:
        return self if self.running() else self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def server_for(settings: CloseLoopSettings, models: Sequence[ServedModel], *, port: int | None = None,
               log_path: Path | None = None) -> LlamaServer:
    return LlamaServer(models, host=settings.tier3_serve_host,
                       port=settings.tier3_serve_port if port is None else port, n_ctx=settings.tier3_serve_n_ctx,
                       threads=settings.tier3_serve_threads, log_path=log_path)


class ServerPool:
    """``replicas`` servers of the same models on consecutive ports (``port``, ``port + 1``, ...; every port free
    when ``port`` is 0), the CPU threads shared out among them: each llama-cpp-python server answers one request
    at a time, so concurrent router calls need several (the router spreads them, least busy first)."""

    def __init__(self, models: Sequence[ServedModel], *, replicas: int = 1, host: str = "127.0.0.1",
                 port: int = 0, n_ctx: int = 4096, threads: int = 0, log_path: Path | None = None) -> None:
        if replicas < 1:
            raise ServeError("a server pool needs at least one replica")
        total = threads or (os.cpu_count() or 1)
        per = max(1, total // replicas)

        def log_of(i: int) -> Path | None:  # one log each: <stem>-<i><suffix> when there are several
            if log_path is None or replicas == 1:
                return log_path
            return log_path.with_name(f"{log_path.stem}-{i}{log_path.suffix}")

        self.servers = [LlamaServer(models, host=host, port=(port + i) if port else 0, n_ctx=n_ctx, threads=per,
                                    log_path=log_of(i)) for i in range(replicas)]

    @property
    def models(self) -> list[ServedModel]:
        return self.servers[0].models

    @property
    def base_urls(self) -> list[str]:
        return [s.base_url for s in self.servers]

    @property
    def base_url(self) -> str:
        """What ``TIER3_STUDENT_BASE_URL`` is set to: every server's URL, comma-separated."""
        return ",".join(self.base_urls)

    @property
    def port(self) -> int:
        return self.servers[0].port

    def start(self, timeout_s: float = 180.0) -> ServerPool:
        try:
            for s in self.servers:
                s.start(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def running(self) -> bool:
        return all(s.running() for s in self.servers)

    def log_tail(self, n: int = 2000) -> str:
        return "\n".join(s.log_tail(n) for s in self.servers if not s.running()) or self.servers[0].log_tail(n)

    def stop(self, grace_s: float = 10.0) -> None:
        for s in self.servers:
            s.stop(grace_s)

    def __enter__(self) -> ServerPool:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def pool_for(settings: CloseLoopSettings, models: Sequence[ServedModel], *, port: int | None = None,
             replicas: int | None = None, log_path: Path | None = None) -> ServerPool:
    return ServerPool(models, replicas=replicas or settings.tier3_serve_replicas, host=settings.tier3_serve_host,
                      port=settings.tier3_serve_port if port is None else port, n_ctx=settings.tier3_serve_n_ctx,
                      threads=settings.tier3_serve_threads, log_path=log_path)


# ------------------------------------------------------------------------------------------------ evaluation


def chat_generator(base_url: str, model: str, max_new_tokens: int, *, timeout_s: float = 300.0,
                   api_key: str = "tier3-local") -> Any:
    """An ``evaluate.Generate`` over an OpenAI-compatible chat endpoint: greedy (temperature 0), bounded length;
    the token count is the server's ``usage.completion_tokens``, the latency the wall time of the call."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout_s, max_retries=0)

    def gen(messages: list[dict[str, str]]) -> tuple[str, int, float]:
        t0 = time.perf_counter()
        resp = client.chat.completions.create(model=model, messages=messages,  # type: ignore[arg-type]
                                              max_tokens=max_new_tokens, temperature=0.0)
        latency_s = time.perf_counter() - t0
        text = (resp.choices[0].message.content or "") if resp.choices else ""
        n = resp.usage.completion_tokens if resp.usage is not None else 0
        return text, int(n), latency_s

    return gen


def run_export(settings: CloseLoopSettings, run_id: str) -> ServedModel:
    """The exported quantised GGUF of one run (from its ``exported`` event), to evaluate what ships."""
    from trainer.events import read_run_events

    for m in exported_models(settings, read_run_events(settings), candidates=True):
        if m.run_id == run_id:
            return m
    raise ServeError(f"run {run_id} has no exported {settings.tier3_gguf_quant} GGUF on this machine; run "
                     f"`tier3 export {run_id}` first")
