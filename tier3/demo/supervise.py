"""The demo's processes: each command it starts (``python -m tier3 ARGS``) in its own process group, the
signals that stop the demo, and stopping everything it started, together."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tier3.demo.display import say
from tier3.demo.monitor import Monitor
from tier3.demo.options import REPO_ROOT, DemoError


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


DEFAULT_STUDENT = "smollm2-135m"
#: model names `tier3 models pull` knows (``tier3 models list``); anything else is a local folder or a hub id
NAMED_STUDENTS = ("smollm2-135m", "tiny")


def student_name() -> str:
    return os.environ.get("TIER3_BASE_MODEL", "").strip() or DEFAULT_STUDENT


def build_student(log_path: Path, timeout_s: float = 1200.0) -> str:
    """The student's base model as the trainer will load it: a named model is pulled once into the model cache
    (``tier3 models pull NAME``, which prints its folder); a folder or a hub id is passed on as it is."""
    name = student_name()
    if name not in NAMED_STUDENTS:
        return name
    with log_path.open("ab") as log:
        try:
            proc = subprocess.run([sys.executable, "-m", "tier3", "models", "pull", name],
                                  stdout=subprocess.PIPE, stderr=log, timeout=timeout_s, check=False,
                                  cwd=str(REPO_ROOT))
        except subprocess.TimeoutExpired:
            raise DemoError(f"`tier3 models pull {name}` took over {timeout_s:.0f} s; see {log_path}") from None
    lines = proc.stdout.decode().strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise DemoError(f"`tier3 models pull {name}` failed (exit {proc.returncode}); see {log_path}")
    return lines[-1]


@dataclass
class Child:
    """A process the demo started, in its own process group (so Ctrl-C reaches the demo first, which then stops
    its children in order)."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    exited_mono: float | None = None

    def alive(self) -> bool:
        if self.proc.poll() is None:
            return True
        if self.exited_mono is None:
            self.exited_mono = time.monotonic()
        return False

    def exited_for_s(self) -> float:
        """Seconds since the demo first saw this process gone (0 while it runs)."""
        return 0.0 if self.alive() or self.exited_mono is None else time.monotonic() - self.exited_mono

    def terminate(self) -> None:
        """SIGTERM the group without waiting (``stop`` waits)."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM the group (both the worker and the trainer shut down cleanly on it), SIGKILL after timeout."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        # anything left in the group (a helper the child forked) goes too
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.returncode

    def log_tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def _die_with_parent() -> Any:
    """A ``preexec_fn`` that makes the child get SIGTERM when the demo dies, even by SIGKILL (Linux prctl
    PR_SET_PDEATHSIG); None elsewhere. libc is loaded here, in the parent, so the child only makes the call."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig, sigterm = 1, int(signal.SIGTERM)

    def preexec() -> None:
        prctl(pr_set_pdeathsig, sigterm)

    return preexec


def start_child(name: str, args: list[str], env: dict[str, str], log_dir: Path, *, keep_running: bool = False
                ) -> Child:
    """``python -m tier3 ARGS`` in its own session (Ctrl-C reaches the demo, which stops it in order); unless
    it is to outlive the demo (``--keep-running``), it also stops if the demo is killed outright."""
    log_path = log_dir / f"{name}.log"
    log = log_path.open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "tier3", *args], env=env, stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                            cwd=str(REPO_ROOT), preexec_fn=None if keep_running else _die_with_parent())
    log.close()  # the child holds its own descriptor
    return Child(name, proc, log_path)


@dataclass
class DemoState:
    """What the demo started (and must stop), and the steps it took itself."""

    children: list[Child] = field(default_factory=list)
    closers: dict[str, Child] = field(default_factory=dict)  # run_id -> `tier3 close-loop` the demo started
    oneshots: list[Child] = field(default_factory=list)  # `tier3 train-now` requests
    forced: str | None = None  # the run `--promote` promoted by hand
    started_broker: bool = False
    broker_settings: Any = None
    monitor: Monitor | None = None
    closer_env: dict[str, str] | None = None  # the trainer's environment, when `tier3 close-loop` is here
    train_now_env: dict[str, str] | None = None  # the same, when `tier3 train-now` is here
    train_now_requested: set[int] = field(default_factory=set)  # traces' end offsets a train-now was asked at


# Ctrl-C; a CI runner stopping the job; the terminal closing. SIGINT is here too, not left to Python's default:
# a process started with SIGINT ignored (any command run in the background of a non-interactive shell, as CI
# runners and `cmd &` do) inherits SIG_IGN, and Python then never installs its KeyboardInterrupt handler, so
# Ctrl-C (or `kill -INT`) was silently ignored and the demo ran to its end.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def stop_signals_as_interrupt() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP stop the demo: everything it started is stopped, whatever the demo inherited."""

    def handler(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    old = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def stop_everything(state: DemoState, keep_running: bool) -> None:
    if state.monitor is not None:
        state.monitor.stop_event.set()
        state.monitor.join(10)
    if keep_running:
        return
    children = [*state.oneshots, *state.closers.values(), *reversed(state.children)]  # trainer before worker
    for child in children:  # all asked at once: a loaded machine must not wait out each child's grace in turn
        if child.alive():
            say(f"stopping {child.name} (pid {child.pid})")
            child.terminate()
    deadline = time.monotonic() + 30.0
    for child in children:
        child.stop(timeout_s=max(0.1, deadline - time.monotonic()))
    if state.started_broker:
        from tier3.devbroker import server as devbroker

        say("stopping the local broker the demo started")
        devbroker.down(state.broker_settings)
