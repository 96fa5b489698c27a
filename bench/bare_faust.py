"""A bare Faust agent for ``bench/streams_bench.py``: the Faust ceiling on this machine.

Same Faust settings as the worker (``streams.app.faust_config``), same topic declaration (raw bytes), one agent
that only counts the messages (``--mode take``: ``stream.take(500, within=0.5)``; ``--mode iter``: ``async for``).
When it has seen ``--n`` messages it writes ``{"n", "seconds"}`` (from the first message or batch to the last) to
``--out`` and stops. Settings from the environment, like ``tier3 worker``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import faust
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from streams.app import faust_config
from streams.settings import StreamsSettings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--mode", choices=["take", "iter"], default="take")
    args = ap.parse_args()
    settings = StreamsSettings()
    app = faust.App(settings.faust_app_id, **faust_config(settings))
    topic = app.topic(settings.experiences_topic, partitions=settings.tier3_partitions, key_type=bytes,
                      value_type=bytes, key_serializer="raw", value_serializer="raw")
    seen = 0
    first: tuple[float, int] | None = None

    def count(k: int) -> None:
        nonlocal seen, first
        seen += k
        now = time.monotonic()
        if first is None:
            first = (now, seen)
        if seen >= args.n:
            args.out.write_bytes(orjson.dumps({"n": seen - first[1], "seconds": now - first[0]}))
            os.kill(os.getpid(), signal.SIGTERM)

    @app.agent(topic)
    async def bare(stream: faust.StreamT) -> None:
        if args.mode == "take":
            async for batch in stream.take(500, within=0.5):
                count(len(batch))
        else:
            async for _value in stream:
                count(1)

    faust.Worker(app, loglevel="WARNING").execute_from_commandline()


if __name__ == "__main__":
    main()
