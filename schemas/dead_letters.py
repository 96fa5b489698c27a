"""Dead letters that always fit: the original bytes are kept up to what the record limit leaves room for.

A dead letter is written for a message that could not be processed; if the dead letter itself were refused by the
broker (too large), the message could be neither processed nor set aside, and its partition would stop. So
:func:`make_dead_letter` measures the encoded letter without the original and keeps as much of the original
(base64, 4/3 larger) as the remaining room allows: whole when it fits, else a prefix plus ``original_size``,
``original_sha256`` and the source coordinates, enough to re-drive it from the source topic while that retains it.
:func:`metadata_only` drops the original altogether (the fallback when a write is refused anyway).
"""

from __future__ import annotations

import base64
import hashlib
import time

from schemas.codec import encode
from schemas.messages import DeadLetter, DeadLetterStage

#: a message key longer than this is kept as a prefix in ``key_b64`` (keys are ids, not payloads)
MAX_KEY_BYTES = 1024
MAX_REASON_CHARS = 10_000
#: room left unused below the limit (the letter is measured exactly; this covers the one field that changes)
_MARGIN = 64


def make_dead_letter(raw: bytes, *, stage: DeadLetterStage, error_kind: str, reason: str, max_bytes: int,
                     source_topic: str | None = None, source_partition: int | None = None,
                     source_offset: int | None = None, key: bytes | None = None, experience_id: str | None = None,
                     attempts: int = 1, failed_at_ms: int | None = None) -> DeadLetter:
    """A dead letter for ``raw`` whose encoding is at most ``max_bytes`` (the original cut to fit if needed)."""
    key_cut = key is not None and len(key) > MAX_KEY_BYTES
    base = DeadLetter(
        stage=stage, reason=reason[:MAX_REASON_CHARS], error_kind=error_kind[:200],
        failed_at_ms=failed_at_ms if failed_at_ms is not None else int(time.time() * 1000),
        source_topic=source_topic, source_partition=source_partition, source_offset=source_offset,
        key_b64=base64.b64encode(key[:MAX_KEY_BYTES]).decode() if key is not None else None,
        original_b64="", experience_id=experience_id, attempts=attempts, original_size=len(raw),
        original_sha256=hashlib.sha256(raw).hexdigest(), original_truncated=True)
    room = max_bytes - len(encode(base)) - _MARGIN
    keep = max(0, room // 4 * 3)  # base64: 4 characters per 3 bytes
    whole = len(raw) <= keep
    dl = base.model_copy(update={"original_b64": base64.b64encode(raw if whole else raw[:keep]).decode(),
                                 "original_truncated": key_cut or not whole})
    if len(encode(dl)) > max_bytes:  # cannot happen with the measurement above; never write an oversize letter
        return metadata_only(dl)
    return dl


def metadata_only(dl: DeadLetter, note: str = "") -> DeadLetter:
    """``dl`` without the original bytes (the sha256, size and source coordinates stay): the smallest letter."""
    reason = f"{dl.reason} [{note}]" if note else dl.reason
    return dl.model_copy(update={"original_b64": "", "original_truncated": True,
                                 "reason": reason[:MAX_REASON_CHARS]})


def is_complete(dl: DeadLetter) -> bool:
    """True when ``dl`` carries its whole original (re-drivable from the dead letter itself)."""
    return not dl.original_truncated


__all__ = ["MAX_KEY_BYTES", "is_complete", "make_dead_letter", "metadata_only"]
