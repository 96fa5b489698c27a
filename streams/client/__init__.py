"""The client library: the code that runs inside the user's application (not in the worker).

- :mod:`streams.client.capture`: ``publish()`` an experience into the log (never raises, never blocks);
- :mod:`streams.client.router`: which model answers a request (teacher, promoted student, sticky A/B split),
  recording every served request as an experience through the capture library.

Usage::

    from streams.client import publish, Router, RouterSettings
"""

from streams.client.capture import Capture, CaptureSettings, CaptureStats, get_capture, publish, publish_jsonl
from streams.client.router import Router, RouterSettings

__all__ = ["Capture", "CaptureSettings", "CaptureStats", "Router", "RouterSettings", "get_capture", "publish",
           "publish_jsonl"]
