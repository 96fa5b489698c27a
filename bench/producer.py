"""Capture benchmark: caller-side publish() latency and delivered throughput, in one run, against

(a) a raw confluent-kafka produce loop (same reliability settings, same bytes),
(b) tier3's ``Capture.publish()``,
(c) the original system's pattern: ``queue.put`` + a worker thread appending JSONL to a file.

Prints one JSON object. Starts the local broker when none answers (as ``tier3 broker up``), unless
KAFKA_BOOTSTRAP_SERVERS names one. Goals (issue 10, relative: the raw client's own p99 is this machine's noise
floor): tier3 throughput >= 0.8 x raw, tier3 p99 <= 1.5 x raw p99, both from the same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import queue
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from confluent_kafka import Producer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's code, not an installed copy

from bench import cleanup
from schemas import Experience, encode, get_task
from schemas.runtime.preflight import kafka_metadata, load_settings, run_cli
from schemas.settings import RELIABLE_PRODUCER
from streams.client.capture import Capture, CaptureSettings
from streams.topics import ensure_topics
from tier3.devbroker import server as broker

TASK = get_task("widget_selector")


def experiences(n: int) -> list[Experience]:
    # realistic size: the full widget-selector system prompt (~2 KB) + a question + a JSON response
    return [Experience.model_validate({
        "experience_id": f"bench-{i:07d}", "task": "widget_selector", "created_at_ms": 1_764_000_000_000 + i,
        "messages": [{"role": "system", "content": TASK.system_prompt},
                     {"role": "user", "content": f"Which services had the most 5xx errors since the deploy #{i}?"}],
        "response": '{"widgets": ["error_rate", "incident_timeline", "deployment_frequency"], "time_range": "24h"}',
        "served_by": {"arm": "baseline", "model": "prod-model"}, "confidence": (i % 97) / 97,
        "reward": 1.0, "latency_ms": 350.0, "user_id": f"user-{i % 1000}",
    }) for i in range(n)]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def summary(lat_ns: list[int], n: int, wall_s: float) -> dict[str, float]:
    us = [v / 1000 for v in lat_ns]
    return {"p50_us": round(pct(us, 0.50), 2), "p99_us": round(pct(us, 0.99), 2),
            "throughput_per_s": round(n / wall_s, 1), "wall_s": round(wall_s, 3)}


def bench_raw(settings: CaptureSettings, exps: list[Experience]) -> dict[str, float]:
    p = Producer({**settings.client_config(), **RELIABLE_PRODUCER, "linger.ms": 5, "partitioner": "murmur2_random",
                  "queue.buffering.max.messages": 1_000_000})
    delivered = 0

    def cb(err: Any, _m: Any) -> None:
        nonlocal delivered
        if err is None:
            delivered += 1

    lat: list[int] = []
    t0 = time.perf_counter()
    for e in exps:
        a = time.perf_counter_ns()
        p.produce(settings.experiences_topic, value=encode(e), key=e.experience_id, on_delivery=cb)
        p.poll(0)
        lat.append(time.perf_counter_ns() - a)
    p.flush(120)
    wall = time.perf_counter() - t0
    assert delivered == len(exps), delivered
    return summary(lat, len(exps), wall)


def bench_tier3(settings: CaptureSettings, exps: list[Experience]) -> dict[str, float]:
    cap = Capture(settings)
    lat: list[int] = []
    t0 = time.perf_counter()
    for e in exps:
        a = time.perf_counter_ns()
        cap.publish(e)
        lat.append(time.perf_counter_ns() - a)
    cap.flush(120)
    wall = time.perf_counter() - t0
    st = cap.stats()
    assert st.delivered == len(exps), st
    out = summary(lat, len(exps), wall)
    out["dropped"] = st.dropped
    return out


def bench_original(exps: list[Experience]) -> dict[str, float]:
    """The seed's pattern: the RL loop puts a dict on a queue; a thread appends JSONL lines to a trace file."""
    q: queue.Queue[dict[str, Any] | None] = queue.Queue()
    path = Path(tempfile.mkdtemp()) / "traces.jsonl"

    def worker() -> None:
        with path.open("a") as fh:
            while (item := q.get()) is not None:
                fh.write(json.dumps(item) + "\n")
                fh.flush()

    th = threading.Thread(target=worker)
    th.start()
    dicts = [e.model_dump(mode="json") for e in exps]
    lat: list[int] = []
    t0 = time.perf_counter()
    for d in dicts:
        a = time.perf_counter_ns()
        q.put(d)
        lat.append(time.perf_counter_ns() - a)
    q.put(None)
    th.join()
    wall = time.perf_counter() - t0
    return summary(lat, len(exps), wall) | {"durable": False}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-n", type=int, default=200_000)
    args = ap.parse_args()
    broker.ensure_running()  # KAFKA_BOOTSTRAP_SERVERS's cluster, else the local broker (left running)
    base = load_settings(CaptureSettings)
    kafka_metadata(base)  # no broker: one line saying where it looked and what to do, exit 2 (not a flood)
    exps = experiences(args.n)
    results: dict[str, Any] = {"n": args.n, "message_bytes": len(encode(exps[0])), "python": platform.python_version()}
    # warm-up (JIT of the broker, connections, page cache), discarded; then each client on a fresh topic
    with cleanup.dropped_at_exit(base.client_config()):
        for name in ("warmup", "raw", "tier3"):
            prefix = cleanup.track(f"bench{uuid.uuid4().hex[:6]}.")
            settings = CaptureSettings(**{**base.model_dump(), "tier3_topic_prefix": prefix,
                                          "tier3_partitions": 6, "tier3_capture_buffer_messages": 1_000_000})
            ensure_topics(settings)
            if name == "warmup":
                bench_raw(settings, exps[: min(len(exps), 50_000)])
                continue
            results[name] = bench_raw(settings, exps) if name == "raw" else bench_tier3(settings, exps)
    results["original_queue_jsonl"] = bench_original(exps)
    ratio = results["tier3"]["throughput_per_s"] / results["raw"]["throughput_per_s"]
    results["tier3_vs_raw_throughput"] = round(ratio, 3)
    results["tier3_vs_raw_p99"] = round(results["tier3"]["p99_us"] / results["raw"]["p99_us"], 3)
    results["goals"] = {"throughput_ge_0.8_raw": results["tier3_vs_raw_throughput"] >= 0.8,
                        "p99_le_1.5_raw": results["tier3_vs_raw_p99"] <= 1.5}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    run_cli(main)
