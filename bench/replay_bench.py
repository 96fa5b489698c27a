"""Benchmark of ``tier3 replay`` against a raw consumer loop on the same topic, in the same run. Prints JSON.

- **raw**: a confluent-kafka consumer with the replay's own settings (``assign()`` from the low watermark,
  ``read_committed``), ``poll()`` until every record of the slice was seen, touching each value: the most any
  replay built on this client can do (the machine's limit); **raw_json** the same loop plus ``orjson.loads`` of
  each value: the least a reader of JSON records does, and the anchor of the goal (replay >= 0.7x raw_json);
- **replay**: :func:`trainer.replay.replay` in-process (what ``tier3 replay`` runs after its imports): read the
  slice, decode and validate every trace, project the dataset, write it and its sha256; and its two phases
  apart: **read** (:func:`trainer.projection.read_ranges`: read, decode and validate every trace) and **project**
  (:func:`trainer.projection.project_dataset`: the dataset's lines, split, files, fsync, sha256);
- **cli**: ``tier3 replay`` as a subprocess, wall time including the interpreter start and its imports.

Each phase has its wall rate and its CPU time per trace in the measuring thread (``*_cpu_us``: the Python side;
steadier than wall time on a shared machine, and what the code changes). The sha256 of the replayed dataset is
checked against :func:`trainer.dataset.build_dataset` over the same traces in memory (``sha256_exact``) and
printed (``dataset_sha256``: the synthetic traces are deterministic, so it is the same before and after a change
of the replay's code). The measured phases alternate (``--rounds``); ratios are computed per round, so a noisy
machine shifts both sides together.

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
from streams.topics import ensure_topics  # noqa: E402
from tests.synthetic import synthetic_traces  # noqa: E402
from tier3.devbroker import server as broker  # noqa: E402
from trainer.dataset import build_dataset  # noqa: E402
from trainer.projection import project_dataset, read_ranges  # noqa: E402
from trainer.replay import ranges_from_beginning, replay  # noqa: E402
from trainer.settings import TrainerSettings  # noqa: E402
from trainer.sft_config import SFTConfig  # noqa: E402


class Timed:
    """Wall seconds and CPU seconds of this thread for a block."""

    def __enter__(self) -> Timed:
        self.wall, self.cpu = time.perf_counter(), time.thread_time()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.thread_time() - self.cpu


def raw_read(settings: TrainerSettings, topic: str, n: int, parse: bool = False) -> float:
    """Seconds for a plain poll() loop to read all ``n`` records of ``topic`` from the beginning."""
    return raw_read_timed(settings, topic, n, parse)[0]


def raw_read_timed(settings: TrainerSettings, topic: str, n: int, parse: bool = False) -> tuple[float, float]:
    """:func:`raw_read`'s wall seconds and this thread's CPU seconds."""
    c = Consumer({**settings.client_config(), **RELIABLE_CONSUMER, "group.id": f"bench-raw-{uuid.uuid4().hex}"})
    try:
        parts = sorted(c.list_topics(topic, timeout=30).topics[topic].partitions)
        t0, c0 = time.perf_counter(), time.thread_time()
        c.assign([TopicPartition(topic, p, 0) for p in parts])
        seen = size = 0
        while seen < n:
            msg = c.poll(1.0)
            if msg is None or msg.error() is not None:
                continue
            value = msg.value() or b""
            size += len(orjson.loads(value)) if parse else len(value)
            seen += 1
        return time.perf_counter() - t0, time.thread_time() - c0
    finally:
        c.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--traces", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--partitions", type=int, default=6)
    args = ap.parse_args()
    broker.ensure_running()  # KAFKA_BOOTSTRAP_SERVERS's cluster, else the local broker (left running)

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
        n = args.traces
        for r in range(args.rounds):
            raw_s, raw_cpu = raw_read_timed(settings, topic, n)
            raw_json_s, raw_json_cpu = raw_read_timed(settings, topic, n, parse=True)
            with Timed() as read_t:
                read = read_ranges(settings, topic, ranges)
            with Timed() as project_t:
                built = project_dataset(read.records, cfg, Path(tmp) / f"phases-{r}")
            del read
            with Timed() as replay_t:
                res = replay(settings, cfg, ranges, Path(tmp) / f"replay-{r}")
            assert res.n_messages == n, res.n_messages
            shas.update((res.dataset.sha256, built.sha256))
            result["rounds"].append({
                "raw_msgs_per_s": round(n / raw_s), "raw_json_msgs_per_s": round(n / raw_json_s),
                "replay_traces_per_s": round(n / replay_t.wall),
                "replay_vs_raw": round(raw_s / replay_t.wall, 3),
                "replay_vs_raw_json": round(raw_json_s / replay_t.wall, 3),
                "read_traces_per_s": round(n / read_t.wall), "read_vs_raw_json": round(raw_json_s / read_t.wall, 3),
                "project_traces_per_s": round(n / project_t.wall),
                "cpu_us_per_trace": {"raw": round(1e6 * raw_cpu / n, 2), "raw_json": round(1e6 * raw_json_cpu / n, 2),
                                     "read": round(1e6 * read_t.cpu / n, 2),
                                     "project": round(1e6 * project_t.cpu / n, 2),
                                     "replay": round(1e6 * replay_t.cpu / n, 2)}})
        # `python -m tier3` of this checkout (an installed `tier3` script may be another checkout's, or stale)
        env = {**os.environ, **settings.as_env(), "TIER3_DATA_DIR": tmp,
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        t0 = time.perf_counter()
        cli = subprocess.run([sys.executable, "-m", "tier3", "replay", "--out", f"{tmp}/cli"],
                             env=env, capture_output=True, text=True, check=True)
        cli_s = time.perf_counter() - t0
        cli_sha = json.loads(cli.stdout)["sha256"]
        raw_s = raw_read(settings, topic, n)
    rounds = result["rounds"]
    for key in ("replay_vs_raw", "replay_vs_raw_json", "read_vs_raw_json", "replay_traces_per_s",
                "raw_json_msgs_per_s", "raw_msgs_per_s"):
        result[f"{key}_median"] = round(statistics.median(x[key] for x in rounds), 3)
    result["cli"] = {"wall_s": round(cli_s, 2), "traces_per_s": round(n / cli_s),
                     "raw_msgs_per_s_after": round(n / raw_s), "cli_vs_raw": round(raw_s / cli_s, 3)}
    result["dataset_sha256"] = expected
    result["sha256_exact"] = shas == {expected} and cli_sha == expected
    result["machine"]["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    result["goal"] = {"replay_vs_raw_json": 0.7}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
