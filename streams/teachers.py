"""Teachers behind one interface: the Anthropic Messages API, the Claude CLI, any OpenAI-compatible endpoint, and a
recorded teacher that answers from a JSONL file.

The OpenAI-compatible teacher speaks through :class:`streams.openai_client.OpenAIClient` (httpx; the router's
student uses the same client). Every client
raises :class:`streams.errors.TeacherError` subclasses whose ``retryable`` flag drives the retry
policy in :mod:`streams.enrich`; no client retries on its own (the SDKs' built-in retries are switched off, so
the attempt counts on a trace are true). Messages arrive with the system message first, exactly as production
sent them plus the one output-format instruction (prompt parity, see ``schemas.tasks``).

API keys are read from the settings' ``SecretStr`` fields and handed to the HTTP client only. A server may echo
a key in its error body (some gateways do on 401 / 403): every error text is redacted where it is made
(:mod:`streams.redaction`: the configured secrets, registered by :func:`make_teacher`, and key-shaped strings),
before it is cut to length, so no exception, log line, traceback, dead letter or /status carries a key.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import orjson

from streams.errors import (
    RecordedAnswerMissing,
    TeacherConfigError,
    TeacherError,
    TeacherServerError,
    TeacherTimeout,
    TeacherUnavailable,
)
from streams.openai_client import OpenAIClient, error_for_status
from streams.redaction import redact, register_secrets
from streams.settings import StreamsSettings


@dataclass(frozen=True)
class TeacherReply:
    text: str
    model: str
    input_tokens: int | None
    output_tokens: int | None


class Teacher(Protocol):
    kind: str  # "anthropic" | "claude_cli" | "openai" | "recorded"
    model: str
    recorded: bool

    async def complete(self, messages: list[dict[str, str]]) -> TeacherReply: ...

    async def aclose(self) -> None: ...


def prompt_hash(messages: list[dict[str, str]]) -> str:
    """The key of a prompt in a recorded-teacher file: sha256 of the messages as canonical JSON."""
    canon = orjson.dumps([{"role": m["role"], "content": m["content"]} for m in messages],
                         option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canon).hexdigest()


def _split_system(messages: list[dict[str, str]]) -> tuple[str | None, list[dict[str, str]]]:
    """Separate the system message (Anthropic takes it as ``system=``) and merge adjacent same-role turns.

    Merging keeps the content unchanged, joined by a blank line: the Messages API expects alternating roles.
    """
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system") or None
    turns: list[dict[str, str]] = []
    for m in messages:
        if m["role"] == "system":
            continue
        if turns and turns[-1]["role"] == m["role"]:
            turns[-1] = {"role": m["role"], "content": turns[-1]["content"] + "\n\n" + m["content"]}
        else:
            turns.append({"role": m["role"], "content": m["content"]})
    return system, turns


class AnthropicTeacher:
    """Claude through the Anthropic Messages API (the ``anthropic`` SDK)."""

    kind = "anthropic"
    recorded = False

    def __init__(self, settings: StreamsSettings) -> None:
        import anthropic

        self._anthropic = anthropic
        self.model = settings.tier3_teacher_model
        self._max_tokens = settings.tier3_teacher_max_tokens
        key = settings.anthropic_api_key.get_secret_value() if settings.anthropic_api_key else None
        if not key:
            raise TeacherConfigError("tier3_teacher=anthropic needs ANTHROPIC_API_KEY")
        self._client = anthropic.AsyncAnthropic(api_key=key, base_url=settings.tier3_teacher_base_url,
                                                max_retries=0, timeout=settings.tier3_teacher_timeout_s)

    async def complete(self, messages: list[dict[str, str]]) -> TeacherReply:
        a = self._anthropic
        system, turns = _split_system(messages)
        # no temperature: recent anthropic SDKs no longer accept it on messages.create
        kwargs: dict[str, Any] = {"model": self.model, "max_tokens": self._max_tokens, "messages": turns}
        if system:
            kwargs["system"] = system
        failure: TeacherError | None = None
        try:
            resp = await self._client.messages.create(**kwargs)
        except a.APITimeoutError as exc:
            failure = TeacherTimeout(f"anthropic: {type(exc).__name__}")
        except a.APIConnectionError as exc:
            failure = TeacherUnavailable(f"anthropic: {type(exc).__name__}: {exc}")
        except a.APIStatusError as exc:
            failure = error_for_status(exc.status_code, f"anthropic: {exc.message}")
        if failure is not None:  # raised outside the handler: no __context__ keeps the SDK's error, whose text
            raise failure from None  # quotes the server's answer unredacted (a gateway may echo the key)
        text = "".join(getattr(b, "text", "") for b in resp.content if getattr(b, "type", "") == "text")
        usage = resp.usage
        return TeacherReply(text=text, model=resp.model or self.model,
                            input_tokens=getattr(usage, "input_tokens", None),
                            output_tokens=getattr(usage, "output_tokens", None))

    async def aclose(self) -> None:
        await self._client.close()


class OpenAITeacher:
    """Any OpenAI-compatible chat endpoint (OpenAI, vLLM, Ollama ``/v1``, llama.cpp server), through
    :class:`streams.openai_client.OpenAIClient` (httpx; why not the ``openai`` SDK: see that module)."""

    kind = "openai"
    recorded = False

    def __init__(self, settings: StreamsSettings) -> None:
        self.model = settings.tier3_teacher_model
        self._max_tokens = settings.tier3_teacher_max_tokens
        self._temperature = settings.tier3_teacher_temperature
        key = settings.openai_api_key.get_secret_value() if settings.openai_api_key is not None else None
        # a pooled connection per call in flight, so calls never queue for a connection
        self._client = OpenAIClient(settings.tier3_teacher_base_url or "https://api.openai.com/v1", key,
                                    settings.tier3_teacher_timeout_s, label="openai",
                                    connections=settings.tier3_teacher_concurrency + 4)

    async def complete(self, messages: list[dict[str, str]]) -> TeacherReply:
        r = await self._client.chat(self.model, messages, max_tokens=self._max_tokens,
                                    temperature=self._temperature)
        return TeacherReply(text=r.text, model=r.model, input_tokens=r.input_tokens, output_tokens=r.output_tokens)

    async def aclose(self) -> None:
        await self._client.aclose()


class ClaudeCliTeacher:
    """The original system's path: ``claude -p --output-format json`` as a subprocess.

    The process runs in its own session, so on timeout the whole process group (the CLI and anything it
    started) is killed with SIGKILL and reaped: no orphaned CLI keeps running after its call gave up.
    """

    kind = "claude_cli"
    recorded = False

    def __init__(self, settings: StreamsSettings) -> None:
        self.model = settings.tier3_teacher_model
        self._exe = settings.tier3_claude_cli_path
        self._timeout_s = settings.tier3_teacher_timeout_s

    async def complete(self, messages: list[dict[str, str]]) -> TeacherReply:
        system, turns = _split_system(messages)
        # print mode takes one prompt: the conversation's turns, in order, separated by blank lines
        prompt = "\n\n".join(t["content"] for t in turns)
        argv = [self._exe, "-p", "--output-format", "json", "--model", self.model]
        if system:
            argv += ["--system-prompt", system]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, start_new_session=True)
        except OSError as exc:
            raise TeacherConfigError(f"claude_cli: cannot run {self._exe!r}: {exc.strerror}") from None
        try:
            out, err = await asyncio.wait_for(proc.communicate(prompt.encode()), timeout=self._timeout_s)
        except TimeoutError:
            await _kill_and_reap(proc)
            raise TeacherTimeout(f"claude_cli: no answer in {self._timeout_s:g} s; process killed") from None
        except asyncio.CancelledError:  # the worker is stopping: leave no CLI process behind
            await _kill_and_reap(proc)
            raise
        if proc.returncode != 0:
            raise TeacherServerError(f"claude_cli: exit code {proc.returncode}: "
                                     f"{redact(err.decode(errors='replace')[-100_000:])[-300:]}")
        try:
            doc = orjson.loads(out)
        except orjson.JSONDecodeError:
            raise TeacherServerError("claude_cli: output is not JSON (is --output-format json supported?)") from None
        if doc.get("is_error") or doc.get("subtype", "success") != "success":
            raise TeacherServerError(f"claude_cli: {redact(str(doc.get('result') or doc.get('subtype')))[:300]}")
        usage = doc.get("usage") or {}
        return TeacherReply(text=str(doc.get("result", "")), model=self.model,
                            input_tokens=usage.get("input_tokens"), output_tokens=usage.get("output_tokens"))

    async def aclose(self) -> None:
        return None


async def _kill_and_reap(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL the CLI's process group (it runs in its own session) and wait for it, so nothing is orphaned."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(proc.wait(), timeout=5.0)


class RecordedTeacher:
    """Answers from a JSONL file of earlier teacher outputs, keyed by :func:`prompt_hash`.

    Each line: ``{"prompt_hash": ..., "text": ..., "model": ..., "input_tokens": ..., "output_tokens": ...}``
    (what :class:`RecordingTeacher` writes). Every trace it makes says ``recorded: true``.
    """

    kind = "recorded"
    recorded = True

    def __init__(self, path: Path, model: str | None = None) -> None:
        self._answers: dict[str, dict[str, Any]] = {}
        try:
            lines = path.read_bytes().splitlines()
        except OSError as exc:
            raise TeacherConfigError(f"recorded teacher: cannot read {path}: {exc.strerror}") from None
        models: set[str] = set()
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = orjson.loads(line)
                self._answers[str(rec["prompt_hash"])] = rec
                models.add(str(rec.get("model", "")))
            except (orjson.JSONDecodeError, KeyError, TypeError):
                raise TeacherConfigError(f"recorded teacher: {path}:{n} is not a recorded answer") from None
        self.model = model or (models.pop() if len(models) == 1 else "recorded")

    def __len__(self) -> int:
        return len(self._answers)

    async def complete(self, messages: list[dict[str, str]]) -> TeacherReply:
        rec = self._answers.get(prompt_hash(messages))
        if rec is None:
            raise RecordedAnswerMissing("recorded teacher: no recorded output for this prompt")
        return TeacherReply(text=str(rec["text"]), model=str(rec.get("model") or self.model),
                            input_tokens=rec.get("input_tokens"), output_tokens=rec.get("output_tokens"))

    async def aclose(self) -> None:
        return None


class RecordingTeacher:
    """Wraps a live teacher and appends each of its replies to a JSONL file (the input of a RecordedTeacher)."""

    recorded = False

    def __init__(self, inner: Teacher, path: Path) -> None:
        self._inner = inner
        self.kind = inner.kind
        self.model = inner.model
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("ab")

    async def complete(self, messages: list[dict[str, str]]) -> TeacherReply:
        reply = await self._inner.complete(messages)
        rec = {"prompt_hash": prompt_hash(messages), "text": reply.text, "model": reply.model,
               "input_tokens": reply.input_tokens, "output_tokens": reply.output_tokens,
               "recorded_at_ms": int(time.time() * 1000)}
        self._file.write(orjson.dumps(rec) + b"\n")  # one write per line: lines never interleave
        self._file.flush()
        return reply

    async def aclose(self) -> None:
        self._file.close()
        await self._inner.aclose()


def make_teacher(settings: StreamsSettings) -> Teacher:
    """The teacher named by ``settings.tier3_teacher`` (wrapped to record its outputs when asked)."""
    register_secrets(settings)  # from now on, error texts never carry these values
    teacher: Teacher
    kind = settings.tier3_teacher
    if kind == "anthropic":
        teacher = AnthropicTeacher(settings)
    elif kind == "openai":
        teacher = OpenAITeacher(settings)
    elif kind == "claude_cli":
        teacher = ClaudeCliTeacher(settings)
    elif kind == "recorded":
        assert settings.tier3_teacher_recorded_path is not None  # checked by the settings validator
        return RecordedTeacher(settings.tier3_teacher_recorded_path)
    else:  # pragma: no cover - the settings type allows nothing else
        raise TeacherConfigError(f"unknown teacher {kind!r}")
    if settings.tier3_teacher_record_to is not None:
        teacher = RecordingTeacher(teacher, settings.tier3_teacher_record_to)
    return teacher
