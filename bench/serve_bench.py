"""The served student against bare llama.cpp, and what concurrent clients get. Prints JSON.

Rows, all on the same GGUF and the same requests (the router's answer-only messages for the example experiences,
greedy, ``--max-tokens``), one after the other on the same machine:

- ``bare``: ``llama_cpp.Llama`` in this process, ``create_chat_completion`` with the chat handler ``tier3 serve``
  installs (message text as plain text) and the server's settings (threads, context, no weight repacking,
  ``repeat_penalty`` 1.0): the library's own cost;
- ``served``: ``tier3 serve``'s server (``LlamaServer``: ``python -m trainer.close_loop.llama_server``) through
  HTTP, one request at a time, as the router asks;
- ``concurrency``: 1, 2 and 4 clients at once against one server, and against ``--replicas`` servers (each with
  its share of the threads) with the clients spread over them as the router spreads its calls
  (``TIER3_STUDENT_BASE_URL`` with several URLs): requests/s and latency p50/p95.

Usage: ``.venv/bin/python bench/serve_bench.py [--gguf PATH] [--requests 40] [--threads 2] [--replicas 2]``.
Without ``--gguf`` the newest exported ``*-q8_0.gguf`` under ``.tier3/`` is used, else SmolLM2-135M-Instruct as
``tier3 export`` writes it (an untrained adapter: the base model's weights).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def pct(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def summary(lat_s: Sequence[float]) -> dict[str, float]:
    ms = [x * 1000 for x in lat_s]
    return {"n": len(ms), "p50_ms": round(pct(ms, 0.5), 1), "p95_ms": round(pct(ms, 0.95), 1),
            "mean_ms": round(statistics.fmean(ms), 1)}


def prompts(n: int) -> list[list[dict[str, str]]]:
    from schemas import Experience, decode, get_task

    task = get_task("widget_selector")
    out = []
    for line in (ROOT / "examples/widget_selector/experiences.jsonl").read_text().splitlines():
        if not line.strip():
            continue
        exp = decode(line.encode(), Experience)
        out.append(task.messages_for_model([m.model_dump() for m in exp.messages], reasoning=False))
        if len(out) == n:
            break
    return out


def default_gguf(tmp: Path) -> Path:
    found = sorted((ROOT / ".tier3").rglob("*-q8_0.gguf"), key=lambda p: p.stat().st_mtime)
    if found:
        return found[-1]
    from trainer.close_loop import parity
    from trainer.models import resolve_base_model

    adapter = parity.untrained_adapter(resolve_base_model("smollm2-135m"), tmp / "run")
    return parity.export_gguf(adapter, tmp / "export", ("q8_0",))["q8_0"]


def bare(gguf: Path, reqs: list[list[dict[str, str]]], threads: int, n_ctx: int, max_tokens: int,
         repack: bool = False) -> tuple[list[float], list[str]]:
    from llama_cpp import Llama

    from trainer.chat_tokens import content_as_text
    from trainer.close_loop.llama_server import no_weight_repacking

    if not repack:
        no_weight_repacking()
    llm = content_as_text(Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                                verbose=False))
    lat, texts = [], []
    for msgs in reqs:
        t0 = time.perf_counter()
        r: Any = llm.create_chat_completion(messages=msgs, max_tokens=max_tokens, temperature=0.0,  # type: ignore[arg-type]
                                            repeat_penalty=1.0)
        lat.append(time.perf_counter() - t0)
        texts.append(r["choices"][0]["message"]["content"] or "")
    llm.close()
    return lat, texts


def post(client: Any, url: str, model: str, msgs: list[dict[str, str]], max_tokens: int) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = client.post(f"{url}/chat/completions", json={"model": model, "messages": msgs, "max_tokens": max_tokens,
                                                     "temperature": 0.0})
    r.raise_for_status()
    return time.perf_counter() - t0, r.json()["choices"][0]["message"]["content"] or ""


def clients(urls: list[str], model: str, reqs: list[list[dict[str, str]]], n_clients: int, max_tokens: int
            ) -> dict[str, Any]:
    """``n_clients`` threads take requests from one list; client i uses ``urls[i % len(urls)]``."""
    import httpx

    todo = list(reqs)
    lock = threading.Lock()
    lat: list[float] = []

    def run(i: int) -> None:
        with httpx.Client(timeout=600) as c:
            while True:
                with lock:
                    if not todo:
                        return
                    msgs = todo.pop()
                dt, _ = post(c, urls[i % len(urls)], model, msgs, max_tokens)
                with lock:
                    lat.append(dt)

    t0 = time.perf_counter()
    ts = [threading.Thread(target=run, args=(i,)) for i in range(n_clients)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    wall = time.perf_counter() - t0
    return {"clients": n_clients, "servers": len(urls), "requests_per_s": round(len(lat) / wall, 3),
            **summary(lat)}


def served(gguf: Path, reqs: list[list[dict[str, str]]], threads: int, n_ctx: int, max_tokens: int,
           replicas: int, concurrency: Sequence[int]) -> dict[str, Any]:
    import httpx

    from trainer.close_loop.serve import LlamaServer, ServedModel

    model = ServedModel("bench:v1", gguf, "bench", 1)
    out: dict[str, Any] = {}
    with LlamaServer([model], threads=threads, n_ctx=n_ctx) as srv:
        with httpx.Client(timeout=600) as c:
            post(c, srv.base_url, model.alias, reqs[0], max_tokens)  # warm: the first prompt fills the cache
            lat, texts = [], []
            for msgs in reqs:
                dt, text = post(c, srv.base_url, model.alias, msgs, max_tokens)
                lat.append(dt)
                texts.append(text)
        out["served"] = summary(lat)
        out["served_texts"] = texts
        out["concurrency_one_server"] = [clients([srv.base_url], model.alias, reqs, n, max_tokens)
                                         for n in concurrency]
    if replicas > 1:
        per = max(1, threads // replicas)
        servers = [LlamaServer([model], threads=per, n_ctx=n_ctx) for _ in range(replicas)]
        try:
            for s in servers:
                s.start()
            urls = [s.base_url for s in servers]
            out["replicas"] = {"servers": replicas, "threads_each": per}
            out["concurrency_replicas"] = [clients(urls, model.alias, reqs, n, max_tokens) for n in concurrency]
        finally:
            for s in servers:
                s.stop()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", type=Path)
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--concurrency", default="1,2,4")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--bare-only", action="store_true", help="only the bare row (used for the repacking row)")
    ap.add_argument("--repack", action="store_true", help="bare row with llama.cpp's weight repacking on")
    a = ap.parse_args(argv)
    if a.bare_only:
        reqs = prompts(a.requests)
        bare(Path(a.gguf), reqs[:1], a.threads, a.n_ctx, a.max_tokens, a.repack)
        print(json.dumps(summary(bare(Path(a.gguf), reqs, a.threads, a.n_ctx, a.max_tokens, a.repack)[0])))
        return 0
    with tempfile.TemporaryDirectory(prefix="tier3-serve-bench-") as tmp:
        gguf = a.gguf or default_gguf(Path(tmp))
        reqs = prompts(a.requests)
        conc = [int(x) for x in a.concurrency.split(",")]
        bare(gguf, reqs[:1], a.threads, a.n_ctx, a.max_tokens)  # warm the page cache
        b_lat, b_texts = bare(gguf, reqs, a.threads, a.n_ctx, a.max_tokens)
        s = served(gguf, reqs, a.threads, a.n_ctx, a.max_tokens, a.replicas, conc)
        # the switch tier3 serve turns off: weight repacking (a child process: it may crash on this CPU)
        rp = subprocess.run([sys.executable, __file__, "--bare-only", "--repack", "--gguf", str(gguf), "--requests",
                             str(a.requests), "--threads", str(a.threads), "--n-ctx", str(a.n_ctx), "--max-tokens",
                             str(a.max_tokens)], capture_output=True, text=True, timeout=1800)
        repacked = (json.loads(rp.stdout.strip().splitlines()[-1]) if rp.returncode == 0
                    else {"crashed": rp.returncode, "stderr_tail": rp.stderr[-300:]})
    same = sum(x == y for x, y in zip(b_texts, s.pop("served_texts"), strict=True))
    b = summary(b_lat)
    report = {
        "command": " ".join(["bench/serve_bench.py", *(argv if argv is not None else sys.argv[1:])]),
        "gguf": str(gguf), "requests": len(reqs), "threads": a.threads, "max_tokens": a.max_tokens,
        "load": os.getloadavg(), "cpus": os.cpu_count(),
        "bare": b, "bare_weight_repacking_on": repacked, **s,
        "served_over_bare": {"p50": round(s["served"]["p50_ms"] / b["p50_ms"], 3),
                             "p95": round(s["served"]["p95_ms"] / b["p95_ms"], 3)},
        "same_text": f"{same}/{len(reqs)}",
    }
    text = json.dumps(report, indent=2)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
