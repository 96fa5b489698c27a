"""The worker's side of the router: per-arm statistics of the served requests and /status's ``router`` block.

The application routes requests with :mod:`streams.client.router` and captures each one with its ``served_by``
(arm, model, model version). The worker sees every experience; :class:`RouterStats` keeps per-arm count /
confidence / reward / latency sums in a Faust table over ``experiences`` and knows the promoted version from the
training-runs events the worker already reads. ``streams.app.create_app`` builds it and wires it explicitly: the
experiences agent calls :meth:`RouterStats.observe`, the training-runs reader calls :meth:`RouterStats.apply_run`,
and /status's ``router`` block is :meth:`RouterStats.block`.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from schemas import Experience, TrainingRun
from schemas.settings import TopicSpec
from streams.client.router import PromotionView, ServeMode
from streams.settings import StreamsSettings

if TYPE_CHECKING:
    import faust

ARM_TABLE = "router_arms"
RECENT_SERVED = 1000  # routed experiences behind the mode and share of /status's router block
ARM_WRITE_INTERVAL_S = 1.0  # each per-arm table key is written (one changelog message) at most this often


def empty_arm() -> dict[str, float]:
    return {"count": 0, "confidence_sum": 0.0, "reward_sum": 0.0, "reward_n": 0, "latency_ms_sum": 0.0,
            "latency_n": 0}


def add_experience(acc: Mapping[str, float], exp: Experience) -> dict[str, float]:
    """The arm's sums plus one experience (a new dict: Faust tables persist assignments, not mutations)."""
    return _add_into({**empty_arm(), **acc}, exp)


def _add_into(out: dict[str, float], exp: Experience) -> dict[str, float]:
    out["count"] += 1
    out["confidence_sum"] += exp.confidence
    if exp.reward is not None:
        out["reward_sum"] += exp.reward
        out["reward_n"] += 1
    if exp.latency_ms is not None:
        out["latency_ms_sum"] += exp.latency_ms
        out["latency_n"] += 1
    return out


def add_sums(a: Mapping[str, float], b: Mapping[str, float]) -> dict[str, float]:
    """Two arms' sums added (a new dict)."""
    return {k: a.get(k, 0) + b.get(k, 0) for k in empty_arm()}


def arm_key(exp: Experience, partition: int) -> str:
    """``<arm>|<model version or ->@<partition>``: keyed per source partition so that partitions never
    overwrite each other's sums (a Faust table's changelog partition is the source event's)."""
    return f"{exp.served_by.arm}|{exp.served_by.model_version or '-'}@{partition}"


def summarize_arms(items: Iterable[tuple[str, Mapping[str, float]]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(per arm, per arm and model version) means from the table's (key, sums) items."""
    by_arm: dict[str, dict[str, float]] = {}
    by_version: dict[str, dict[str, float]] = {}
    for key, sums in items:
        try:
            name, _partition = str(key).rsplit("@", 1)
            arm, version = name.split("|", 1)
        except ValueError:
            continue
        for bucket, k in ((by_arm, arm), (by_version, f"{arm}:v{version}" if version != "-" else arm)):
            acc = bucket.setdefault(k, empty_arm())
            for f in acc:
                acc[f] += float(sums.get(f, 0))

    def means(acc: dict[str, float]) -> dict[str, Any]:
        n = int(acc["count"])
        return {"count": n,
                "confidence_mean": round(acc["confidence_sum"] / n, 6) if n else None,
                "reward_mean": round(acc["reward_sum"] / acc["reward_n"], 6) if acc["reward_n"] else None,
                "latency_ms_mean": round(acc["latency_ms_sum"] / acc["latency_n"], 3) if acc["latency_n"] else None}

    return ({k: means(v) for k, v in sorted(by_arm.items())}, {k: means(v) for k, v in sorted(by_version.items())})


def observed_mode(teacher: int, student: int) -> tuple[ServeMode | None, float | None]:
    """(mode, student share) that served ``teacher`` and ``student`` requests: None, None when none was routed."""
    routed = teacher + student
    if routed == 0:
        return None, None
    mode: ServeMode = "teacher" if student == 0 else "student" if teacher == 0 else "ab"
    return mode, round(student / routed, 4)


def no_router_block() -> dict[str, Any]:
    """The ``router`` block of a worker state with no :class:`RouterStats` (nothing is known about serving)."""
    return {"mode": None, "promoted_version": None,
            "arms": {"teacher": {"count": 0, "confidence_mean": None, "reward_mean": None, "latency_ms_mean": None}}}


def changelog_spec(settings: StreamsSettings) -> TopicSpec:
    """The per-arm table's changelog, created up front with the source's partition count (Faust's rule)."""
    return TopicSpec(f"{settings.faust_app_id}-{ARM_TABLE}-changelog", settings.tier3_partitions,
                     {"cleanup.policy": "compact"})


class RouterStats:
    """A per-arm table over experiences and the /status ``router`` block (built by ``streams.app.create_app``).

    The table's changelog must exist before the app starts (:func:`changelog_spec`).
    """

    def __init__(self, app: faust.App, settings: StreamsSettings) -> None:
        # values are plain dicts of sums, stored with the app's default (json) serializer
        self.table = app.Table(ARM_TABLE, default=dict, partitions=settings.tier3_partitions, key_type=str)
        self.promotions = PromotionView()
        self.recent: deque[str] = deque(maxlen=RECENT_SERVED)  # arms of the latest routed experiences read here
        # sums not yet in the table, per key: a key is written at most every ARM_WRITE_INTERVAL_S (one changelog
        # message per experience cost more than all the rest of the worker's work). Display-only, like the count
        # table: a crash loses at most that interval of statistics; /status adds the unwritten sums.
        self.pending: dict[str, dict[str, float]] = {}
        self._written_at: dict[str, float] = {}

    def observe(self, exp: Experience, partition: int) -> None:
        """One valid experience, called by the experiences agent inside that event's context (so the table
        write lands on the same partition)."""
        key = arm_key(exp, partition)
        acc = self.pending.get(key)
        if acc is None:
            acc = self.pending[key] = empty_arm()
        _add_into(acc, exp)  # in place (a plain dict, not the table): no new dicts per experience
        now = time.monotonic()
        if now - self._written_at.get(key, -ARM_WRITE_INTERVAL_S) >= ARM_WRITE_INTERVAL_S:
            self.table[key] = add_sums(self.table[key], self.pending.pop(key))
            self._written_at[key] = now
        if exp.served_by.arm in ("teacher", "student") and exp.metadata.get("route_reason") != "fallback":
            self.recent.append(exp.served_by.arm)

    def apply_run(self, run: TrainingRun) -> None:
        """One training-runs (or trainer-status) event, as the worker's reader gets it."""
        self.promotions.apply(run)

    def block(self) -> dict[str, Any]:
        cur = self.promotions.current
        arms, by_version = summarize_arms([*self.table.items(), *self.pending.items()])
        for arm in ("teacher", "student"):
            arms.setdefault(arm, {"count": 0, "confidence_mean": None, "reward_mean": None,
                                  "latency_ms_mean": None})
        # what the application runs, from the served_by of what it captured (not this worker's TIER3_SERVE,
        # which the application never reads): the latest routed experiences, else every one in the table
        if self.recent:
            counts, over = Counter(self.recent), f"latest {len(self.recent)} routed experiences read by this worker"
        else:
            counts, over = Counter({a: int(arms[a]["count"]) for a in ("teacher", "student")}), \
                "every routed experience in the arms table"
        mode, share = observed_mode(counts["teacher"], counts["student"])
        return {"mode": mode, "ab_student_share": share, "observed_over": over,
                "promoted_version": cur.model_version if cur else None,
                "promoted_run_id": cur.run_id if cur else None, "arms": arms, "arms_by_version": by_version}


__all__ = ["ARM_TABLE", "ARM_WRITE_INTERVAL_S", "RECENT_SERVED", "RouterStats", "add_experience", "add_sums",
           "arm_key", "changelog_spec", "empty_arm", "no_router_block", "observed_mode", "summarize_arms"]
