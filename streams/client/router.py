"""The router: which model answers the application's requests (teacher, student, or a sticky A/B split).

The application side of the flywheel (the original system's env toggle between teacher and student, plus A/B):

- **Mode** from ``TIER3_SERVE``: ``teacher`` (default), ``student``, or ``ab`` (a share
  ``TIER3_AB_STUDENT_SHARE`` of users gets the student).
- **Sticky**: the A/B arm is a pure function of a hash of the user id (else the session id): the same user gets
  the same arm in every process and after restarts; raising the share only moves users from teacher to student.
  A request with neither id is assigned by its experience id (not sticky: there is nothing to stick to).
- **Follows promotions live**: a small thread reads ``training-runs`` from the beginning (no consumer group,
  nothing committed) and folds its events with the fold every reader of the log shares (``schemas/runs.py``, the
  gate's too): a promotion puts its run on a stack, a rollback removes its run, the top of the stack is in force.
  With no student in force, ``student`` and ``ab`` serve the teacher (the decision records why).
- **The student** is served through any OpenAI-compatible endpoint (by default ``tier3 serve``: llama-cpp-python's
  server on the exported GGUF, at ``http://127.0.0.1:8088/v1``; Ollama's ``/v1`` or vLLM work too) under the
  model name ``TIER3_STUDENT_MODEL`` (``{version}`` is replaced by the version in force: ``cc-widget-selector:v7``),
  asked in the reasoned format it was trained on; its answer JSON is returned. Before answering with a version,
  the endpoint's ``GET /models`` must list that name (llama-cpp-python answers an unknown name with its default
  model, which would record the wrong version): a version it does not serve is a student failure, so the
  teacher answers with ``metadata.fallback`` saying so. **The teacher** through
  :func:`streams.teachers.make_teacher`.
- **Every served request becomes an experience** published through the capture library, with ``served_by``
  (arm, model, model version), latency, confidence and reward: the flywheel measures itself.

The worker's side (per-arm count / confidence / reward / latency sums in a Faust table over ``experiences``,
shown in /status's ``router`` block) is :mod:`streams.router_stats`, not part of the client library.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, SecretStr

from schemas import ChatMessage, Experience, SchemaError, ServedBy, TrainingRun, decode, get_task
from schemas.runs import RunsFold
from schemas.tasks import parse_json_answer
from streams.client._settings import build_settings
from streams.errors import StreamsError, TeacherError
from streams.settings import StreamsSettings

if TYPE_CHECKING:
    from streams.client.capture import Capture
    from streams.teachers import Teacher

log = logging.getLogger("tier3.router")

ServeMode = Literal["teacher", "student", "ab"]
Arm = Literal["teacher", "student"]
_BUCKETS = float(1 << 64)


class RouterError(StreamsError):
    """The student endpoint failed (the caller may fall back to the teacher)."""

    retryable = True


class RouterSettings(StreamsSettings):
    """The streams settings plus the router's. Field name == environment variable name."""

    tier3_serve: ServeMode = Field("teacher", description="who answers the application: teacher | student | "
                                   "ab (sticky split by user/session id)")
    tier3_ab_student_share: float = Field(0.1, ge=0.0, le=1.0, description="share of users served by the "
                                          "student in ab mode")
    tier3_ab_salt: str = Field("tier3-ab-v1", description="salt of the A/B hash; changing it reshuffles users")
    tier3_student_base_url: str = Field("http://127.0.0.1:8088/v1", description="OpenAI-compatible endpoint "
                                        "serving the student (`tier3 serve`: llama-cpp-python's server; or "
                                        "Ollama's /v1, vLLM); several, comma-separated (`tier3 serve "
                                        "--replicas N`): each call goes to the least busy")
    tier3_student_model: str = Field("cc-widget-selector:v{version}", description="student model name at that "
                                     "endpoint; {version} is replaced by the promoted version in force")
    tier3_student_api_key: SecretStr | None = Field(None, description="API key of the student endpoint (local "
                                                    "servers ignore it; never logged)")
    tier3_student_timeout_s: float = Field(30.0, gt=0, description="timeout of one student call (s)")
    tier3_student_max_tokens: int = Field(512, ge=1, description="max output tokens of one student call")
    tier3_student_verify_model: bool = Field(True, description="call the student only when the endpoint's "
                                             "GET /models lists the version's model name (endpoints without "
                                             "that route are not checked)")
    tier3_student_fallback: bool = Field(True, description="serve the teacher when the student call fails "
                                         "(recorded as a teacher arm with metadata.fallback)")
    tier3_router_follow: bool = Field(True, description="follow promoted/rollback events on training-runs")

    def __init__(self, **values: Any) -> None:
        # the secrets registered and the log filter installed first; a bad combination (TIER3_TEACHER=recorded
        # without TIER3_TEACHER_RECORDED_PATH) is InvalidSettings naming the settings, never pydantic's
        # ValidationError, whose text holds the input (TIER3_STUDENT_API_KEY included)
        build_settings(super().__init__, self, values)


# ----------------------------------------------------------------------------------------------- the split


def ab_bucket(unit_id: str, salt: str = "tier3-ab-v1") -> float:
    """A uniform number in [0, 1) from a hash of the unit id: stable across processes and Python versions."""
    digest = hashlib.sha256(salt.encode() + b"\x00" + unit_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / _BUCKETS


def choose_arm(mode: ServeMode, unit_id: str, share: float, student_available: bool,
               salt: str = "tier3-ab-v1") -> tuple[Arm, str]:
    """(arm, reason). The student arm needs a promoted student; otherwise the teacher serves."""
    if mode == "teacher":
        return "teacher", "mode"
    if not student_available:
        return "teacher", "no_promoted_student"
    if mode == "student":
        return "student", "mode"
    return ("student", "ab") if ab_bucket(unit_id, salt) < share else ("teacher", "ab")


# ----------------------------------------------------------------------------------------------- promotions


@dataclass(frozen=True)
class Promotion:
    run_id: str
    model_version: int | None
    model_name: str | None
    at_ms: int
    prompt_format: str = "reasoning"  # the output format the student learnt last: "answer" or "reasoning"


def promoted_prompt_format(run: TrainingRun) -> str:
    """The prompt format of a promoted run, from the evaluation metrics its ``promoted`` event carries (the
    trainer records the adapter's ``prompt_format`` there); ``reasoning`` when absent (older runs)."""
    metrics = run.details.get("metrics")
    fmt = metrics.get("prompt_format") if isinstance(metrics, dict) else None
    return fmt if fmt in ("answer", "reasoning") else "reasoning"


class PromotionView:
    """Which promoted student is in force: the shared fold of training-runs (``schemas.runs.RunsFold``, the
    gate's), behind a lock (the follower thread applies, request handlers read)."""

    def __init__(self, max_runs: int = 1000) -> None:
        self._lock = threading.Lock()
        self._fold = RunsFold(max_runs=max_runs)
        self.events_seen = 0

    def apply(self, run: TrainingRun) -> None:
        with self._lock:
            self.events_seen += 1
            self._fold.apply(run)

    def apply_all(self, runs: Iterable[TrainingRun]) -> None:
        for r in runs:
            self.apply(r)

    @property
    def current(self) -> Promotion | None:
        with self._lock:
            cur = self._fold.current
        return None if cur is None else Promotion(cur.run_id, cur.model_version, cur.model_name, cur.at_ms,
                                                  promoted_prompt_format(cur))


class PromotionFollower:
    """A daemon thread reading training-runs from the beginning into a :class:`PromotionView`."""

    def __init__(self, settings: StreamsSettings, view: PromotionView) -> None:
        self.settings = settings
        self.view = view
        self.caught_up = threading.Event()  # set once everything up to the start's end of log is applied
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tier3-router-follower", daemon=True)

    def start(self, wait_s: float = 10.0) -> PromotionFollower:
        self._thread.start()
        if not self.caught_up.wait(wait_s):
            log.warning("router: training-runs not read within %.0f s; serving with what is known", wait_s)
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        from confluent_kafka import KafkaException

        from schemas.kafka.follow import TopicFollower

        topic = self.settings.training_runs_topic
        missing_said = False
        # the one follower: catch-up, offset gaps, and reconnects after the retry policy's pause
        follower = TopicFollower(self.settings, topic, "router", missing="wait")
        try:
            while not self._stop.is_set():
                try:
                    records = follower.poll(0.5)
                except KafkaException as exc:
                    log.warning("router: reading training-runs failed (%s); retrying", exc)
                    continue
                if follower.missing and not missing_said:
                    # never created on the side (no auto-creation): say what to run, serve the teacher meanwhile
                    log.warning("router: topic %s does not exist; run `tier3 topics create`. Serving the "
                                "teacher until it does", topic)
                    missing_said = True
                for msg in records:
                    try:
                        self.view.apply(decode(msg.value() or b"", TrainingRun,
                                               max_bytes=self.settings.max_record_bytes))
                    except SchemaError as exc:
                        log.warning("router: skipping bad training-runs record: %s", exc)
                if not self.caught_up.is_set() and follower.caught_up:
                    self.caught_up.set()
        finally:
            follower.close()


# ----------------------------------------------------------------------------------------------- serving


@dataclass(frozen=True)
class Decision:
    arm: Arm
    reason: str  # mode | ab | no_promoted_student | fallback
    model: str
    model_version: str | None
    unit_id: str
    prompt_format: str = "reasoning"  # the student's: it is prompted for the format it learnt

    def served_by(self) -> ServedBy:
        return ServedBy(arm=self.arm, model=self.model[:200], model_version=self.model_version)


@dataclass(frozen=True)
class RoutedReply:
    text: str  # what the application gets: the model's answer
    decision: Decision
    latency_ms: float
    experience: Experience | None  # what was published (None when capture refused it)
    raw_output: str = ""
    published: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class _Endpoint:
    """One student server: its client, its model list (cached) and the calls in flight on it."""

    def __init__(self, base_url: str, key: str, settings: RouterSettings) -> None:
        from streams.openai_client import OpenAIClient

        self.base_url = base_url
        self.client = OpenAIClient(base_url, key, settings.tier3_student_timeout_s, label="student", retries=1)
        self.models: frozenset[str] | None = None  # None: the endpoint has no model list (not checked)
        self.models_at = -math.inf
        self.in_flight = 0


class StudentClient:
    """The student over one or more OpenAI-compatible endpoints (``tier3 serve`` by default; ``tier3 serve
    --replicas N`` and any list of servers in ``TIER3_STUDENT_BASE_URL``, comma-separated), greedy, through
    :class:`streams.openai_client.OpenAIClient` (the teacher's client; one retry of a retryable failure). Each
    call goes to the endpoint with the fewest calls in flight (the first such in the list's rotation), so
    concurrent calls spread over the servers, each of which answers one request at a time; an endpoint that
    fails is skipped for the next one in the same call. The model name is checked against the endpoint's
    ``GET /models`` first (cached for ``MODELS_TTL_S``, re-read on a miss)."""

    MODELS_TTL_S = 5.0

    def __init__(self, settings: RouterSettings) -> None:
        from streams.redaction import register_secret

        if settings.tier3_student_api_key is not None:  # error texts and log records never carry it
            register_secret(settings.tier3_student_api_key, name="TIER3_STUDENT_API_KEY")
        key = settings.tier3_student_api_key.get_secret_value() if settings.tier3_student_api_key else "local"
        urls = [u.strip() for u in settings.tier3_student_base_url.split(",") if u.strip()]
        if not urls:
            raise RouterError("TIER3_STUDENT_BASE_URL names no endpoint")
        self._endpoints = [_Endpoint(u, key, settings) for u in urls]
        self._base_url = ", ".join(urls)
        self._max_tokens = settings.tier3_student_max_tokens
        self._verify = settings.tier3_student_verify_model
        self._turn = 0

    @property
    def endpoints(self) -> list[str]:
        return [e.base_url for e in self._endpoints]

    def _order(self) -> list[_Endpoint]:
        """The endpoints to try, the least busy first (ties broken by a rotation)."""
        n = len(self._endpoints)
        self._turn = (self._turn + 1) % n
        rotated = self._endpoints[self._turn:] + self._endpoints[:self._turn]
        return sorted(rotated, key=lambda e: e.in_flight)

    async def _models_of(self, ep: _Endpoint, refresh: bool = False) -> frozenset[str] | None:
        if refresh or time.monotonic() - ep.models_at > self.MODELS_TTL_S:
            try:
                ep.models = await ep.client.models()
            except TeacherError as exc:
                raise RouterError(f"student endpoint {ep.base_url}: {type(exc).__name__}: {exc}") from None
            ep.models_at = time.monotonic()
        return ep.models

    async def served_models(self, refresh: bool = False) -> frozenset[str] | None:
        """The model names the first endpoint lists (None when it has no ``/models`` route)."""
        return await self._models_of(self._endpoints[0], refresh)

    async def _check_served(self, ep: _Endpoint, model: str) -> None:
        models = await self._models_of(ep)
        if models is not None and model not in models:
            models = await self._models_of(ep, refresh=True)  # a version exported a moment ago
        if models is not None and model not in models:
            raise RouterError(f"student {model} is not served at {ep.base_url} (it serves "
                              f"{', '.join(sorted(models)) or 'nothing'}): start or restart `tier3 serve`")

    async def check_served(self, model: str) -> None:
        for ep in self._endpoints:
            await self._check_served(ep, model)

    async def complete(self, model: str, messages: list[dict[str, str]]) -> str:
        errors: list[RouterError] = []
        for ep in self._order():
            ep.in_flight += 1
            try:
                if self._verify:
                    await self._check_served(ep, model)
                reply = await ep.client.chat(model, messages, max_tokens=self._max_tokens, temperature=0.0)
                return reply.text
            except TeacherError as exc:
                where = f" at {ep.base_url}" if len(self._endpoints) > 1 else ""
                errors.append(RouterError(f"student {model}{where}: {type(exc).__name__}: {exc}"))
            except RouterError as exc:
                errors.append(exc)
            finally:
                ep.in_flight -= 1
        if len(errors) == 1:
            raise errors[0]
        raise RouterError(f"every student endpoint failed: {'; '.join(map(str, errors))}")

    async def aclose(self) -> None:
        for ep in self._endpoints:
            await ep.client.aclose()


class Router:
    """Route requests to the teacher or the promoted student and record every one as an experience.

    ``await router.complete(messages, user_id=...)`` answers; ``router.decide(...)`` only chooses (for
    applications that call the model themselves and then ``router.record(...)``).
    """

    def __init__(self, settings: RouterSettings, *, teacher: Teacher | None = None,
                 student: StudentClient | None = None, capture: Capture | None = None,
                 view: PromotionView | None = None) -> None:
        self.settings = settings
        self._teacher = teacher
        self._student = student
        self._capture = capture
        self._owns_capture = False  # a capture handed in is the caller's to close
        self.view = view or PromotionView()
        self._follower: PromotionFollower | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def start(self, wait_s: float = 10.0) -> Router:
        """Start following training-runs (when enabled) and wait until the promotions so far are known."""
        if self.settings.tier3_router_follow and self._follower is None:
            self._follower = PromotionFollower(self.settings, self.view).start(wait_s)
        return self

    async def aclose(self) -> None:
        if self._follower is not None:
            self._follower.stop()
            self._follower = None
        if self._student is not None:
            await self._student.aclose()
        if self._teacher is not None:
            await self._teacher.aclose()
        if self._capture is not None:
            if self._owns_capture:
                self._capture.close()
            else:
                self._capture.flush()

    @property
    def teacher(self) -> Teacher:
        if self._teacher is None:
            from streams.teachers import make_teacher

            self._teacher = make_teacher(self.settings)
        return self._teacher

    @property
    def student(self) -> StudentClient:
        if self._student is None:
            self._student = StudentClient(self.settings)
        return self._student

    @property
    def capture(self) -> Capture:
        if self._capture is None:
            from streams.client.capture import Capture, CaptureSettings

            self._capture = Capture(CaptureSettings(**self.settings.model_dump()))
            self._owns_capture = True
        return self._capture

    # -- deciding ----------------------------------------------------------------------------------------------
    def student_model(self, version: int | None) -> str:
        return self.settings.tier3_student_model.replace("{version}", str(version))

    def decide(self, *, user_id: str | None = None, session_id: str | None = None,
               experience_id: str | None = None) -> Decision:
        unit = user_id or session_id or experience_id or uuid.uuid4().hex
        current = self.view.current
        arm, reason = choose_arm(self.settings.tier3_serve, unit, self.settings.tier3_ab_student_share,
                                 current is not None, self.settings.tier3_ab_salt)
        if arm == "student" and current is not None:
            return Decision("student", reason, self.student_model(current.model_version),
                            None if current.model_version is None else str(current.model_version), unit,
                            current.prompt_format)
        return Decision("teacher", reason, self.teacher.model, None, unit)

    def status(self) -> dict[str, Any]:
        cur = self.view.current
        return {"mode": self.settings.tier3_serve, "ab_student_share": self.settings.tier3_ab_student_share,
                "promoted_version": cur.model_version if cur else None,
                "promoted_run_id": cur.run_id if cur else None}

    # -- serving -----------------------------------------------------------------------------------------------
    async def complete(self, messages: list[dict[str, str]], *, task: str = "widget_selector",
                       user_id: str | None = None, session_id: str | None = None,
                       experience_id: str | None = None, confidence: float = 0.0, reward: float | None = None,
                       metadata: Mapping[str, str] | None = None) -> RoutedReply:
        """Answer ``messages`` (the production messages, system first) with the chosen arm; publish the
        experience. ``confidence`` is the application's (the streams worker samples > 0.8 always)."""
        experience_id = experience_id or uuid.uuid4().hex
        decision = self.decide(user_id=user_id, session_id=session_id, experience_id=experience_id)
        meta = dict(metadata or {})
        t0 = time.perf_counter()
        raw = ""
        if decision.arm == "student":
            try:
                prompt = get_task(task).messages_for_model(messages, reasoning=decision.prompt_format != "answer")
                raw = await self.student.complete(decision.model, prompt)
                text = _answer_text(raw)
            except RouterError as exc:
                if not self.settings.tier3_student_fallback:
                    raise
                log.warning("router: %s; serving the teacher", exc)
                meta["fallback"] = f"student failed: {exc}"[:500]
                decision = Decision("teacher", "fallback", self.teacher.model, None, decision.unit_id)
        if decision.arm == "teacher":
            reply = await self.teacher.complete(messages)
            raw, text = reply.text, _answer_text(reply.text)
            if reply.model and reply.model != decision.model:
                decision = Decision("teacher", decision.reason, reply.model, None, decision.unit_id)
        latency_ms = (time.perf_counter() - t0) * 1000.0
        exp, ok = self.record(decision, messages, text, task=task, experience_id=experience_id,
                              confidence=confidence, reward=reward, latency_ms=latency_ms, user_id=user_id,
                              session_id=session_id, metadata=meta)
        return RoutedReply(text=text, decision=decision, latency_ms=latency_ms, experience=exp, raw_output=raw,
                           published=ok)

    def record(self, decision: Decision, messages: list[dict[str, str]], response: str, *, task: str,
               experience_id: str, confidence: float, reward: float | None = None, latency_ms: float | None = None,
               user_id: str | None = None, session_id: str | None = None,
               metadata: Mapping[str, str] | None = None) -> tuple[Experience | None, bool]:
        """Publish one served request as an experience with its arm and model version (never raises)."""
        try:
            exp = Experience(
                experience_id=experience_id, task=task, created_at_ms=int(time.time() * 1000),
                messages=[ChatMessage(role=m["role"], content=m["content"]) for m in messages],  # type: ignore[arg-type]
                response=response, served_by=decision.served_by(), confidence=confidence, reward=reward,
                latency_ms=latency_ms, user_id=user_id, session_id=session_id,
                metadata={**dict(metadata or {}), "route_reason": decision.reason})
        except ValueError as exc:  # pydantic's ValidationError: never into the application
            log.warning("router: could not build the experience: %s", exc)
            return None, False
        return exp, self.capture.publish(exp)


def _answer_text(raw: str) -> str:
    """The answer JSON of a reply (the student gives its answer, after its reasoning if it learnt to reason; a
    teacher may add reasoning too), or the raw text when it does not parse: the application gets the answer."""
    try:
        _, value = parse_json_answer(raw)
    except SchemaError:
        return raw
    import orjson

    return orjson.dumps(value).decode()
