"""Wiring tier3's capture into an RL / LLM application loop (the original system's capture hook).

Every request the application serves becomes an Experience on the ``experiences`` topic. ``publish()`` costs
a few microseconds, never raises, and never blocks even when Kafka is down, so it can sit on the hot path.

Run it against the local broker::

    tier3 broker up && tier3 topics create
    python examples/rl_loop.py
"""

from __future__ import annotations

import random
import time
import uuid

from schemas import get_task
from streams.client import get_capture, publish

TASK = get_task("widget_selector")
QUESTIONS = [
    "Why is checkout slow since this morning?",
    "How did revenue in EMEA compare to last quarter?",
    "Are we going to run out of stock on the summer range?",
]


def production_model(messages: list[dict[str, str]]) -> tuple[str, float]:
    """Stand-in for the application's current model: returns (response text, confidence)."""
    widgets = random.sample(sorted(TASK.catalog), k=2)
    return f'{{"widgets": ["{widgets[0]}", "{widgets[1]}"], "time_range": "24h"}}', random.random()


def serve(question: str, user_id: str) -> str:
    messages = [{"role": "system", "content": TASK.system_prompt}, {"role": "user", "content": question}]
    started = time.perf_counter()
    response, confidence = production_model(messages)
    latency_ms = (time.perf_counter() - started) * 1000
    # --- the capture hook: one call, after the response is known -------------------------------------------
    publish({
        "experience_id": str(uuid.uuid4()),
        "task": TASK.name,
        "created_at_ms": int(time.time() * 1000),
        "messages": messages,  # exactly as sent to the production model
        "response": response,
        "served_by": {"arm": "baseline", "model": "prod-model"},
        "confidence": confidence,
        "reward": None,  # fill in later feedback as a new experience, or leave None
        "latency_ms": latency_ms,
        "user_id": user_id,
    })
    return response


if __name__ == "__main__":
    for i in range(100):
        serve(random.choice(QUESTIONS), user_id=f"user-{i % 10}")
    cap = get_capture()
    cap.flush(30)
    print(cap.stats().as_dict())
