"""Real serving: the exported GGUF of a trained student behind llama-cpp-python's OpenAI-compatible server.

No stand-in: ``tier3 export`` writes the GGUF, ``tier3 serve`` starts ``python -m llama_cpp.server`` on
127.0.0.1 (a free port), the router's student arm generates through it, and ``tier3 eval --served`` scores the
exported model through a server of its own.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import IO

import httpx
import pytest

from schemas import Experience, TrainingRun, decode, get_task
from streams.client.router import Router, RouterSettings
from tests.close_loop.conftest import ROOT, TrainedRun
from tests.conftest import settings_env
from tests.fakes.teacher_server import FakeTeacherServer
from tests.kafka_utils import consume_values, inject_run_events
from trainer.close_loop.export import export_run, inference_chat_template
from trainer.close_loop.serve import chat_generator, models_to_serve
from trainer.close_loop.settings import CloseLoopSettings
from trainer.errors import ServeError
from trainer.events import now_ms, read_run_events

TASK = get_task("widget_selector")


def _read_announcement(out: IO[str], proc: subprocess.Popen[str], timeout_s: float) -> dict[str, object]:
    """The JSON object `tier3 serve` prints once the server answers (indented: read up to the closing brace)."""
    deadline = time.monotonic() + timeout_s
    lines: list[str] = []
    while time.monotonic() < deadline:
        line = out.readline()
        if not line:
            if proc.poll() is not None:
                err = proc.stderr.read() if proc.stderr else ""
                raise AssertionError(f"tier3 serve exited {proc.returncode}: {err}")
            time.sleep(0.1)
            continue
        lines.append(line)
        if line.rstrip() == "}":
            return json.loads("".join(lines))  # type: ignore[no-any-return]
    raise AssertionError(f"tier3 serve did not announce within {timeout_s} s: {''.join(lines)}")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python (the `serve` extra, also in `dev`) is not installed")
def test_exported_gguf_served_by_llama_cpp_answers_the_router_and_eval(
        trained_run: TrainedRun, make_settings: Callable[..., CloseLoopSettings]) -> None:
    s = make_settings(cls=CloseLoopSettings, tier3_student_name="cc-ws", tier3_ollama_host="http://127.0.0.1:9",
                      tier3_eval_max_examples=4, tier3_eval_max_new_tokens=32, tier3_serve_threads=2)
    run_id = trained_run.install(s.runs_dir, model_version=3)
    res = export_run(s, run_id)  # merge + GGUF f16/q8_0 + the exported event
    template = (res.merged_dir / "chat_template.jinja")
    if template.is_file():  # the served template is plain Jinja: no training-only {% generation %} markers
        assert "generation" not in template.read_text().replace("add_generation_prompt", "")
    inject_run_events(s, [TrainingRun(run_id=run_id, event="promoted", at_ms=now_ms(), model_version=3)])
    models = models_to_serve(s, read_run_events(s))
    assert [(m.alias, m.version, str(m.gguf)) for m in models] == [("cc-ws:v3", 3, res.files["q8_0"]["path"])]

    env = {**settings_env(s), "TIER3_RUNS_DIR": str(s.runs_dir), "TIER3_SERVE_PORT": "0",
           "TIER3_SERVE_THREADS": "2"}
    serve = subprocess.Popen([sys.executable, "-m", "tier3", "serve", "--poll-s", "1"], cwd=ROOT,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        assert serve.stdout is not None
        ann = _read_announcement(serve.stdout, serve, 240)
        base_url = str(ann["base_url"])
        assert ann["default"] == "cc-ws:v3" and ann["models"] == {"cc-ws:v3": res.files["q8_0"]["path"]}
        listed = httpx.get(f"{base_url}/models", timeout=10).json()
        assert [d["id"] for d in listed["data"]] == ["cc-ws:v3"]

        with FakeTeacherServer() as teacher:
            rs = make_settings(cls=RouterSettings, create_topics=False, tier3_topic_prefix=s.tier3_topic_prefix,
                               tier3_serve="student", tier3_student_base_url=base_url,
                               tier3_student_model="cc-ws:v{version}", tier3_student_max_tokens=24,
                               tier3_student_timeout_s=120.0, tier3_teacher="openai",
                               tier3_teacher_model="teacher-model", tier3_teacher_base_url=f"{teacher.url}/v1",
                               openai_api_key="k")
            router = Router(rs).start()  # follows training-runs: v3 is in force
            q = [{"role": "system", "content": TASK.system_prompt},
                 {"role": "user", "content": "which widgets for checkout latency?"}]

            async def scenario() -> tuple[object, object]:
                served = await router.complete(q, user_id="u1", experience_id="e-served", confidence=0.5)
                # a version the server does not list is not answered under its name: the teacher serves, saying why
                router.view.apply(TrainingRun(run_id="run-x", event="promoted", at_ms=now_ms(), model_version=9))
                missing = await router.complete(q, user_id="u1", experience_id="e-missing", confidence=0.5)
                await router.aclose()
                return served, missing

            served, missing = asyncio.run(scenario())
        assert served.decision.arm == "student" and served.decision.model == "cc-ws:v3"  # type: ignore[attr-defined]
        # the server answered (greedy, no repeat penalty: the tiny model may end its turn at once, so the text
        # itself can be empty); the student arm did not fall back to the teacher
        assert served.raw_output is not None and served.decision.reason == "mode"  # type: ignore[attr-defined]
        assert "fallback" not in served.experience.metadata  # type: ignore[attr-defined]
        assert missing.decision.reason == "fallback"  # type: ignore[attr-defined]
        assert "cc-ws:v9 is not served" in missing.experience.metadata["fallback"]  # type: ignore[attr-defined]

        # what the router got is what the real server generates for that prompt (greedy, deterministic)
        direct = chat_generator(base_url, "cc-ws:v3", 24)(TASK.messages_for_model(q, reasoning=True))
        assert direct[1] > 0 and direct[2] > 0
        assert served.raw_output == direct[0]  # type: ignore[attr-defined]

        exps = {e.experience_id: e for e in (decode(m.value() or b"", Experience) for m in
                                            consume_values(s, s.experiences_topic, expected=2))}
        assert (exps["e-served"].served_by.arm, exps["e-served"].served_by.model_version) == ("student", "3")
        assert exps["e-served"].served_by.model == "cc-ws:v3"
        assert exps["e-missing"].served_by.arm == "teacher"

        # SIGTERM stops `tier3 serve` and the llama.cpp server it started (the port closes)
        os.kill(serve.pid, signal.SIGTERM)
        assert serve.wait(30) == 0
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{base_url}/models", timeout=2)
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait(10)

    # `tier3 eval --served`: the exported GGUF through a server of its own, recorded as such
    proc = subprocess.run([sys.executable, "-m", "tier3", "eval", run_id, "--served"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    m = json.loads(proc.stdout)["metrics"]
    assert m["n_examples"] == 4 and m["latency_ms_p50"] > 0 and m["model"] == "gguf-q8_0"
    from trainer.manifest import read_manifest

    via = read_manifest(s.runs_dir / run_id).metrics["served_evaluation"]["evaluated_via"]
    assert via["gguf"] == res.files["q8_0"]["path"] and via["quant"] == "q8_0"
    assert via["gguf_sha256"] == res.files["q8_0"]["sha256"]


def test_nothing_exported_is_a_clear_error(make_settings: Callable[..., CloseLoopSettings]) -> None:
    s = make_settings(cls=CloseLoopSettings)
    with pytest.raises(ServeError, match="no exported student"):
        models_to_serve(s, read_run_events(s))
    with pytest.raises(ServeError, match=r"version\(s\) \[2\]"):
        models_to_serve(s, [], versions=[2])


def test_generation_markers_become_plain_jinja() -> None:
    import jinja2

    t = ("{%- for m in messages %}{%- if m['role'] == 'assistant' %}{%- generation %}{{ m['content'] }}"
         "{%- endgeneration %}{%- else %}{{ m['content'] }}{%- endif %}{%- endfor %}")
    plain = inference_chat_template(t)
    assert "generation" not in plain
    msgs = [{"role": "user", "content": "q "}, {"role": "assistant", "content": " a"}]
    assert jinja2.Environment().from_string(plain).render(messages=msgs) == "q  a"
    with pytest.raises(jinja2.TemplateSyntaxError):
        jinja2.Environment().from_string(t)  # what a plain-Jinja server would have hit
