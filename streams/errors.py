"""One exception root for streams/. Leaves say what failed and whether a retry can help."""

from __future__ import annotations


class StreamsError(Exception):
    """Root of every error raised by ``streams``."""

    retryable = False


class BrokerError(StreamsError):
    """The local broker could not be resolved, started or stopped (the message says what to do)."""


class CaptureError(StreamsError):
    """An experience handed to ``publish()`` is invalid (raised only in strict mode)."""
