"""`tier3 broker up|down|status` on a private broker (its own ports and folder), so the session broker is
left alone."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tier3.devbroker import server as broker

pytestmark = pytest.mark.chaos


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tier3", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_up_twice_down_and_status(tmp_path: Path) -> None:
    env = {**os.environ, "TIER3_BROKER_PORT": "19392", "TIER3_BROKER_CONTROLLER_PORT": "19393",
           "TIER3_BROKER_DIR": str(tmp_path / "b"), "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:19392",
           "TIER3_BROKER_START_TIMEOUT_S": "600"}  # a loaded machine took 4 min to start a second broker
    st = _cli(["broker", "status"], env)
    assert st.returncode == 1 and "no broker answers at 127.0.0.1:19392" in st.stdout
    try:
        first = _cli(["broker", "up"], env)
        assert first.returncode == 0, first.stdout + first.stderr
        pid = (tmp_path / "b" / "broker.pid").read_text()
        second = _cli(["broker", "up"], env)  # idempotent: the same process, no second broker
        assert second.returncode == 0, second.stdout + second.stderr
        assert (tmp_path / "b" / "broker.pid").read_text() == pid
        assert f"pid {pid}" in second.stdout
        st = _cli(["broker", "status"], env)
        assert st.returncode == 0 and "version: 4." in st.stdout
        topics = _cli(["topics", "create"], {**env, "TIER3_TOPIC_PREFIX": "brokertest."})
        assert topics.returncode == 0 and "brokertest.enriched-traces" in topics.stdout
        again = _cli(["topics", "create"], {**env, "TIER3_TOPIC_PREFIX": "brokertest."})
        assert "exists" in again.stdout and "created" not in again.stdout
        # the broker refuses to create a topic a client merely asks for (librdkafka's producer asks by
        # default): only `tier3 topics create` makes topics, with our partition counts
        from confluent_kafka import Producer

        errors: list[object] = []
        producer = Producer({"bootstrap.servers": "127.0.0.1:19392", "message.timeout.ms": 5000})
        producer.produce("brokertest.asked-for", b"x", on_delivery=lambda err, _m: errors.append(err))
        producer.flush(30)
        assert errors and errors[0] is not None
        assert "brokertest.asked-for" not in (broker.list_topics("127.0.0.1:19392") or [])
        # and a command started before the topics exist says what to run instead of creating them
        early = _cli(["publish", str(Path(__file__).parent.parent / "examples" / "widget_selector" /
                                     "experiences.jsonl")], {**env, "TIER3_TOPIC_PREFIX": "early."})
        assert early.returncode == 2 and "tier3 topics create" in early.stderr, early.stderr
        assert not [t for t in broker.list_topics("127.0.0.1:19392") or [] if t.startswith("early.")]
    finally:
        down = _cli(["broker", "down"], env)
    assert "broker stopped" in down.stdout
    assert not broker._pid_alive(int(pid))
    st = _cli(["broker", "status"], env)
    assert st.returncode == 1
    # down with nothing running says so and does not touch other processes
    assert "no broker started by tier3" in _cli(["broker", "down"], env).stdout


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        s = broker.BrokerSettings(tier3_broker_port=port, tier3_broker_controller_port=port + 1 if port < 65535
                                  else port - 1, tier3_broker_dir=tmp_path / "b")
        with pytest.raises(broker.BrokerError, match="in use"):
            broker.up(s)


def test_missing_java_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # neither java nor mvn
    s = broker.BrokerSettings(tier3_broker_port=19394, tier3_broker_controller_port=19395,
                              tier3_broker_dir=tmp_path / "b", tier3_cache_dir=tmp_path / "cache")
    with pytest.raises(broker.BrokerError, match="was not found on PATH"):
        broker.up(s)
