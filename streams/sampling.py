"""Which experiences go to the teacher: a pure, deterministic function (docs/design.md, "Sampling is deterministic").

The original system sampled 15 % at random plus every experience with confidence > 0.8. tier3 keeps the rule
but replaces ``random()`` with a hash of ``experience_id``: every process, every replay and every re-delivery
after a crash picks the same experiences, so a replayed log rebuilds the same dataset.
"""

from __future__ import annotations

import hashlib
from typing import Literal

SampleReason = Literal["random", "high_confidence", "shadow"]

_SCALE = float(1 << 64)


def hash_fraction(experience_id: str) -> float:
    """A uniform number in [0, 1) from ``experience_id``: the first 8 bytes of BLAKE2b, big-endian.

    BLAKE2b rather than Python's ``hash()``: the latter is salted per process (PYTHONHASHSEED).
    """
    digest = hashlib.blake2b(experience_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _SCALE


def sample_reason(experience_id: str, confidence: float, *, rate: float = 0.15,
                  threshold: float = 0.8) -> SampleReason | None:
    """Why this experience is sampled, or None when it is not.

    ``high_confidence`` wins when both apply (it is the stronger, rate-independent reason); ``rate`` 0 turns
    random sampling off and ``rate`` 1 samples everything.
    """
    if confidence > threshold:
        return "high_confidence"
    if hash_fraction(experience_id) < rate:
        return "random"
    return None


def is_shadow(experience_id: str, arm: str, model_version: str | None, *, rate: float = 0.2) -> bool:
    """Whether an experience is in the shadow sample: served by a promoted student (arm ``student`` with a model
    version) and ``hash_fraction(experience_id) < rate``. The same hash as the main rule, so with ``rate`` >= the
    main rate every randomly sampled student experience is also a shadow sample (no teacher call is wasted)."""
    return arm == "student" and model_version is not None and hash_fraction(experience_id) < rate


def decide(experience_id: str, confidence: float, arm: str, model_version: str | None, *, rate: float = 0.15,
           threshold: float = 0.8, shadow_rate: float = 0.2) -> tuple[SampleReason | None, bool]:
    """(reason, shadow): the main rule's reason, else ``shadow`` when only the shadow rule picks it."""
    shadow = is_shadow(experience_id, arm, model_version, rate=shadow_rate)
    reason = sample_reason(experience_id, confidence, rate=rate, threshold=threshold)
    return (reason if reason is not None else "shadow" if shadow else None), shadow
