"""Which experiences go to the teacher: a pure, deterministic function (docs/design.md, "Sampling is deterministic").

The original system sampled 15 % at random plus every experience with confidence > 0.8. tier3 keeps the rule
but replaces ``random()`` with a hash of ``experience_id``: every process, every replay and every re-delivery
after a crash picks the same experiences, so a replayed log rebuilds the same dataset.
"""

from __future__ import annotations

import hashlib
from typing import Literal

SampleReason = Literal["random", "high_confidence"]

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
