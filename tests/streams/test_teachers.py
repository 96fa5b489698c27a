"""Teacher clients against the fake teacher server (OpenAI + Anthropic), a fake Claude CLI, and recorded files."""

from __future__ import annotations

import asyncio
import os
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from schemas import get_task
from streams.errors import (
    RecordedAnswerMissing,
    TeacherConfigError,
    TeacherError,
    TeacherRateLimited,
    TeacherServerError,
    TeacherTimeout,
    TeacherUnavailable,
)
from streams.settings import StreamsSettings
from streams.teachers import RecordedTeacher, RecordingTeacher, make_teacher, prompt_hash
from tests.fakes.teacher_server import FakeTeacherServer, expected_answer

KEY = "sk-test-do-not-log-0123456789"


@pytest.fixture(scope="module")
def server() -> Iterator[FakeTeacherServer]:
    with FakeTeacherServer() as srv:
        yield srv


def messages(q: str = "Why is checkout slow?") -> list[dict[str, str]]:
    task = get_task("widget_selector")
    return task.messages_for_model([{"role": "system", "content": task.system_prompt},
                                    {"role": "user", "content": q}])


def teacher_for(kind: str, server: FakeTeacherServer, **kw: object):  # type: ignore[no-untyped-def]
    base: dict[str, object] = {"tier3_teacher": kind, "tier3_teacher_model": "fake-model",
                               "tier3_teacher_timeout_s": 1.0}
    if kind == "openai":
        base.update(tier3_teacher_base_url=f"{server.url}/v1", openai_api_key=KEY)
    else:
        base.update(tier3_teacher_base_url=server.url, anthropic_api_key=KEY)
    base.update(kw)
    return make_teacher(StreamsSettings(**base))  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_ok_answer_parses_and_key_is_sent(kind: str, server: FakeTeacherServer) -> None:
    server.set_mode("ok")
    t = teacher_for(kind, server)

    async def go():  # type: ignore[no-untyped-def]
        try:
            return await t.complete(messages())
        finally:
            await t.aclose()

    reply = asyncio.run(go())
    _, answer = get_task("widget_selector").parse_output(reply.text)
    assert answer == expected_answer("Why is checkout slow?")
    assert reply.model == "fake-model" and reply.input_tokens and reply.output_tokens
    assert KEY in server.keys_seen


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
@pytest.mark.parametrize(("mode", "exc"), [("429", TeacherRateLimited), ("500", TeacherServerError),
                                          ("hang", TeacherTimeout), ("reset", TeacherUnavailable)])
def test_faults_map_to_retryable_errors_without_the_key(kind: str, mode: str, exc: type[Exception],
                                                        server: FakeTeacherServer) -> None:
    server.set_mode(mode, count=1)
    t = teacher_for(kind, server, tier3_teacher_timeout_s=0.5)

    async def go() -> None:
        try:
            await t.complete(messages())
        finally:
            await t.aclose()

    with pytest.raises(exc) as info:
        asyncio.run(go())
    assert isinstance(info.value, TeacherError) and info.value.retryable
    assert KEY not in str(info.value)
    server.set_mode("ok")


def test_anthropic_without_key_is_a_config_error() -> None:
    with pytest.raises(TeacherConfigError):
        make_teacher(StreamsSettings(tier3_teacher="anthropic", anthropic_api_key=None))


def _fake_cli(tmp_path: Path, body: str) -> Path:
    exe = tmp_path / "claude"
    exe.write_text(f"#!{sys.executable}\n{body}")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return exe


def test_claude_cli_print_mode_json(tmp_path: Path) -> None:
    root = str(Path(__file__).resolve().parents[2])
    exe = _fake_cli(tmp_path, f"sys_path = {root!r}\n" + """
import json, sys
sys.path.insert(0, sys_path)
from tests.fakes.teacher_server import answer_text
args = sys.argv[1:]
assert args[:3] == ["-p", "--output-format", "json"], args
assert "--system-prompt" in args
prompt = sys.stdin.read()
q = prompt.split("\\n\\n")[0]
print(json.dumps({"type": "result", "subtype": "success", "is_error": False, "result": answer_text(q, "ok"),
                  "usage": {"input_tokens": 11, "output_tokens": 22}}))
""")
    t = make_teacher(StreamsSettings(tier3_teacher="claude_cli", tier3_claude_cli_path=str(exe)))
    reply = asyncio.run(t.complete(messages("Which hosts are out of memory?")))
    _, answer = get_task("widget_selector").parse_output(reply.text)
    assert answer == expected_answer("Which hosts are out of memory?")
    assert (reply.input_tokens, reply.output_tokens) == (11, 22)


def test_claude_cli_killed_on_timeout(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    exe = _fake_cli(tmp_path, f"""
import os, subprocess, time
child = subprocess.Popen(["sleep", "60"])
open({str(pids)!r}, "w").write(f"{{os.getpid()}} {{child.pid}}")
time.sleep(60)
""")
    t = make_teacher(StreamsSettings(tier3_teacher="claude_cli", tier3_claude_cli_path=str(exe),
                                     tier3_teacher_timeout_s=1.0))
    t0 = time.monotonic()
    with pytest.raises(TeacherTimeout):
        asyncio.run(t.complete(messages()))
    assert time.monotonic() - t0 < 8
    for pid in map(int, pids.read_text().split()):
        # the CLI and its child are gone (killed as a process group), not orphaned
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            # a zombie child of the CLI is reaped by init; check its state
            try:
                if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                    break
            except OSError:
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"process {pid} survived the timeout")


def test_claude_cli_error_exit(tmp_path: Path) -> None:
    exe = _fake_cli(tmp_path, "import sys\nsys.stderr.write('boom')\nsys.exit(3)\n")
    t = make_teacher(StreamsSettings(tier3_teacher="claude_cli", tier3_claude_cli_path=str(exe)))
    with pytest.raises(TeacherServerError, match="exit code 3"):
        asyncio.run(t.complete(messages()))


def test_record_then_replay(tmp_path: Path, server: FakeTeacherServer) -> None:
    server.set_mode("ok")
    path = tmp_path / "rec.jsonl"
    live = teacher_for("openai", server, tier3_teacher_record_to=path)
    assert isinstance(live, RecordingTeacher)
    qs = [f"question {i}" for i in range(5)]

    async def record() -> list[str]:
        try:
            return [(await live.complete(messages(q))).text for q in qs]
        finally:
            await live.aclose()

    texts = asyncio.run(record())
    rec = make_teacher(StreamsSettings(tier3_teacher="recorded", tier3_teacher_recorded_path=path))
    assert isinstance(rec, RecordedTeacher) and rec.recorded and len(rec) == 5
    async def replay():  # type: ignore[no-untyped-def]
        return await asyncio.gather(*(rec.complete(messages(q)) for q in qs))

    replayed = asyncio.run(replay())
    assert [r.text for r in replayed] == texts
    assert KEY not in path.read_text()
    with pytest.raises(RecordedAnswerMissing):
        asyncio.run(rec.complete(messages("never asked")))
    assert prompt_hash(messages("a")) != prompt_hash(messages("b"))
