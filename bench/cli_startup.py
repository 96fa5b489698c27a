"""Start-up time of the ``tier3`` command line. Prints JSON.

- ``tier3 --help``, ``tier3 replay --help``: wall time of the whole process (interpreter start, imports, help);
- ``tier3 replay`` up to its first broker contact: the time from starting the process to the first TCP connection
  accepted by a listening socket that stands in for the broker (KAFKA_BOOTSTRAP_SERVERS points at it; the process
  is killed then). Everything ``tier3 replay`` does before it talks to Kafka is in it: the interpreter, its
  imports, the settings.

Each is run ``--runs`` times, one after the other; best and median are reported (the best is the machine's
figure, the median shows the noise of a shared machine). ``python -m tier3`` of this checkout runs (an installed
``tier3`` script may be another checkout's).

Usage: ``.venv/bin/python bench/cli_startup.py [--runs 7]``
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            **extra}


def wall(args: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tier3", *args], env=_env(), stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=True, cwd=ROOT)
    return time.perf_counter() - t0


def first_contact(args: list[str], timeout_s: float = 30.0) -> float:
    """Seconds from starting ``tier3 ARGS`` to its first connection to the (stand-in) broker."""
    with socket.socket() as srv, tempfile.TemporaryDirectory(prefix="tier3-startup-") as tmp:
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)
        srv.settimeout(timeout_s)
        port = srv.getsockname()[1]
        env = _env(KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{port}", TIER3_DATA_DIR=tmp, TIER3_KAFKA_TIMEOUT_S="20")
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "tier3", *args], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, cwd=ROOT)
        try:
            conn, _ = srv.accept()
            elapsed = time.perf_counter() - t0
            conn.close()
        finally:
            proc.kill()
            proc.wait()
        return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    cases: dict[str, Any] = {
        "tier3 --help": lambda: wall(["--help"]),
        "tier3 replay --help": lambda: wall(["replay", "--help"]),
        "tier3 replay (to first broker contact)": lambda: first_contact(["replay", "--out", "replay-out"]),
    }
    out: dict[str, Any] = {"bench": "cli_startup", "python": sys.version.split()[0], "runs": args.runs,
                           "machine": {"cpus": os.cpu_count(), "load_avg_1m_at_start": round(os.getloadavg()[0], 2)},
                           "seconds": {}}
    for name, fn in cases.items():
        fn()  # warm the file cache (not counted)
        xs = [fn() for _ in range(args.runs)]
        out["seconds"][name] = {"best": round(min(xs), 3), "median": round(statistics.median(xs), 3)}
    out["machine"]["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    out["goal_s"] = 0.3
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
