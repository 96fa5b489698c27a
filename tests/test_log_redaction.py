"""A canary key set as every secret setting never shows: not in any log record of any logger at DEBUG (httpx's and
httpcore's response headers, the SDKs' lines), not in an exception's text, chain or traceback, not in a command's
output, neither as itself nor base64-encoded (standard / URL-safe, padded or not) nor masked (``sk-CANAR…7890``).

The server the client library talks to answers 401 and echoes the key it was sent in its body and in response
headers, in all those forms, as some gateways do.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from schemas import TrainingRun
from schemas.runtime.redaction import (
    LOG_FILTER,
    MAX_UNNAMED,
    REDACTED,
    install_log_redaction,
    is_secret_name,
    redact,
    register_secret,
    registered_count,
)
from schemas.settings import KafkaSettings
from streams.errors import InvalidSettings, StreamsError

ROOT = Path(__file__).resolve().parent.parent
#: key-shaped (caught by pattern too) and not (only its registration as a secret setting redacts it)
CANARIES = ["sk-CANARY-0123456789abcdef7890", "tier3CANARYq0123456789abcdefZ7890"]
#: every setting that holds a secret (tests/test_cli_errors.py keeps that list complete), and the teacher's key
SECRET_SETTINGS = ["ANTHROPIC_API_KEY", "OPENAI_API_KEY", "TIER3_STUDENT_API_KEY", "TIER3_TEACHER_API_KEY",
                   "KAFKA_SASL_PASSWORD", "KAFKA_SSL_KEY_PASSWORD", "TIER3_BROKER_ADMIN_PASSWORD"]
THIRD_PARTY = ["httpx", "httpcore", "openai", "anthropic", "aiokafka", "faust", "urllib3", "mode"]
TASK_SYSTEM = "You select dashboard widgets."


def forms(key: str) -> dict[str, str]:
    """The key as a leak may show it."""
    raw = key.encode()
    return {"raw": key,
            "b64": base64.b64encode(raw).decode(), "b64_nopad": base64.b64encode(raw).decode().rstrip("="),
            "b64url": base64.urlsafe_b64encode(raw).decode(),
            "b64url_nopad": base64.urlsafe_b64encode(raw).decode().rstrip("="),
            "basic": base64.b64encode(b"user:" + raw).decode(),
            "masked": f"{key[:8]}\u2026{key[-4:]}", "masked_dots": f"{key[:5]}...{key[-2:]}",
            "masked_stars": f"{key[:6]}****{key[-4:]}"}


def leaks(text: str, key: str) -> list[str]:
    return [name for name, form in forms(key).items() if form in text]


# ----------------------------------------------------------------------------------------------- a 401 server


class EchoKeyServer:
    """Answers every request 401, echoing the key it was sent (body and headers, in every form)."""

    def __init__(self) -> None:
        self.keys_seen: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                if length:
                    self.rfile.read(length)
                key = (self.headers.get("x-api-key") or self.headers.get("authorization") or "")
                key = key.removeprefix("Bearer ").strip()
                outer.keys_seen.append(key)
                f = forms(key or "none")
                message = (f"Incorrect API key provided: {key}. Encoded: {f['b64']} {f['b64url_nopad']}; "
                           f"shown as {f['masked']} or {f['masked_dots']}; basic {f['basic']}")
                body = json.dumps({"type": "error", "error": {"type": "authentication_error",
                                                              "message": message, "code": "invalid_api_key"}})
                data = body.encode()
                self.send_response(401)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.send_header("x-echo-key", key)
                self.send_header("x-echo-key-b64", f["b64"])
                self.send_header("x-echo-key-b64url", f["b64url_nopad"])
                self.send_header("x-echo-key-masked", f["masked_dots"])
                self.send_header("x-echo-key-stars", f["masked_stars"])
                self.send_header("www-authenticate", f"Basic realm=\"{f['basic']}\"")
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> EchoKeyServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def echo_server() -> Iterator[EchoKeyServer]:
    with EchoKeyServer() as srv:
        yield srv


@pytest.fixture(params=CANARIES, ids=["key-shaped", "not-key-shaped"])
def canary(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every secret setting holds the canary; no other tier3 setting of the caller's."""
    for name in list(os.environ):
        if name.startswith(("TIER3_", "KAFKA_", "ANTHROPIC_", "OPENAI_")):
            monkeypatch.delenv(name)
    key = str(request.param)
    for name in SECRET_SETTINGS:
        monkeypatch.setenv(name, key)
    return key


@pytest.fixture
def all_debug(caplog: pytest.LogCaptureFixture) -> Iterator[io.StringIO]:
    """Every logger at DEBUG; what a plain handler on the root logger writes (tracebacks included)."""
    caplog.set_level(logging.DEBUG)
    for name in THIRD_PARTY:
        caplog.set_level(logging.DEBUG, logger=name)
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield out
    finally:
        root.removeHandler(handler)


def _exception_texts(exc: BaseException) -> str:
    texts = []
    seen: BaseException | None = exc
    while seen is not None:
        texts += [str(seen), repr(seen), repr(seen.args)]
        seen = seen.__cause__ or seen.__context__
    return "\n".join([*texts, "".join(traceback.format_exception(exc))])


# ----------------------------------------------------------------------------------------------- the registry


def test_secret_names_and_a_bounded_registry() -> None:
    for name in [*SECRET_SETTINGS, "HF_TOKEN", "TIER3_X_SECRET", "db_passwd"]:
        assert is_secret_name(name), name
    for name in ["TIER3_TEACHER_MAX_TOKENS", "TOKENIZERS_PARALLELISM", "TIER3_SECRETS_DIR", "KAFKA_SASL_USERNAME"]:
        assert not is_secret_name(name), name
    n = registered_count()
    register_secret("first-value-of-a-setting-0001", name="TIER3_TEST_REDACTION_API_KEY")
    register_secret("second-value-of-a-setting-0002", name="tier3_test_redaction_api_key")  # replaces it
    assert registered_count() == n + 1
    assert redact("second-value-of-a-setting-0002") == REDACTED
    assert redact("first-value-of-a-setting-0001") == "first-value-of-a-setting-0001"  # forgotten
    register_secret(None, name="TIER3_TEST_REDACTION_API_KEY")
    assert registered_count() == n
    for i in range(3 * MAX_UNNAMED):
        register_secret(f"unnamed-value-{i:04d}-xyz")
    assert registered_count() <= n + MAX_UNNAMED


@pytest.mark.parametrize("key", CANARIES)
def test_every_form_of_a_registered_secret_is_redacted(key: str) -> None:
    register_secret(key, name="TIER3_TEST_FORMS_API_KEY")
    try:
        for name, form in forms(key).items():
            text = f"header x-echo: {form}; and \"{form}\", ok"
            out = redact(text)
            assert leaks(out, key) == [], (name, out)
            assert out.startswith("header x-echo: [REDACTED]; and \"[REDACTED]\", ok"), (name, out)
        # a prefix and a suffix that are not the secret's, and ordinary text, stay
        plain = "sk-OTHER\u2026zzzz, wait... what*, dXNlcm5hbWU= task-selector-with-a-long-name"
        assert redact(plain) == plain
    finally:
        register_secret(None, name="TIER3_TEST_FORMS_API_KEY")


def test_the_filter_redacts_args_exceptions_and_third_party_records(canary: str, all_debug: io.StringIO,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    install_log_redaction()
    assert LOG_FILTER in logging.getLogger().filters
    f = forms(canary)
    for name in THIRD_PARTY:
        logging.getLogger(name).debug("response headers: %s", [(b"x-echo-key", f["raw"].encode()),
                                                                ("x-b64", f["b64"]), ("x-m", f["masked"])])
    try:
        raise RuntimeError(f"gateway said: {f['raw']} / {f['b64url_nopad']} / {f['masked_dots']}")
    except RuntimeError:
        logging.getLogger("tier3.test").exception("call failed with key %s", f["basic"])
    text = all_debug.getvalue() + caplog.text
    assert "RuntimeError" in text and "httpcore: response headers" in text and REDACTED in text
    assert leaks(text, canary) == []
    assert all(canary not in str(r.msg) and not r.args and r.exc_info is None for r in caplog.records)


# ----------------------------------------------------------------------------------------------- client library


def test_bad_router_settings_name_the_settings_never_a_value(canary: str, all_debug: io.StringIO,
                                                             caplog: pytest.LogCaptureFixture,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from streams.client import CaptureSettings, Router, RouterSettings

    monkeypatch.setenv("TIER3_TEACHER", "recorded")  # and no TIER3_TEACHER_RECORDED_PATH
    with pytest.raises(InvalidSettings) as info:
        Router(RouterSettings())
    err = info.value
    assert isinstance(err, StreamsError) and isinstance(err, ValueError)
    assert "TIER3_TEACHER_RECORDED_PATH" in str(err) and "TIER3_TEACHER" in str(err)
    assert err.__cause__ is None and err.__context__ is None
    texts = _exception_texts(err)
    assert leaks(texts, canary) == [], texts
    logging.getLogger("app").exception("could not build the router: %s", err, exc_info=err)
    assert LOG_FILTER in logging.getLogger().filters  # the client library installed it

    # a value given in code, out of range, next to the secrets given in code
    with pytest.raises(InvalidSettings) as info2:
        CaptureSettings(tier3_capture_linger_ms=-5, kafka_sasl_password=canary, kafka_ssl_key_password=canary)
    assert "TIER3_CAPTURE_LINGER_MS" in str(info2.value) and "-5" not in str(info2.value)
    assert leaks(_exception_texts(info2.value), canary) == []
    assert leaks(all_debug.getvalue() + caplog.text, canary) == []


@pytest.mark.parametrize("teacher", ["openai", "anthropic"])
def test_router_against_a_key_echoing_server_logs_no_key(teacher: str, canary: str, echo_server: EchoKeyServer,
                                                         all_debug: io.StringIO,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    from streams.client import Capture, CaptureSettings, Router, RouterSettings
    from streams.client.router import PromotionView

    settings = RouterSettings(
        tier3_serve="student", tier3_teacher=teacher, tier3_teacher_model="teacher-model",
        tier3_teacher_base_url=f"{echo_server.url}/v1" if teacher == "openai" else echo_server.url,
        tier3_teacher_timeout_s=5.0, tier3_student_base_url=f"{echo_server.url}/v1", tier3_student_timeout_s=5.0,
        tier3_router_follow=False)
    view = PromotionView()
    view.apply(TrainingRun(run_id="r1", event="promoted", at_ms=1, model_version=1))
    router = Router(settings, view=view, capture=Capture(CaptureSettings(enable_tier3_capture=False)))
    messages = [{"role": "system", "content": TASK_SYSTEM}, {"role": "user", "content": "cpu of checkout?"}]

    async def go() -> None:
        try:
            await router.complete(messages, user_id="u1")
        finally:
            await router.aclose()

    with pytest.raises(StreamsError) as info:  # the student failed (logged), then the teacher refused the key
        asyncio.run(go())
    assert canary in echo_server.keys_seen  # the key was sent, and echoed back in every form
    logs = all_debug.getvalue() + caplog.text
    assert "x-echo-key" in logs.lower()  # httpcore's (and the SDK's) DEBUG lines printed the response headers
    assert "serving the teacher" in logs and REDACTED in logs
    assert leaks(logs, canary) == [], [line for line in logs.splitlines() if leaks(line, canary)][:5]
    assert leaks(_exception_texts(info.value), canary) == []


# ----------------------------------------------------------------------------------------------- commands


def _cli_env(canary: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TIER3_", "KAFKA_", "ANTHROPIC_", "OPENAI_"))}
    return {**env, **{name: canary for name in SECRET_SETTINGS}, "PYTHONPATH": str(ROOT), "COLUMNS": "200",
            "PYTHONUNBUFFERED": "1", **extra}


@pytest.mark.parametrize("key", CANARIES[:1])
def test_cli_settings_error_at_debug_shows_no_key(key: str, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "tier3", "worker", "--loglevel", "debug"], cwd=ROOT,
                          env=_cli_env(key, TIER3_TEACHER="recorded", TIER3_DATA_DIR=str(tmp_path)),
                          capture_output=True, text=True, timeout=120)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text
    assert "TIER3_TEACHER_RECORDED_PATH" in proc.stderr and "Traceback" not in text
    assert leaks(text, key) == [], text


@pytest.mark.parametrize("teacher", ["anthropic", "openai"])
def test_worker_at_debug_against_a_key_echoing_teacher_shows_no_key(teacher: str, kafka_bootstrap: str,
                                                                     echo_server: EchoKeyServer,
                                                                     tmp_path: Path) -> None:
    """``tier3 worker --loglevel debug``: Faust's, aiokafka's, httpx's / the SDK's DEBUG lines, the 401 from a
    teacher that echoes the key in its body and headers, the dead letter it makes: no form of the key."""
    from streams.client import Capture, CaptureSettings
    from streams.topics import ensure_topics
    from tests.streams.helpers import make_experience

    key = CANARIES[1] if teacher == "anthropic" else CANARIES[0]
    prefix = f"redact{uuid.uuid4().hex[:8]}."
    ensure_topics(KafkaSettings(kafka_bootstrap_servers=kafka_bootstrap, tier3_topic_prefix=prefix,
                                tier3_partitions=1))
    base_url = f"{echo_server.url}/v1" if teacher == "openai" else echo_server.url
    env = _cli_env(key, KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap, TIER3_TOPIC_PREFIX=prefix, TIER3_PARTITIONS="1",
                   TIER3_DATA_DIR=str(tmp_path / "data"), TIER3_TEACHER=teacher,
                   TIER3_TEACHER_MODEL="teacher-model", TIER3_TEACHER_BASE_URL=base_url,
                   TIER3_TEACHER_TIMEOUT_S="5", TIER3_WEB_PORT=str(_free_port()), TIER3_SAMPLE_RATE="1.0")
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "tier3", "worker", "--loglevel", "debug"], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        cap = Capture(CaptureSettings(kafka_bootstrap_servers=kafka_bootstrap, tier3_topic_prefix=prefix))
        assert cap.publish(make_experience(1, 0.95, prefix=f"redact-{teacher}"))
        cap.close()
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and not echo_server.keys_seen and proc.poll() is None:
            time.sleep(0.5)
        time.sleep(3.0)  # the 401's log lines and dead letter
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait(10)
    text = log_path.read_text(errors="replace")
    assert key in echo_server.keys_seen, text[-4000:]
    assert "DEBUG" in text and "401" in text, text[-4000:]
    assert "x-echo-key" in text.lower() and REDACTED in text, text[-4000:]  # the headers were logged, redacted
    bad = [line for line in text.splitlines() if leaks(line, key)]
    assert bad == [], bad[:5]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
