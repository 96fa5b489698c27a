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

from schemas import TrainingRun

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "streams" / "static" / "dashboard.html"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1"]
WINDOW_MS = 1_800_000
T0_MS = 1_793_001_600_000  # 2026-10-26 08:00 UTC

pytestmark = pytest.mark.browser


def _ev(run_id: str, event: str, at_s: int, version: int | None = None, **metrics: float) -> TrainingRun:
    return TrainingRun(run_id=run_id, event=event, at_ms=T0_MS + at_s * 1000,  # type: ignore[arg-type]
                       model_version=version, details={"metrics": metrics} if metrics else {})


EVAL_A = {"json_valid_rate": 0.5, "schema_valid_rate": 0.25, "exact_match": 0.0, "f1": 0.375, "baseline_f1": 0.625,
          "latency_ms_p95": 850.0}
EVAL_C = {"json_valid_rate": 1.0, "schema_valid_rate": 0.75, "exact_match": 0.5, "f1": 0.875, "baseline_f1": 0.625,
          "latency_ms_p95": 400.0}
EVAL_D = {"json_valid_rate": 1.0, "schema_valid_rate": 1.0, "exact_match": 0.5, "f1": 0.9, "baseline_f1": 0.625,
          "latency_ms_p95": 300.0}
# v1 promoted, a failed run, v3 evaluated (and rejected) before v2, v2 promoted and exported, then both rolled back:
# the teacher serves again and no version may still read "promoted"
KNOWN_RUN_EVENTS = [
    _ev("run-a", "started", 1, 1), _ev("run-a", "succeeded", 90, 1, train_loss=1.9),
    _ev("run-a", "evaluated", 120, 1, **EVAL_A), _ev("run-a", "promoted", 121, 1),
    _ev("run-b", "started", 2000), _ev("run-b", "failed", 2100),
    _ev("run-d", "started", 2200, 3), _ev("run-d", "succeeded", 2300, 3), _ev("run-d", "evaluated", 2350, 3, **EVAL_D),
    _ev("run-d", "rejected", 2351, 3),
    _ev("run-c", "started", 2400, 2), _ev("run-c", "succeeded", 2500, 2), _ev("run-c", "evaluated", 2600, 2, **EVAL_C),
    _ev("run-c", "promoted", 2601, 2), _ev("run-c", "exported", 2700, 2),
    _ev("run-c", "rollback", 2800, 1),  # model_version: the version in force after it (v1)
    _ev("run-a", "rollback", 2900, None),
]


def history_block(events: list[TrainingRun]) -> dict[str, Any]:
    """The trainer block's history, as the worker folds it (streams/runs_view.py)."""
    from streams.runs_view import RunHistory

    h = RunHistory()
    for ev in events:
        h.apply(ev)
    return h.block()


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
            # the trainer's newest heartbeat: a run trains (its stage, step, loss and ETA)
            "live": {"stage": "training", "stage_since_ms": T0_MS, "run_id": "run-e", "step": 37, "total_steps": 168,
                     "loss": 0.41234, "eta_s": 370.0, "stage_for_s": 95.0, "at_ms": T0_MS + 95_000},
            **history_block(KNOWN_RUN_EVENTS),
        },
        "router": {"mode": "ab", "ab_student_share": 0.3, "promoted_version": None,
                   "observed_over": "latest 1000 routed experiences read by this worker",
                   "arms": {"teacher": {"count": 700, "confidence_mean": 0.81, "reward_mean": 0.7,
                                        "latency_ms_mean": 900.0},
                            "student": {"count": 300, "confidence_mean": 0.74, "reward_mean": 0.66,
                                        "latency_ms_mean": 80.0}}},
        "online_eval": known_online(),
    }


def known_online() -> dict[str, Any]:
    """An online_eval block: v2 (offline F1 0.875) over two windows, v3 (offline 0.9) over one, the baseline."""
    def w(i: int, n: int, f1: float) -> dict[str, Any]:
        return {"start_ms": T0_MS + i * WINDOW_MS, "end_ms": T0_MS + (i + 1) * WINDOW_MS, "n": n, "f1": f1}

    return {"window_s": WINDOW_MS // 1000, "tasks": {"widget_selector": {
        "versions": {"2": {"current": None, "previous": None, "history": [w(0, 30, 0.8), w(1, 25, 0.2)]},
                     "3": {"current": None, "previous": None, "history": [w(2, 40, 0.7), w(3, 0, 0.0)]}},
        "baseline": {"current": None, "previous": None, "history": [w(0, 10, 0.5), w(2, 12, 0.6)]}}},
        "cost": {"shadow_rate": 0.2, "teacher_concurrency": 32, "shadow_calls_by_window": []}}


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
           rows: q('#chart-runs').dataset.rows,
           byEvent: Object.fromEntries(Object.entries(q('#chart-runs').dataset).filter(([k]) => k.startsWith('count'))
             .map(([k, v]) => [k.slice(5).toLowerCase(), Number(v)])),
           table: all('#chart-runs g.run').map((g) => [g.dataset.runId, g.dataset.status,
             [...g.querySelectorAll('circle')].map((c) => c.dataset.event)]),
           rowYs: all('#chart-runs g.run').map((g) => Number(g.querySelector('circle').getAttribute('cy'))),
           dots: all('#chart-runs circle').map((c) => c.dataset.event),
           legend: q('#chart-runs .legend').textContent},
    evals: {versions: q('#chart-eval').dataset.versions, metrics: q('#chart-eval').dataset.metrics,
            bars: all('#chart-eval rect').map(
              (r) => [r.parentNode.dataset.version, r.dataset.metric, Number(r.dataset.value)]),
            zeroBars: all('#chart-eval rect.zero').map((r) => [r.parentNode.dataset.version, r.dataset.metric,
              r.getBBox().height, r.parentNode.textContent]),
            verdicts: all('#chart-eval g.version').map((g) => [g.dataset.version, g.dataset.verdict]),
            labels: all('#chart-eval g.version').map((g) => g.lastChild.textContent),
            table: q('#eval-table').textContent},
    online: {versions: q('#chart-online').dataset.versions, windows: q('#chart-online').dataset.windows,
             lines: all('#chart-online g.online').map((g) => [g.dataset.series, [...g.querySelectorAll('circle')]
               .map((c) => Number(c.dataset.f1))]),
             offline: all('#chart-online line.offline').map((l) => [l.parentNode.dataset.series,
               Number(l.dataset.offlineF1)]),
             legend: q('#chart-online .legend').textContent},
    router: all('#router-table tbody tr').map((tr) => [...tr.children].map((td) => td.textContent)),
    routerSub: q('#router-sub').textContent,
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
        status["trainer"].update(history_block([*KNOWN_RUN_EVENTS, _ev("run-e", "started", 3000, 4)]))
        status["trainer"]["live"] = {**status["trainer"]["live"], "stage": "evaluating_served", "step": 168,
                                     "eta_s": None, "stage_for_s": 65.0}
        await browser.wait_for("document.getElementById('tile-enriched').dataset.value === '400'")
        await browser.wait_for(f"Number(document.body.dataset.refreshes) >= {first['refreshes'] + 2}")
        second = await browser.eval(SNAPSHOT_JS)
        await asyncio.sleep(0.3)  # let late console events arrive before the browser closes
        errors = list(browser.errors)
    return first, second, errors


def test_dashboard_shows_known_counts_without_console_errors(tmp_path: Path) -> None:
    first, second, errors = asyncio.run(_run_dashboard(tmp_path))
    assert errors == []
    assert first["state"] == "ok" and first["svgs"] == 7

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
    # training runs: one row per run, in the order they started, its stages marked on it
    r = first["runs"]
    assert (r["runs"], r["events"], r["rows"]) == ("4", "17", "4")
    assert r["byEvent"] == {"started": 4, "succeeded": 3, "failed": 1, "evaluated": 3, "promoted": 2,
                            "rejected": 1, "exported": 1, "rollback": 2}
    assert r["table"] == [
        ["run-a", "rolled back", ["started", "succeeded", "evaluated", "promoted", "rollback"]],
        ["run-b", "failed", ["started", "failed"]],
        ["run-d", "rejected", ["started", "succeeded", "evaluated", "rejected"]],
        ["run-c", "rolled back", ["started", "succeeded", "evaluated", "promoted", "exported", "rollback"]]]
    assert r["rowYs"] == sorted(set(r["rowYs"]))  # a row each, never crossing
    assert "started (4)" in r["legend"] and "rollback (2)" in r["legend"]
    # evaluation metrics per model version: by version number (v3 was evaluated before v2), rates as bars
    e = first["evals"]
    assert e["versions"] == "3"
    assert e["metrics"].split(",") == ["json_valid_rate", "schema_valid_rate", "exact_match", "f1", "baseline_f1"]
    bars = {(v, m): x for v, m, x in e["bars"]}
    assert bars[("v1", "f1")] == 0.375 and bars[("v2", "f1")] == 0.875 and bars[("v3", "f1")] == 0.9
    assert len(bars) == 15
    # rolled back twice: nothing is "promoted" any more, v1 included
    assert e["verdicts"] == [["v1", "rolled back"], ["v2", "rolled back"], ["v3", "rejected"]]
    assert e["labels"] == ["v1 · rolled back", "v2 · rolled back", "v3 · rejected"]
    assert "promoted" not in " ".join(e["labels"]) and "promoted" not in e["table"]
    # v1's exact match is 0: a visible stub with its number, not an invisible bar
    assert [(v, m) for v, m, _h, _t in e["zeroBars"]] == [("v1", "exact_match")]
    assert e["zeroBars"][0][2] >= 2 and "0" in e["zeroBars"][0][3]
    assert "850" in e["table"] and "400" in e["table"]
    # online agreement per version over time (a window with no traces is no point), offline F1 dashed beside it
    o = first["online"]
    assert (o["versions"], o["windows"]) == ("2", "5")
    assert o["lines"] == [["v2", [0.8, 0.2]], ["v3", [0.7]], ["baseline", [0.5, 0.6]]]
    assert o["offline"] == [["v2", 0.875], ["v3", 0.9]]
    assert "v2 (offline 0.88)" in o["legend"] and "baseline" in o["legend"]
    # router and trainer
    assert first["router"] == [["teacher", "700", "0.81", "0.70", "900"], ["student", "300", "0.74", "0.66", "80"]]
    assert "no" in first["trainer"] and "30 min" in first["trainer"] and "10 min" in first["trainer"]
    assert "2026" in first["trainer"]  # last_check_time is epoch seconds (the original system's block)
    assert "runs (all time)4" in first["trainer"] and "model in forceteacher" in first["trainer"]
    assert "stagetraining 37/168 · loss 0.412 · ETA 6m10s" in first["trainer"]
    assert "trainer training 37/168" in first["header"]
    assert "served: ab" in first["routerSub"] and "student share 0.30" in first["routerSub"]
    assert "worker-test-1" in first["header"] and "recorded" in first["header"]

    # after /status changed
    assert second["tiles"]["enriched"] == "400" and second["tiles"]["dead_lettered"] == "17"
    assert second["dead"]["total"] == "20" and second["dead"]["bars"]["not_json"] == 12
    assert second["windows"]["current"] == "124" and second["windows"]["bars"][-1] == [T0_MS + 3 * WINDOW_MS, 124]
    assert second["runs"]["runs"] == "5" and second["runs"]["table"][-1] == ["run-e", "started", ["started"]]
    assert "stageevaluating (served) for 1m05s" in second["trainer"]
    assert "trainer evaluating (served)" in second["header"]


# --- the page as the real worker serves it ----------------------------------------------------------------------

def many_runs(n: int = 24) -> list[TrainingRun]:
    """``n`` runs' lifecycle events (more than the 20 events the dashboard once kept), with the trainer's heartbeats
    between them: every 6th run fails, v5 and v11 are promoted, v11 is rolled back (v5 is in force again)."""
    out: list[TrainingRun] = []
    for i in range(1, n + 1):
        rid, at = f"run-{i:03d}", T0_MS + i * 600_000
        out.append(TrainingRun(run_id=rid, event="started", at_ms=at, model_version=i))
        if i % 6 == 0:
            out.append(TrainingRun(run_id=rid, event="failed", at_ms=at + 60_000, details={"error": "boom"}))
        else:
            out += [TrainingRun(run_id=rid, event="succeeded", at_ms=at + 60_000, model_version=i),
                    TrainingRun(run_id=rid, event="evaluated", at_ms=at + 70_000, model_version=i,
                                details={"metrics": {"f1": i / 100, "json_valid_rate": 1.0, "exact_match": 0.0}}),
                    TrainingRun(run_id=rid, event="promoted" if i in (5, 11) else "rejected", at_ms=at + 71_000,
                                model_version=i)]
            if i in (5, 11):
                out.append(TrainingRun(run_id=rid, event="exported", at_ms=at + 90_000, model_version=i))
        out.append(TrainingRun(run_id="trainer", event="heartbeat", at_ms=at + 100_000, training_in_progress=False,
                               last_check_time_ms=at, check_interval_s=1800.0, next_check_in_s=1700.0))
        if i == 13:
            out.append(TrainingRun(run_id="run-011", event="rollback", at_ms=at + 200_000, model_version=5))
    return out


def test_dashboard_served_by_a_real_worker(make_settings: Any, tmp_path: Path) -> None:
    """`tier3 worker` (recorded teacher) serves the page at / and its /status: after 60 example experiences and 3
    poison messages, and 24 training runs' lifecycle events, the charts show the numbers on the topics, with no
    console errors."""
    from schemas import Experience, decode, encode
    from streams.app import changelog_spec
    from streams.sampling import sample_reason
    from streams.settings import StreamsSettings
    from streams.topics import ensure_topics
    from tests.conftest import settings_env
    from tests.kafka_utils import consume_values, produce_values
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
        produce_values(settings, settings.training_runs_topic, [(r.run_id.encode(), encode(r)) for r in many_runs()])
        # what is on the topic, read back from the broker (not from the worker)
        on_topic = [decode(m.value() or b"", TrainingRun)
                    for m in consume_values(settings, settings.training_runs_topic, len(many_runs()), 60)]
        lifecycle = [r for r in on_topic if r.event != "heartbeat"]
        status = worker.wait_for(lambda st: st["counts"]["consumed"] == 63 and st["counts"]["enriched"] == sampled
                                 and st["counts"]["dead_lettered"] == 3
                                 and st["trainer"]["totals"]["events"] == len(lifecycle), timeout_s=90)

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

    # training history: the topic's numbers, after far more than 20 lifecycle events
    run_ids = list(dict.fromkeys(r.run_id for r in lifecycle))
    by_event: dict[str, int] = {}
    for r in lifecycle:
        by_event[r.event] = by_event.get(r.event, 0) + 1
    assert len(run_ids) == 24 and len(lifecycle) > 80
    runs = snap["runs"]
    assert (runs["runs"], runs["events"], runs["rows"]) == (str(len(run_ids)), str(len(lifecycle)), "24")
    assert runs["byEvent"] == by_event
    assert [row[0] for row in runs["table"]] == run_ids  # one row per run, in the topic's order
    for rid, _status, stages in runs["table"]:
        assert stages == list(dict.fromkeys(r.event for r in lifecycle if r.run_id == rid)), rid
    evaluated = sorted({r.model_version for r in lifecycle if r.event == "evaluated" and r.model_version})
    e = snap["evals"]
    assert e["versions"] == str(len(evaluated))
    assert [v for v, _ in e["verdicts"]] == [f"v{v}" for v in evaluated]  # by version number
    verdicts = dict(e["verdicts"])
    assert verdicts["v5"] == "in force" and verdicts["v11"] == "rolled back"  # v11 promoted, then rolled back
    assert {s for v, s in verdicts.items() if v not in ("v5", "v11")} == {"rejected"}
    assert {(v, m) for v, m, _h, _t in e["zeroBars"]} == {(f"v{v}", "exact_match") for v in evaluated}
    assert all(h >= 2 for _v, _m, h, _t in e["zeroBars"])
    assert "runs (all time)24" in snap["trainer"] and "model in forcev5 (run-005)" in snap["trainer"]
