"""Benchmark of ``tier3 replay`` against a raw consumer loop on the same topic, in the same run. Prints JSON.

- **raw**: a confluent-kafka consumer with the replay's own settings (``assign()`` from the low watermark,
  ``read_committed``), ``poll()`` until every record of the slice was seen, touching each value: the most any
  replay built on this client can do; **raw_json** the same loop plus ``orjson.loads`` of each value (the least
  a reader of JSON records does);
- **replay**: :func:`trainer.replay.replay` in-process (what ``tier3 replay`` runs after its imports): read the
  slice, decode and validate every trace, project the dataset, write it and its sha256;
- **cli**: ``tier3 replay`` as a subprocess, wall time including the interpreter start and its imports.

The sha256 of the replayed dataset is checked against :func:`trainer.dataset.build_dataset` over the same
traces in memory (``sha256_exact``). The two measured phases alternate (``--rounds``); the ratio is computed per
round, so a noisy machine shifts both sides together.

Usage: ``.venv/bin/python bench/replay_bench.py [--traces 20000] [--rounds 2]`` (starts the local broker if none
answers; KAFKA_BOOTSTRAP_SERVERS points elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import Consumer, Producer, TopicPartition

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import cleanup  # noqa: E402
from schemas import encode  # noqa: E402
from schemas.settings import RELIABLE_CONSUMER, RELIABLE_PRODUCER  # noqa: E402
from streams import broker  # noqa: E402
from streams.topics import ensure_topics  # noqa: E402
from trainer.dataset import build_dataset  # noqa: E402
from trainer.replay import ranges_from_beginning, replay  # noqa: E402
from trainer.settings import TrainerSettings  # noqa: E402
from trainer.sft_config import SFTConfig  # noqa: E402
from trainer.synthetic import synthetic_traces  # noqa: E402


def ensure_broker() -> None:
    if not os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        bs = broker.BrokerSettings()
        if broker.list_topics(bs.bootstrap) is None:
            broker.up(bs)
        os.environ["KAFKA_BOOTSTRAP_SERVERS"] = bs.bootstrap


def raw_read(settings: TrainerSettings, topic: str, n: int, parse: bool = False) -> float:
    """Seconds for a plain poll() loop to read all ``n`` records of ``topic`` from the beginning."""
    c = Consumer({**settings.client_config(), **RELIABLE_CONSUMER, "group.id": f"bench-raw-{uuid.uuid4().hex}"})
    try:
        parts = sorted(c.list_topics(topic, timeout=30).topics[topic].partitions)
        t0 = time.perf_counter()
        c.assign([TopicPartition(topic, p, 0) for p in parts])
        seen = size = 0
        while seen < n:
            msg = c.poll(1.0)
            if msg is None or msg.error() is not None:
                continue
            value = msg.value() or b""
            size += len(orjson.loads(value)) if parse else len(value)
            seen += 1
        return time.perf_counter() - t0
    finally:
        c.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--traces", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--partitions", type=int, default=6)
    args = ap.parse_args()
    ensure_broker()

    settings = TrainerSettings(tier3_topic_prefix=cleanup.track(f"bench{uuid.uuid4().hex[:8]}."),
                               tier3_partitions=args.partitions)
    with cleanup.dropped_at_exit(settings.client_config()):
        run(settings, args)


def run(settings: TrainerSettings, args: argparse.Namespace) -> None:
    ensure_topics(settings)
    topic = settings.traces_topic
    traces = synthetic_traces(args.traces, topic=topic, partitions=args.partitions, id_prefix="rb")
    p = Producer({**settings.client_config(), **RELIABLE_PRODUCER, "linger.ms": 5})
    for t in traces:
        assert t.source is not None
        while True:
            try:
                p.produce(topic, key=t.experience_id.encode(), value=encode(t), partition=t.source.partition)
                break
            except BufferError:
                p.poll(0.05)
        p.poll(0)
    assert p.flush(60) == 0
    value_bytes = len(encode(traces[0]))
    # the traces were written to the partition of their (synthetic) source, in order: the offsets match
    cfg = SFTConfig()
    ranges = ranges_from_beginning(settings, topic)

    result: dict[str, Any] = {"bench": "replay", "traces": args.traces, "partitions": args.partitions,
                              "trace_bytes": value_bytes,
                              "machine": {"cpus": os.cpu_count(), "load_avg_1m_at_start": round(os.getloadavg()[0], 2)},
                              "rounds": []}
    with tempfile.TemporaryDirectory(prefix="tier3-replay-bench-") as tmp:
        expected = build_dataset(traces, cfg, Path(tmp) / "expected").sha256
        shas: set[str] = set()
        for r in range(args.rounds):
            raw_s = raw_read(settings, topic, args.traces)
            raw_json_s = raw_read(settings, topic, args.traces, parse=True)
            t0 = time.perf_counter()
            res = replay(settings, cfg, ranges, Path(tmp) / f"replay-{r}")
            replay_s = time.perf_counter() - t0
            assert res.n_messages == args.traces, res.n_messages
            shas.add(res.dataset.sha256)
            result["rounds"].append({
                "raw_msgs_per_s": round(args.traces / raw_s), "raw_json_msgs_per_s": round(args.traces / raw_json_s),
                "replay_traces_per_s": round(args.traces / replay_s),
                "replay_vs_raw": round(raw_s / replay_s, 3), "replay_vs_raw_json": round(raw_json_s / replay_s, 3)})
        # `python -m tier3` of this checkout (an installed `tier3` script may be another checkout's, or stale)
        env = {**os.environ, **settings.as_env(), "TIER3_DATA_DIR": tmp,
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        t0 = time.perf_counter()
        cli = subprocess.run([sys.executable, "-m", "tier3", "replay", "--out", f"{tmp}/cli"],
                             env=env, capture_output=True, text=True, check=True)
        cli_s = time.perf_counter() - t0
        cli_sha = json.loads(cli.stdout)["sha256"]
        raw_s = raw_read(settings, topic, args.traces)
    ratios = [x["replay_vs_raw"] for x in result["rounds"]]
    result["replay_vs_raw_median"] = round(statistics.median(ratios), 3)
    result["replay_vs_raw_json_median"] = round(statistics.median(x["replay_vs_raw_json"] for x in result["rounds"]), 3)
    result["cli"] = {"wall_s": round(cli_s, 2), "traces_per_s": round(args.traces / cli_s),
                     "raw_msgs_per_s_after": round(args.traces / raw_s), "cli_vs_raw": round(raw_s / cli_s, 3)}
    result["sha256_exact"] = shas == {expected} and cli_sha == expected
    result["goal"] = {"replay_vs_raw": 0.7}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
