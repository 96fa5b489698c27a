"""The dashboard (streams/static/dashboard.html) in a real headless browser: Debian's chromium.

A tiny aiohttp server on 127.0.0.1 serves the page and a ``/status`` JSON with known counts (the shape the
worker serves); chromium is driven over the Chrome DevTools protocol (a websocket, with aiohttp's client: no
extra driver). The test asserts that the page loads with no console errors or uncaught exceptions, that every
chart shows the known counts (data attributes and the text drawn in the SVG), and that it follows /status when
the counts change. ``.ci/install_system_deps.sh`` (run by ``make test``) installs chromium.
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "streams" / "static" / "dashboard.html"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1"]
WINDOW_MS = 1_800_000
T0_MS = 1_793_001_600_000  # 2026-10-26 08:00 UTC

pytestmark = pytest.mark.browser


def known_status() -> dict[str, Any]:
    """A /status answer with known counts in every block the dashboard draws."""
    return {
        "app": "tier3-worker", "worker_id": "worker-test-1", "uptime_s": 321.0,
        "counts": {"consumed": 1234, "sampled": 345, "enriched": 321, "dead_lettered": 17, "not_sampled": 872},
        "windows": {
            "size_s": 1800,
            "current": {"start_ms": T0_MS + 3 * WINDOW_MS, "end_ms": T0_MS + 4 * WINDOW_MS,
                        "by_task": {"widget_selector": 41, "summarizer": 4}},
            "recent": [
                # an empty window before the first that counted anything: not drawn
                {"start_ms": T0_MS - WINDOW_MS, "end_ms": T0_MS, "by_task": {}},
                {"start_ms": T0_MS, "end_ms": T0_MS + WINDOW_MS, "by_task": {"widget_selector": 100}},
                {"start_ms": T0_MS + WINDOW_MS, "end_ms": T0_MS + 2 * WINDOW_MS, "by_task": {"widget_selector": 76}},
                {"start_ms": T0_MS + 2 * WINDOW_MS, "end_ms": T0_MS + 3 * WINDOW_MS,
                 "by_task": {"widget_selector": 90, "summarizer": 10}},
            ],
        },
        "lag": {"experiences": {"0": 5, "1": 0, "2": 12}},
        "teacher": {"kind": "recorded", "model": "rule-based example teacher (tier3 example data, not an LLM)",
                    "in_flight": 3, "calls": 360, "errors": 15, "error_rate": 0.0417,
                    "latency_ms_p50": 12.5, "latency_ms_p95": 48.0},
        "dead_letters": {"count": 17, "by_reason": {"not_json": 9, "invalid": 5, "teacher_invalid_answer": 3}},
        "trainer": {
            "tier3_sft": {"training_in_progress": False, "last_check_time": (T0_MS + 3 * WINDOW_MS) / 1000,
                          "check_interval_s": 1800, "next_check_in_s": 600},
            "runs": [
                {"run_id": "run-a", "event": "started", "at_ms": T0_MS + 1000, "model_version": None, "metrics": {}},
                {"run_id": "run-a", "event": "succeeded", "at_ms": T0_MS + 90_000, "model_version": 1,
                 "metrics": {"train_loss": 1.9}},
                {"run_id": "run-a", "event": "evaluated", "at_ms": T0_MS + 120_000, "model_version": 1,
                 "metrics": {"json_valid_rate": 0.5, "schema_valid_rate": 0.25, "exact_match": 0.125, "f1": 0.375,
                             "baseline_f1": 0.625, "latency_ms_p95": 850.0}},
                {"run_id": "run-a", "event": "rejected", "at_ms": T0_MS + 121_000, "model_version": 1, "metrics": {}},
                {"run_id": "run-b", "event": "started", "at_ms": T0_MS + 2_000_000, "model_version": None,
                 "metrics": {}},
                {"run_id": "run-b", "event": "failed", "at_ms": T0_MS + 2_100_000, "model_version": None,
                 "metrics": {}},
                {"run_id": "run-c", "event": "started", "at_ms": T0_MS + 2_400_000, "model_version": None,
                 "metrics": {}},
                {"run_id": "run-c", "event": "succeeded", "at_ms": T0_MS + 2_500_000, "model_version": 2,
                 "metrics": {}},
                {"run_id": "run-c", "event": "evaluated", "at_ms": T0_MS + 2_600_000, "model_version": 2,
                 "metrics": {"json_valid_rate": 1.0, "schema_valid_rate": 0.75, "exact_match": 0.5, "f1": 0.875,
                             "baseline_f1": 0.625, "latency_ms_p95": 400.0}},
                {"run_id": "run-c", "event": "promoted", "at_ms": T0_MS + 2_601_000, "model_version": 2,
                 "metrics": {}},
                {"run_id": "run-c", "event": "exported", "at_ms": T0_MS + 2_700_000, "model_version": 2,
                 "metrics": {}},
            ],
        },
        "router": {"mode": "ab", "promoted_version": 2,
                   "arms": {"teacher": {"count": 700, "confidence_mean": 0.81, "reward_mean": 0.7,
                                        "latency_ms_mean": 900.0},
                            "student": {"count": 300, "confidence_mean": 0.74, "reward_mean": 0.66,
                                        "latency_ms_mean": 80.0}}},
    }


# --- a tiny status server -------------------------------------------------------------------------------------

@asynccontextmanager
async def status_server(status: dict[str, Any]) -> AsyncIterator[str]:
    """Serve the dashboard at / and ``status`` (mutable: the test changes it) at /status; yields the base URL."""

    async def index(_: web.Request) -> web.Response:
        return web.Response(body=DASHBOARD.read_bytes(), content_type="text/html", charset="utf-8")

    async def status_view(_: web.Request) -> web.Response:
        return web.json_response(status)

    app = web.Application()
    app.router.add_get("/", index)
    app.router.add_get("/status", status_view)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


# --- a minimal Chrome DevTools protocol client -----------------------------------------------------------------

class Browser:
    """Headless chromium with one page, driven over CDP; collects console errors and uncaught exceptions."""

    def __init__(self, proc: subprocess.Popen[bytes], ws: aiohttp.ClientWebSocketResponse) -> None:
        self.proc, self.ws = proc, ws
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.errors: list[str] = []
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            data = msg.json()
            if "id" in data and data["id"] in self.pending:
                self.pending.pop(data["id"]).set_result(data)
                continue
            method, params = data.get("method"), data.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                self.errors.append("console.error: " + " ".join(str(a.get("value", a.get("description", "")))
                                                                for a in params.get("args", [])))
            elif method == "Runtime.exceptionThrown":
                d = params.get("exceptionDetails", {})
                self.errors.append("exception: " + str(d.get("exception", {}).get("description", d.get("text"))))
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                e = params["entry"]
                self.errors.append(f"log ({e.get('source')}): {e.get('text')} {e.get('url', '')}")

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        i = next(self.ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[i] = fut
        await self.ws.send_json({"id": i, "method": method, "params": params})
        reply = await asyncio.wait_for(fut, 20)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    async def eval(self, expression: str) -> Any:
        res = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"evaluating {expression[:60]!r}: {res['exceptionDetails']}")
        return res["result"].get("value")

    async def wait_for(self, expression: str, timeout_s: float = 20.0) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                value = await self.eval(expression)
            except RuntimeError:  # the page is still loading (no body yet): try again
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {expression!r}; errors: {self.errors}")
            await asyncio.sleep(0.1)


@asynccontextmanager
async def chromium(tmp: Path) -> AsyncIterator[Browser]:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe, "chromium is not installed: run .ci/install_system_deps.sh"
    profile = Path(tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp))
    proc = subprocess.Popen([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    session = aiohttp.ClientSession()
    try:
        # chromium writes the port it picked into the profile once its DevTools server listens
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            assert proc.poll() is None, f"chromium exited with code {proc.returncode}"
            assert time.monotonic() < deadline, "chromium did not start its DevTools server in 30 s"
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        async with session.get(f"http://127.0.0.1:{port}/json/list") as resp:
            targets = await resp.json()
        page = next(t for t in targets if t.get("type") == "page")
        ws = await session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        browser = Browser(proc, ws)
        for domain in ("Runtime.enable", "Log.enable", "Page.enable"):
            await browser.send(domain)
        yield browser
        browser.reader.cancel()
        await ws.close()
    finally:
        await session.close()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


SNAPSHOT_JS = """(() => {
  const q = (s) => document.querySelector(s);
  const all = (s) => [...document.querySelectorAll(s)];
  const tiles = {};
  for (const t of all('.tile')) tiles[t.id.replace('tile-', '')] = t.dataset.value;
  return {
    refreshes: Number(document.body.dataset.refreshes), state: document.body.dataset.state, tiles,
    windows: {total: q('#chart-windows').dataset.total, n: q('#chart-windows').dataset.windows,
              current: q('#chart-windows').dataset.current,
              bars: all('#chart-windows g.bar').map((g) => [Number(g.dataset.startMs), Number(g.dataset.count)]),
              text: q('#chart-windows svg').textContent},
    dead: {total: q('#chart-dead-letters').dataset.total,
           bars: Object.fromEntries(all('#chart-dead-letters g.bar').map(
             (g) => [g.dataset.reason, Number(g.dataset.count)])),
           text: q('#chart-dead-letters svg').textContent},
    lag: {total: q('#chart-lag').dataset.total,
          bars: Object.fromEntries(all('#chart-lag g.bar').map(
            (g) => [g.dataset.topic + ':' + g.dataset.partition, Number(g.dataset.count)])),
          text: q('#chart-lag svg').textContent},
    runs: {runs: q('#chart-runs').dataset.runs, events: q('#chart-runs').dataset.events,
           dots: all('#chart-runs circle').map((c) => c.dataset.event),
           legend: q('#chart-runs .legend').textContent},
    evals: {versions: q('#chart-eval').dataset.versions, metrics: q('#chart-eval').dataset.metrics,
            bars: all('#chart-eval rect').map(
              (r) => [r.parentNode.dataset.version, r.dataset.metric, Number(r.dataset.value)]),
            verdicts: all('#chart-eval g.version').map((g) => [g.dataset.version, g.dataset.verdict]),
            table: q('#eval-table').textContent},
    router: all('#router-table tbody tr').map((tr) => [...tr.children].map((td) => td.textContent)),
    trainer: q('#trainer-table').textContent,
    header: document.querySelector('header').textContent,
    svgs: all('svg').length,
  };
})()"""


async def _run_dashboard(tmp: Path) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    status = known_status()
    async with status_server(status) as base, chromium(tmp) as browser:
        await browser.send("Page.navigate", url=f"{base}/?interval_s=0.5")
        await browser.wait_for("document.body && Number(document.body.dataset.refreshes) >= 2")
        first = await browser.eval(SNAPSHOT_JS)
        # the worker's numbers move: the page follows /status
        status["counts"]["enriched"] = 400
        status["dead_letters"] = {"count": 20, "by_reason": {"not_json": 12, "invalid": 5,
                                                             "teacher_invalid_answer": 3}}
        status["windows"]["current"]["by_task"]["widget_selector"] = 120
        status["trainer"]["runs"].append({"run_id": "run-d", "event": "started", "at_ms": T0_MS + 3_000_000,
                                          "model_version": None, "metrics": {}})
        await browser.wait_for("document.getElementById('tile-enriched').dataset.value === '400'")
        await browser.wait_for(f"Number(document.body.dataset.refreshes) >= {first['refreshes'] + 2}")
        second = await browser.eval(SNAPSHOT_JS)
        await asyncio.sleep(0.3)  # let late console events arrive before the browser closes
        errors = list(browser.errors)
    return first, second, errors


def test_dashboard_shows_known_counts_without_console_errors(tmp_path: Path) -> None:
    first, second, errors = asyncio.run(_run_dashboard(tmp_path))
    assert errors == []
    assert first["state"] == "ok" and first["svgs"] == 6

    # counters
    assert first["tiles"] == {"consumed": "1234", "sampled": "345", "enriched": "321", "not_sampled": "872",
                              "dead_lettered": "17", "lag": "17", "teacher_error_rate": "0.0417",
                              "teacher_p95": "48"}
    # traces per window: three recent windows and the current one (41 + 4), drawn with their totals
    w = first["windows"]
    assert w["bars"] == [[T0_MS, 100], [T0_MS + WINDOW_MS, 76], [T0_MS + 2 * WINDOW_MS, 100],
                         [T0_MS + 3 * WINDOW_MS, 45]]
    assert (w["total"], w["n"], w["current"]) == ("321", "4", "45")
    for n in ("100", "76", "45", "current"):
        assert n in w["text"]
    # dead letters by reason
    assert first["dead"]["total"] == "17"
    assert first["dead"]["bars"] == {"not_json": 9, "invalid": 5, "teacher_invalid_answer": 3}
    assert "9" in first["dead"]["text"]
    # lag per partition
    assert first["lag"]["total"] == "17"
    assert first["lag"]["bars"] == {"experiences:0": 5, "experiences:1": 0, "experiences:2": 12}
    assert "12" in first["lag"]["text"]
    # training runs: 3 runs, 11 events, one dot each
    r = first["runs"]
    assert (r["runs"], r["events"]) == ("3", "11")
    assert sorted(r["dots"]) == sorted(["started"] * 3 + ["succeeded"] * 2 + ["evaluated"] * 2 + ["failed",
                                        "rejected", "promoted", "exported"])
    assert "started (3)" in r["legend"] and "promoted (1)" in r["legend"]
    # evaluation metrics per model version (rates as bars, latency in the table only)
    e = first["evals"]
    assert e["versions"] == "2"
    assert e["metrics"].split(",") == ["json_valid_rate", "schema_valid_rate", "exact_match", "f1", "baseline_f1"]
    bars = {(v, m): x for v, m, x in e["bars"]}
    assert bars[("v1", "f1")] == 0.375 and bars[("v2", "f1")] == 0.875 and bars[("v2", "json_valid_rate")] == 1.0
    assert len(bars) == 10
    assert e["verdicts"] == [["v1", "rejected"], ["v2", "promoted"]]
    assert "850" in e["table"] and "400" in e["table"]
    # router and trainer
    assert first["router"] == [["teacher", "700", "0.81", "0.70", "900"], ["student", "300", "0.74", "0.66", "80"]]
    assert "no" in first["trainer"] and "30 min" in first["trainer"] and "10 min" in first["trainer"]
    assert "2026" in first["trainer"]  # last_check_time is epoch seconds (the original system's block)
    assert "worker-test-1" in first["header"] and "recorded" in first["header"]

    # after /status changed
    assert second["tiles"]["enriched"] == "400" and second["tiles"]["dead_lettered"] == "17"
    assert second["dead"]["total"] == "20" and second["dead"]["bars"]["not_json"] == 12
    assert second["windows"]["current"] == "124" and second["windows"]["bars"][-1] == [T0_MS + 3 * WINDOW_MS, 124]
    assert second["runs"]["runs"] == "4"


# --- the page as the real worker serves it ----------------------------------------------------------------------

def test_dashboard_served_by_a_real_worker(make_settings: Any, tmp_path: Path) -> None:
    """`tier3 worker` (recorded teacher) serves the page at / and its /status: after 60 example experiences and 3
    poison messages the charts show the worker's own counts, with no console errors."""
    from schemas import Experience, decode
    from streams.app import changelog_spec
    from streams.sampling import sample_reason
    from streams.settings import StreamsSettings
    from streams.topics import ensure_topics
    from tests.conftest import settings_env
    from tests.kafka_utils import produce_values
    from tests.streams.helpers import WorkerProcess

    examples_dir = ROOT / "examples" / "widget_selector"
    settings = make_settings(StreamsSettings, tier3_teacher="recorded",
                             tier3_teacher_recorded_path=examples_dir / "recorded_teacher.jsonl",
                             tier3_commit_interval_s=0.5)
    ensure_topics(settings, [changelog_spec(settings)])
    lines = (examples_dir / "experiences.jsonl").read_bytes().splitlines()[:60]
    exps = [decode(line, Experience) for line in lines]
    sampled = sum(sample_reason(e.experience_id, e.confidence) is not None for e in exps)
    worker = WorkerProcess(settings_env(settings), tmp_path / "worker.log")
    try:
        worker.wait_ready()
        records = [(e.experience_id.encode(), line) for e, line in zip(exps, lines, strict=True)]
        produce_values(settings, settings.experiences_topic,
                       [*records, (b"p1", b"not json"), (b"p2", b"[1, 2]"), (b"p3", b'{"schema_version": 99}')])
        status = worker.wait_for(lambda st: st["counts"]["consumed"] == 63 and st["counts"]["enriched"] == sampled
                                 and st["counts"]["dead_lettered"] == 3, timeout_s=90)

        async def look() -> tuple[dict[str, Any], list[str]]:
            async with chromium(tmp_path) as browser:
                await browser.send("Page.navigate", url=f"{worker.url}/?interval_s=0.5")
                await browser.wait_for("document.body && Number(document.body.dataset.refreshes) >= 2")
                snap = await browser.eval(SNAPSHOT_JS)
                await asyncio.sleep(0.3)
                return snap, list(browser.errors)

        snap, errors = asyncio.run(look())
    finally:
        worker.stop()
    assert errors == []
    assert snap["state"] == "ok"
    counts = status["counts"]
    for k in ("consumed", "sampled", "enriched", "dead_lettered", "not_sampled"):
        assert snap["tiles"][k] == str(counts[k]), k
    assert snap["windows"]["total"] == str(sampled)  # every enriched trace counted in a window
    assert snap["dead"]["total"] == "3" and sum(snap["dead"]["bars"].values()) == 3
    assert len(snap["lag"]["bars"]) == settings.tier3_partitions
    assert "recorded" in snap["header"]
