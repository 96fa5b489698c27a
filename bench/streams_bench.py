"""Benchmark of the streams worker (`tier3 worker` as a real subprocess, on the real broker). Prints JSON.

1. **sampling path, instant teacher** (the recorded teacher, answers from memory): experiences/s one worker
   consumes from a backlog, and publish -> trace latency p50/p99 at a steady publish rate. In the same run, on
   the same backlog, two baselines and their ratios:
   - ``bare_faust``: a Faust agent with the worker's own Faust settings that only counts the messages
     (``bench/bare_faust.py``, ``stream.take``): Faust's ceiling on this machine -> ``worker_vs_bare_faust``;
   - ``raw``: a confluent-kafka loop doing the worker's work by hand: consume -> orjson decode -> BLAKE2b hash
     sample + confidence rule -> produce the trace (acks=all, idempotent, zstd, same partition) -> async
     commit -> ``worker_vs_raw``;
   and the scale-out figure: 3 workers in one group sharing the 6 partitions, aggregate rate / 1 worker's.
2. **concurrency efficiency**: a teacher with fixed latency L (the fake teacher server) and C calls in flight;
   measured traces/s / (C / L). Compared in the same run with the original system's pattern: one thread taking
   items off a queue, calling the teacher, appending a JSONL line.

Usage: ``.venv/bin/python bench/streams_bench.py [--backlog 20000] [--latency-ms 200] [--concurrency 32]``
(starts the local broker if none answers; KAFKA_BOOTSTRAP_SERVERS points elsewhere).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson
from confluent_kafka import Consumer, Producer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# the worker subprocesses (`tier3 worker`) run this checkout's code, not whichever copy the venv has installed
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])

from bench import cleanup  # noqa: E402
from schemas import EnrichedTrace, Experience, decode, encode, get_task  # noqa: E402
from schemas.settings import RELIABLE_PRODUCER  # noqa: E402
from streams.app import changelog_spec  # noqa: E402
from streams.sampling import sample_reason  # noqa: E402
from streams.settings import StreamsSettings  # noqa: E402
from streams.teachers import prompt_hash  # noqa: E402
from streams.topics import ensure_topics  # noqa: E402
from tests.conftest import settings_env  # noqa: E402
from tests.fakes.teacher_server import answer_text, question_of  # noqa: E402
from tests.kafka_utils import consume_values  # noqa: E402
from tests.streams.helpers import WorkerProcess, free_port, make_experience  # noqa: E402
from tier3.devbroker import server as broker  # noqa: E402

TASK = get_task("widget_selector")


def confidence(i: int) -> float:
    # uniform in [0, 1): about 20 % above 0.8, so about 32 % are sampled with the 15 % hash rule
    return (i * 7919 % 1000) / 1000


def recording_for(exps: list[Experience], path: Path) -> None:
    with path.open("wb") as f:
        for e in exps:
            msgs = TASK.messages_for_model([m.model_dump() for m in e.messages])
            f.write(orjson.dumps({"prompt_hash": prompt_hash(msgs), "model": "recorded-bench",
                                  "text": answer_text(question_of(msgs), "ok")}) + b"\n")


def produce(settings: StreamsSettings, exps: list[Experience], rate_per_s: float = 0.0,
            stamp_now: bool = False) -> float:
    """Publish; with ``rate_per_s`` paced, with ``stamp_now`` each experience's created_at_ms is its send time."""
    p = Producer({**settings.client_config(), **RELIABLE_PRODUCER, "linger.ms": 5})
    # warm up (connection, metadata, producer id) as a long-running application's producer would be: otherwise
    # the first messages' "latency" is this fresh producer's start-up. The warm-up experience is not sampled.
    warm = next(e for i in range(100) if (e := make_experience(i, 0.0, prefix="warmup")) and
                sample_reason(e.experience_id, e.confidence) is None)
    p.produce(settings.experiences_topic, key=warm.experience_id.encode(), value=encode(warm))
    p.flush(30)
    t0 = time.perf_counter()
    for i, e in enumerate(exps):
        if rate_per_s:
            wait = t0 + i / rate_per_s - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
        if stamp_now:
            e = e.model_copy(update={"created_at_ms": int(time.time() * 1000)})
        while True:
            try:
                p.produce(settings.experiences_topic, key=e.experience_id.encode(), value=encode(e))
                break
            except BufferError:
                p.poll(0.01)
        p.poll(0)
    p.flush(60)
    return time.perf_counter() - t0


def new_settings(data_dir: Path, **kw: Any) -> StreamsSettings:
    s = StreamsSettings(tier3_topic_prefix=cleanup.track(f"bench{uuid.uuid4().hex[:8]}."), tier3_partitions=6,
                        tier3_data_dir=data_dir, tier3_session_timeout_s=6.0, **kw)
    ensure_topics(s, [*s.topic_specs(), changelog_spec(s)])
    return s


def wait_counts(w: WorkerProcess, key: str, n: int, timeout_s: float) -> list[tuple[float, int]]:
    """Poll /status every 200 ms until counts[key] >= n; return the (time, count) samples."""
    samples: list[tuple[float, int]] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            c = int(w.status()["counts"][key])
            samples.append((time.monotonic(), c))
            if c >= n:
                return samples
        except (httpx.HTTPError, KeyError):
            pass
        time.sleep(0.2)  # /status is not free: polling it often would slow the worker it measures
    raise RuntimeError(f"{key} did not reach {n}: {samples[-1:]}\n{w.log_tail()}")


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) used by process ``pid`` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def backlog_run(w: WorkerProcess, n: int, profile: Path | None = None) -> dict[str, Any]:
    """One worker drains a backlog of ``n``: experiences/s, and the worker's CPU time per experience (steadier
    than wall time on a shared machine: it does not count waiting for the CPU). With ``profile``, py-spy samples
    the worker while it drains (a flame graph SVG there; the figures of that run carry py-spy's overhead)."""
    w.wait_for(lambda st: bool(st["lag"]["experiences"]), 120)  # started, partitions assigned
    spy = None
    if profile is not None:
        exe = Path(sys.executable).with_name("py-spy")
        spy = subprocess.Popen([str(exe if exe.exists() else "py-spy"), "record", "--pid", str(w.proc.pid),
                                "--output", str(profile), "--format", "flamegraph", "--rate", "250",
                                "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    c0 = cpu_s(w.proc.pid)
    try:
        samples = wait_counts(w, "consumed", n, 600)
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes the flame graph and exits
            spy.wait(60)
    rate = consume_rate(samples, n)
    return {"experiences_per_s": round(rate), "cpu_us_per_experience": round((cpu_s(w.proc.pid) - c0) / n * 1e6)}


def consume_rate(samples: list[tuple[float, int]], n: int) -> float:
    """Messages/s from (time, consumed) polls: from the last poll that saw nothing consumed to the first that saw
    all ``n`` (conservative: up to one poll interval more than the true time)."""
    zero = [t for t, c in samples if c == 0]
    return n / (samples[-1][0] - (zero[-1] if zero else samples[0][0]))


def bench_bare_faust(s: StreamsSettings, data_dir: Path, n: int, mode: str = "take") -> dict[str, Any]:
    """The bare agent (bench/bare_faust.py) on the same topic, in its own consumer group."""
    out = data_dir / f"bare-{mode}.json"
    env = {**settings_env(s), "TIER3_APP_ID": f"bare-{uuid.uuid4().hex[:6]}", "TIER3_WEB_PORT": str(free_port())}
    with (data_dir / f"bare-{mode}.log").open("ab") as log:
        proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "bare_faust.py"), "--n", str(n), "--out",
                                 str(out), "--mode", mode], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            proc.wait(600)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    r = orjson.loads(out.read_bytes())
    return {"mode": mode, "messages_per_s": round(r["n"] / r["seconds"])}


def bench_raw(s: StreamsSettings, n: int) -> dict[str, Any]:
    """The worker's work as a plain confluent-kafka loop (no guarantees beyond the client's)."""
    c = Consumer({**s.client_config(), "group.id": f"bench-raw-{uuid.uuid4().hex}", "enable.auto.commit": False,
                  "auto.offset.reset": "earliest"})
    p = Producer({**s.client_config(), **RELIABLE_PRODUCER, "linger.ms": 2})
    c.subscribe([s.experiences_topic])
    seen = produced = 0
    t_first: tuple[float, int] | None = None
    rate, threshold = s.tier3_sample_rate, s.tier3_confidence_threshold
    try:
        while seen < n:
            msgs = c.consume(500, 1.0)
            if not msgs:
                continue
            if t_first is None:
                t_first = (time.monotonic(), len(msgs))
            for m in msgs:
                if m.error() is not None:
                    continue
                seen += 1
                obj = orjson.loads(m.value() or b"")
                eid = obj["experience_id"]
                h = int.from_bytes(hashlib.blake2b(eid.encode(), digest_size=8).digest(), "big") / float(1 << 64)
                if obj["confidence"] > threshold or h < rate:
                    trace = orjson.dumps({"experience_id": eid, "experience": obj, "reasoning": "r",
                                          "answer": {"widgets": ["cpu_usage"], "time_range": "24h"}})
                    while True:
                        try:
                            p.produce(s.traces_topic, key=eid.encode(), value=trace, partition=m.partition())
                            break
                        except BufferError:
                            p.poll(0.01)
                    produced += 1
            p.poll(0)
            c.commit(asynchronous=True)
        p.flush(60)
        t_last = time.monotonic()
    finally:
        c.close()
    assert t_first is not None
    return {"messages_per_s": round((seen - t_first[1]) / (t_last - t_first[0])), "traces": produced}


def bench_not_sampled(data_dir: Path, exps: list[Experience], rec: Path) -> dict[str, Any]:
    """The worker on the same experiences with sampling off (rate 0, confidence threshold 1): every one is
    decoded, validated, counted by the router's table and acknowledged, none goes to the teacher."""
    s = new_settings(data_dir, tier3_sample_rate=0.0, tier3_confidence_threshold=1.0, tier3_teacher="recorded",
                     tier3_teacher_recorded_path=rec)
    produce(s, exps)
    w = WorkerProcess(settings_env(s), data_dir / "worker-not-sampled.log")
    try:
        return backlog_run(w, len(exps) + 1)  # + the producer's warm-up experience
    finally:
        w.stop()


def bench_scale_out(data_dir: Path, exps: list[Experience], rec: Path, workers: int) -> dict[str, Any]:
    """``workers`` worker processes in one group: started first (all partitions assigned), then the backlog."""
    s = new_settings(data_dir, tier3_teacher="recorded", tier3_teacher_recorded_path=rec)
    procs = [WorkerProcess({**settings_env(s), "TIER3_WORKER_ID": f"scale-{i}"}, data_dir / f"worker-scale-{i}.log")
             for i in range(workers)]
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:  # every worker has its share of the partitions
            try:
                assigned = [len(w.status()["lag"]["experiences"]) for w in procs]
            except (httpx.HTTPError, KeyError):
                assigned = [0]
            if sum(assigned) == s.tier3_partitions and min(assigned) > 0:
                break
            time.sleep(0.5)
        else:
            raise RuntimeError(f"partitions not shared by {workers} workers: {assigned}")
        th = threading.Thread(target=produce, args=(s, exps))
        th.start()
        samples: list[tuple[float, int]] = []
        while True:
            try:
                c = sum(int(w.status()["counts"]["consumed"]) for w in procs)
            except (httpx.HTTPError, KeyError):
                continue
            samples.append((time.monotonic(), c))
            if c >= len(exps) + 1:  # + the producer's warm-up experience
                break
            if time.monotonic() > deadline + 600:
                raise RuntimeError(f"scale-out stalled at {c}")
            time.sleep(0.2)
        th.join()
        per_worker = [int(w.status()["counts"]["consumed"]) for w in procs]
    finally:
        for w in procs:
            w.stop()
    return {"workers": workers, "experiences_per_s": round(consume_rate(samples, len(exps))),
            "consumed_per_worker": per_worker}


def bench_sampling_path(data_dir: Path, backlog: int, rate_per_s: float, latency_n: int,
                        scale_workers: int, profile: Path | None = None) -> dict[str, Any]:
    exps = [make_experience(i, confidence(i), prefix="bp") for i in range(backlog)]
    lat_exps = [make_experience(i, confidence(i), prefix="lat") for i in range(latency_n)]
    rec = data_dir / "recorded.jsonl"
    recording_for(exps + lat_exps, rec)
    s = new_settings(data_dir, tier3_teacher="recorded", tier3_teacher_recorded_path=rec)
    publish_s = produce(s, exps)
    sampled = sum(sample_reason(e.experience_id, e.confidence) is not None for e in exps)

    env = settings_env(s)
    w = WorkerProcess(env, data_dir / "worker-sampling.log")
    try:
        drained = backlog_run(w, backlog, profile)
        throughput = drained["experiences_per_s"]
        elapsed = backlog / throughput
        st = w.wait_for(lambda st: st["counts"]["enriched"] >= sampled, 120)
        # steady state before measuring latency: the count table has caught up on the backlog's traces too
        w.wait_for(lambda st: sum(n for win in [st["windows"]["current"], *st["windows"]["recent"]]
                                  for n in win["by_task"].values()) >= sampled, 120)

        # latency at a steady publish rate, the backlog drained
        produce(s, lat_exps, rate_per_s=rate_per_s, stamp_now=True)
        lat_sampled = {e.experience_id for e in lat_exps if sample_reason(e.experience_id, e.confidence)}
        w.wait_for(lambda st: st["counts"]["enriched"] >= sampled + len(lat_sampled), 120)
        msgs = consume_values(s, s.traces_topic, sampled + len(lat_sampled), 120)
        lat: list[float] = []
        for m in msgs:
            t = decode(m.value() or b"", EnrichedTrace)
            if t.experience_id.startswith("lat"):
                lat.append(m.timestamp()[1] - t.experience.created_at_ms)
        lat.sort()
    finally:
        w.stop()
    # the baselines read the same backlog (+ the latency phase's experiences), each in its own group
    total = backlog + len(lat_exps) + 2  # + the two warm-up experiences
    bare = bench_bare_faust(s, data_dir, total)
    raw = bench_raw(s, total)
    none_sampled = bench_not_sampled(data_dir, exps, rec)
    scale = bench_scale_out(data_dir, exps, rec, scale_workers) if scale_workers > 1 else None
    return {
        "experiences": backlog, "sampled": sampled, "partitions": s.tier3_partitions, "teacher": "recorded",
        "publish_s": round(publish_s, 2),
        "consume_s": round(elapsed, 2), "experiences_per_s": round(throughput),
        "cpu_us_per_experience": drained["cpu_us_per_experience"],
        "enriched": st["counts"]["enriched"], "dead_lettered": st["counts"]["dead_lettered"],
        "latency": {"publish_rate_per_s": rate_per_s, "traces": len(lat),
                    "p50_ms": round(statistics.median(lat), 1) if lat else None,
                    "p99_ms": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 1) if lat else None,
                    "max_ms": round(lat[-1], 1) if lat else None},
        "bare_faust": bare, "raw": raw,
        "worker_vs_bare_faust": round(throughput / bare["messages_per_s"], 3),
        "worker_vs_raw": round(throughput / raw["messages_per_s"], 3),
        # the same backlog with nothing sampled (no teacher call, no trace): what the sampled share costs
        "not_sampled": {**none_sampled,
                        "vs_bare_faust": round(none_sampled["experiences_per_s"] / bare["messages_per_s"], 3)},
        "scale_out": scale and {**scale, "vs_one_worker": round(scale["experiences_per_s"] / throughput, 2)},
        "goal": {"worker_vs_bare_faust": 0.6, "p99_ms": 250, "scale_out_vs_one_worker": 1.8},
    }


def original_pattern(server_url: str, exps: list[Experience], out: Path) -> dict[str, Any]:
    """The seed's worker: queue.put from the app, ONE thread: get -> teacher call -> append a JSONL line."""
    q: queue.Queue[Experience | None] = queue.Queue()
    for e in exps:
        q.put(e)
    q.put(None)
    done = 0

    def worker() -> None:
        nonlocal done
        with httpx.Client(timeout=60) as client, out.open("ab") as f:
            while True:
                e = q.get()
                if e is None:
                    return
                msgs = TASK.messages_for_model([m.model_dump() for m in e.messages])
                r = client.post(f"{server_url}/v1/chat/completions", json={"model": "fake", "messages": msgs})
                text = r.json()["choices"][0]["message"]["content"]
                reasoning, answer = TASK.parse_output(text)
                f.write(orjson.dumps({"id": e.experience_id, "reasoning": reasoning, "answer": answer}) + b"\n")
                f.flush()
                done += 1

    t0 = time.perf_counter()
    th = threading.Thread(target=worker)
    th.start()
    th.join()
    wall = time.perf_counter() - t0
    return {"traces": done, "wall_s": round(wall, 2), "traces_per_s": round(done / wall, 2)}


class TeacherProcess:
    """The fake teacher in its own process, so its event loop does not share a GIL with the bench's."""

    def __init__(self, latency_ms: float) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.fakes.teacher_server", "--port", str(self.port),
                                      "--latency-ms", str(latency_ms)], cwd=ROOT, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                httpx.get(f"{self.url}/control", timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("fake teacher did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def bench_concurrency(data_dir: Path, latency_ms: float, concurrency: int, n: int, seed_n: int) -> dict[str, Any]:
    ideal = concurrency / (latency_ms / 1000)
    srv = TeacherProcess(latency_ms)
    try:
        s = new_settings(data_dir, tier3_teacher="openai", tier3_teacher_base_url=f"{srv.url}/v1",
                         tier3_teacher_model="fake-fixed-latency", tier3_sample_rate=1.0,
                         tier3_teacher_concurrency=concurrency)
        exps = [make_experience(i, 0.5, prefix="cc") for i in range(n)]
        w = WorkerProcess(settings_env(s), data_dir / "worker-concurrency.log")
        try:
            w.wait_ready()
            produce(s, exps)
            samples = wait_counts(w, "enriched", n, 600)
            # steady state: from the first trace to the last (excludes start-up and the publish)
            t_first = next(t for t, c in samples if c > 0)
            c_first = next(c for t, c in samples if c > 0)
            t_last, c_last = samples[-1]
            rate = (c_last - c_first) / (t_last - t_first)
            st = w.status()
        finally:
            w.stop()
        seed = original_pattern(srv.url, [make_experience(i, 0.5, prefix="seed") for i in range(seed_n)],
                                data_dir / "seed-traces.jsonl")
    finally:
        srv.stop()
    measured_l_ms = st["teacher"]["latency_ms_p50"]
    return {
        "teacher_latency_ms": latency_ms, "concurrency": concurrency, "traces": n,
        "ideal_traces_per_s": round(ideal, 2), "traces_per_s": round(rate, 2),
        "efficiency": round(rate / ideal, 3),
        # the latency the worker actually saw (HTTP and a loaded machine add to L): how well C slots are used
        "teacher_latency_ms_p50_seen": measured_l_ms,
        "efficiency_vs_seen_latency": round(rate / (concurrency / (measured_l_ms / 1000)), 3),
        "original_single_thread": {**seed, "efficiency_vs_ideal": round(seed["traces_per_s"] / ideal, 3),
                                   "speedup_tier3": round(rate / seed["traces_per_s"], 1)},
        "goal": {"efficiency": 0.9},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backlog", type=int, default=20_000)
    ap.add_argument("--rate", type=float, default=1000.0, help="publish rate of the latency phase (exp/s)")
    ap.add_argument("--latency-n", type=int, default=5_000)
    ap.add_argument("--scale-workers", type=int, default=3, help="workers of the scale-out figure (1: skip it)")
    ap.add_argument("--latency-ms", type=float, default=200.0)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--concurrency-traces", type=int, default=2000)
    ap.add_argument("--seed-traces", type=int, default=25)
    ap.add_argument("--only", choices=["sampling", "concurrency"], default=None)
    ap.add_argument("--profile", type=Path, default=None, help="sampling path: record the worker draining the "
                    "backlog with py-spy (the `dev` extra) into this flame graph SVG; that run's figures carry "
                    "py-spy's overhead")
    args = ap.parse_args()

    broker.ensure_running()  # the local broker (started unless one answers), or KAFKA_BOOTSTRAP_SERVERS' cluster
    with tempfile.TemporaryDirectory(prefix="tier3-bench-") as tmp, \
            cleanup.dropped_at_exit(StreamsSettings().client_config()):
        data_dir = Path(tmp)
        result: dict[str, Any] = {
            "bench": "streams",
            "machine": {"cpus": os.cpu_count(), "load_avg_1m_at_start": round(os.getloadavg()[0], 2)},
        }
        if args.only in (None, "sampling"):
            result["sampling_path"] = bench_sampling_path(data_dir, args.backlog, args.rate, args.latency_n,
                                                           args.scale_workers, args.profile)
            if args.profile is not None:
                result["sampling_path"]["profiled"] = str(args.profile)
        if args.only in (None, "concurrency"):
            result["concurrency"] = bench_concurrency(data_dir, args.latency_ms, args.concurrency,
                                                      args.concurrency_traces, args.seed_traces)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    from schemas.runtime.preflight import run_cli

    run_cli(main)  # no broker, missing settings: one line, exit 2
