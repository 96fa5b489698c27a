"""One exception root for streams/. Leaves say what failed and whether a retry can help."""

from __future__ import annotations

from schemas.runtime.preflight import UserError
from streams.redaction import redact


class StreamsError(Exception):
    """Root of every error raised by ``streams``."""

    retryable = False


class InvalidSettings(StreamsError, UserError, ValueError):
    """The client library's settings refused their values: one line per bad setting, naming the setting and the
    reason, never a value (``str()`` / ``repr()`` carry no input, and it chains no pydantic error that would).

    A :class:`schemas.runtime.preflight.UserError` too (a command prints its one line and exits 2), and a ``ValueError``
    (what pydantic's ``ValidationError`` was, for callers that caught that)."""


class CaptureError(StreamsError):
    """An experience handed to ``publish()`` is invalid (raised only in strict mode)."""


class TeacherError(StreamsError):
    """A teacher call failed. ``retryable`` says whether the same call may succeed later."""

    #: a short stable word for dead letters and metrics
    kind = "teacher"

    def __init__(self, message: str, *, retryable: bool | None = None, status: int | None = None) -> None:
        # redacted at the source: an error text may quote a server's answer, and some echo the API key
        super().__init__(redact(message))
        if retryable is not None:
            self.retryable = retryable
        self.status = status


class TeacherRateLimited(TeacherError):
    """HTTP 429 / overloaded: back off and retry."""

    kind = "rate_limited"
    retryable = True


class TeacherServerError(TeacherError):
    """HTTP 5xx: back off and retry."""

    kind = "server_error"
    retryable = True


class TeacherTimeout(TeacherError):
    """The call passed its timeout (a Claude CLI process is killed first)."""

    kind = "timeout"
    retryable = True


class TeacherUnavailable(TeacherError):
    """The teacher could not be reached (connection refused, reset, DNS)."""

    kind = "unavailable"
    retryable = True


class TeacherBadRequest(TeacherError):
    """The teacher rejected this request (HTTP 400 / 413 / 422): retrying the same prompt cannot help."""

    kind = "bad_request"
    retryable = False


class TeacherConfigError(TeacherError):
    """Wrong key, model or URL (HTTP 401 / 403 / 404): every call would fail, so the worker stops."""

    kind = "config"
    retryable = False


class InvalidTeacherOutput(TeacherError):
    """The teacher answered, but not in the format or not in the task's answer schema; another try may work."""

    kind = "invalid_answer"
    retryable = True


class UnsafeTeacherOutput(TeacherError):
    """The teacher's output holds the format's tags or a chat-template special token where it must not
    (``schemas.tasks``, untrusted text): dead-lettered at once, never trained on."""

    kind = "unsafe_text"
    retryable = False


class RecordedAnswerMissing(TeacherError):
    """The recorded teacher has no output for this prompt."""

    kind = "not_recorded"
    retryable = False
