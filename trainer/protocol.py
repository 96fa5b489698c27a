"""The commit protocol: a model first, then its manifest, then the offsets, then the news. Nothing else commits.

:func:`train_and_commit` is the whole protocol, as numbered steps. The consumer (``trainer/consumer.py``) decides
*when* to run it and what to do when it raises (publish ``failed`` with :func:`publish_failed`, commit nothing,
seek back, back off, retry);
this module decides *in which order* things become durable, because that order is what makes the guarantee:

    committed offsets of the trainer group  ==  traces inside a successfully trained, recorded model.

Failure points (see docs/guarantees.md, "Trainer"):

- before (3): nothing durable but an unreferenced folder; the offsets are not committed, the batch comes back;
- between (3) and (4): the manifest is durable, the commit is not; a restarted trainer sees the same batch come
  back, recognises it by its offset ranges and commits it (:func:`commit_recognised`) instead of training again;
- between (4) and (5): committed but not announced; the manifest says ``committed`` (or, if the crash came before
  that rewrite, the broker's committed offsets say so) and the restarted trainer publishes ``succeeded``.
"""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from schemas.runtime.files import move_into_place
from trainer.dataset import BuiltDataset
from trainer.errors import AdapterError, CommitFailed, DatasetError, ManifestError, TrainerError
from trainer.events import TrainerEvents, now_ms
from trainer.manifest import ADAPTER_NAME, DatasetInfo, OffsetRange, RunManifest, list_manifests, write_manifest
from trainer.projection import TraceRecord, project_dataset, read_ranges
from trainer.settings import TrainerSettings
from trainer.sft_config import SFTConfig
from trainer.trigger import backoff_s

log = logging.getLogger("tier3.trainer.protocol")

T = TypeVar("T")


class TrainFn(Protocol):
    """:func:`trainer.sft_trainer.train`'s signature (tests may pass a fake)."""

    def __call__(self, dataset: BuiltDataset, cfg: SFTConfig, out_dir: Path, *,
                 on_step: Callable[[int, int], None] | None = None) -> Any: ...


class EvaluateFn(Protocol):
    """The evaluation hook: (adapter folder, dataset, config; the run's id and model version) -> metrics written
    into the manifest under ``metrics["evaluation"]``. Runs after the adapter is in place and before the manifest,
    so a run whose evaluation raises is not committed (its traces come back and are trained again)."""

    def __call__(self, adapter_dir: Path, built: BuiltDataset, cfg: SFTConfig, *, run_id: str,
                 model_version: int) -> dict[str, Any]: ...


@dataclass
class Batch:
    """Traces read since the last commit: what one run trains on and then commits."""

    topic: str
    offsets: dict[int, OffsetRange]  # per partition, half-open; ``end`` is what gets committed
    records: list[TraceRecord]  # decoded traces, log order
    n_messages: int  # records read, including undecodable ones (dead-lettered, still committed)
    n_unique: int  # distinct experience ids among ``records``
    n_bad: int
    trigger: str  # min_traces | interval | train_now | retry
    attempt: int = 1
    n_new: int = 0  # of those, not inside an earlier committed run (what the trigger counts)

    def commit_offsets(self) -> dict[int, int]:
        return {p: r.end for p, r in self.offsets.items()}

    def describe(self) -> dict[str, Any]:
        return {"offsets": {str(p): [r.start, r.end] for p, r in sorted(self.offsets.items())},
                "n_messages": self.n_messages, "n_unique": self.n_unique, "n_new": self.n_new, "n_bad": self.n_bad,
                "trigger": self.trigger, "attempt": self.attempt}


@dataclass
class RunContext:
    """What the protocol needs from its caller. The consumer provides Kafka-backed callables; unit tests fakes."""

    settings: TrainerSettings
    cfg: SFTConfig
    events: TrainerEvents
    #: commit ``{partition: offset}`` synchronously; raise CommitFailed unless every partition succeeded
    commit: Callable[[dict[int, int]], None]
    #: run a slow callable while keeping the consumer's group membership alive (it polls, partitions paused)
    in_background: Callable[[Callable[[], Any]], Any]
    #: the slice of the log the dataset is built from, per partition (scope all: from each partition's start)
    dataset_slice: Callable[[Batch], dict[int, OffsetRange]]
    train: TrainFn | None = None  # default: trainer.sft_trainer.train (imported lazily: torch)
    evaluate: EvaluateFn | None = None
    #: fault injection for tests: called with a step name; may end the process (see TrainerSettings)
    fault: Callable[[str], None] = lambda point: None
    on_step: Callable[[int, int], None] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def new_run_id() -> str:
    return time.strftime("run-%Y%m%dT%H%M%SZ-", time.gmtime()) + uuid.uuid4().hex[:8]


def next_model_version(runs_dir: Path) -> int:
    return 1 + max((m.model_version for m in list_manifests(runs_dir)), default=0)


def train_and_commit(batch: Batch, run_id: str, ctx: RunContext) -> RunManifest:
    """THE commit protocol. Raises on any failure before step (4) completes; the caller then publishes
    ``failed``, commits nothing, seeks back and backs off."""
    s, cfg = ctx.settings, ctx.cfg
    run_dir = s.runs_dir / run_id
    version = next_model_version(s.runs_dir)
    ctx.events.started(run_id, model_version=version, base_model=cfg.tier3_base_model, details=batch.describe())

    # (1) Train. The dataset is a pure projection of a slice of the log (scope "new": this batch; "all": every
    #     partition from its start up to this batch's end), built by the same code as `tier3 replay`, so its
    #     sha256 can be rebuilt from the manifest. Training runs in a worker thread while this thread keeps
    #     polling (partitions paused): a run may outlast max.poll.interval.ms without losing the group.
    slice_ = ctx.dataset_slice(batch)
    work = run_dir / f".work-{batch.attempt}-{uuid.uuid4().hex[:6]}"
    train_fn = ctx.train or _default_train

    def build_and_train() -> tuple[BuiltDataset, Any]:
        if slice_ == batch.offsets:
            records = batch.records  # scope "new": the batch is the slice, already in memory
        else:
            records = read_ranges(s, batch.topic, slice_).records
        built = project_dataset(records, cfg, run_dir / "dataset")
        return built, train_fn(built, cfg, work, on_step=ctx.on_step)

    built, result = ctx.in_background(build_and_train)

    # (2) Put the adapter in place with one rename (train() wrote it into a scratch folder), so run_dir/adapter
    #     is either absent or complete: a manifest must never point at half a model.
    try:
        adapter = move_into_place(Path(result.adapter_dir), run_dir / ADAPTER_NAME)
    except OSError as exc:
        raise AdapterError(f"could not move the adapter into {run_dir / ADAPTER_NAME}: {exc}") from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)
    metrics: dict[str, Any] = {
        "train_loss": result.train_loss, "steps": result.steps, "tokens": result.tokens, "wall_s": result.wall_s,
        "train_wall_s": getattr(result, "train_wall_s", None), "phase_losses": getattr(result, "phase_losses", {}),
        "n_duplicates": built.n_duplicates, "n_skipped": len(built.skipped), "n_unsafe": built.n_unsafe,
    }

    # (hook) Evaluation, between the model and its manifest: the close-loop's metrics become part of the record,
    #     and a run that cannot be evaluated is not committed.
    if ctx.evaluate is not None:
        evaluate = ctx.evaluate
        metrics["evaluation"] = ctx.in_background(
            lambda: evaluate(adapter, built, cfg, run_id=run_id, model_version=version))

    # (3) Write the manifest atomically (temp file, fsync, os.replace, fsync the folder). From here on the run is
    #     recognisable by its offset ranges: if we crash before (4), the restarted trainer commits it, not retrains.
    manifest = RunManifest(
        run_id=run_id, created_at_ms=now_ms(), model_name=s.tier3_student_name, model_version=version,
        base_model=cfg.tier3_base_model, backend=result.backend,
        hyperparameters={**cfg.hyperparameters(), **result.hyperparameters},
        topic=batch.topic, group=s.tier3_trainer_group, offsets=batch.offsets, dataset_offsets=slice_,
        scope=cfg.tier3_scope, n_messages=batch.n_messages, n_unique=batch.n_unique, n_new=batch.n_new,
        n_bad=batch.n_bad,
        dataset=DatasetInfo(sha256=built.sha256, n_train=built.n_train, n_holdout=built.n_holdout,
                            train_path=str(built.train_path.relative_to(run_dir)),
                            holdout_path=str(built.holdout_path.relative_to(run_dir)),
                            phases=[str(p) for p in built.phases]),
        holdout_ids=list(built.holdout_ids), metrics=metrics, trigger=batch.trigger, attempt=batch.attempt)
    write_manifest(run_dir, manifest)
    ctx.fault("crash_after_manifest")

    # (4)+(5) are shared with the restart path.
    return commit_recognised(manifest, ctx)


def commit_recognised(manifest: RunManifest, ctx: RunContext) -> RunManifest:
    """Steps (4) and (5): commit a durable manifest's offsets, then announce it. Also what a restarted trainer
    does with a manifest whose commit never happened (the batch is not trained a second time)."""
    run_dir = ctx.settings.runs_dir / manifest.run_id

    # (4) Commit exactly the manifest's offsets, synchronously, and check every partition's result: an error
    #     (rebalance, lost partition, broker down) raises CommitFailed and nothing is announced. The caller
    #     refuses partitions that were revoked or lost since the batch was read.
    ctx.commit(manifest.commit_offsets())
    manifest = manifest.model_copy(update={"state": "committed", "committed_at_ms": now_ms()})
    try:
        write_manifest(run_dir, manifest)
    except ManifestError as exc:  # committed is committed: a restart reads the state from the broker instead
        log.error("run %s: offsets committed, but the manifest's state could not be updated: %s", manifest.run_id,
                  exc)
    ctx.fault("crash_after_commit")

    # (5) Publish `succeeded` (idempotent producer, acks=all) and wait for the acknowledgement. The offsets are
    #     committed whatever happens here; an unacknowledged event leaves the manifest at `committed`, and the
    #     next start publishes it again (readers key on run_id, a repeat is harmless).
    return publish_succeeded(manifest, ctx)


def publish_succeeded(manifest: RunManifest, ctx: RunContext) -> RunManifest:
    ctx.events.succeeded(manifest.run_id, model_version=manifest.model_version, base_model=manifest.base_model,
                         details=succeeded_details(manifest, ctx.settings))
    if not ctx.events.flush():
        log.error("run %s: offsets committed but the `succeeded` event was not acknowledged; "
                  "it is published again on the next start", manifest.run_id)
        return manifest
    manifest = manifest.model_copy(update={"state": "published"})
    try:
        write_manifest(ctx.settings.runs_dir / manifest.run_id, manifest)
    except ManifestError as exc:  # the next start publishes `succeeded` again: harmless, readers key on run_id
        log.error("run %s: could not record that `succeeded` was published: %s", manifest.run_id, exc)
    return manifest


def publish_failed(batch: Batch, run_id: str, exc: Exception, ctx: RunContext, *, failures: int) -> float:
    """A run failed before its commit: log it, publish ``failed`` (with the retry's wait) and wait for it to be
    acknowledged. Returns how long to back off before the retry: none after an empty dataset (retrying the same
    traces cannot help; the trigger waits for more of them), the trainer's back-off after ``failures``
    consecutive failures when the error is retryable (an unexpected exception is assumed transient), the longest
    back-off otherwise (it needs an operator: retry rarely)."""
    s = ctx.settings
    retryable = bool(getattr(exc, "retryable", True))
    if isinstance(exc, DatasetError):
        wait_s = 0.0
    elif retryable:
        wait_s = backoff_s(failures, s.tier3_trainer_backoff_initial_s, s.tier3_trainer_backoff_max_s)
    else:
        wait_s = s.tier3_trainer_backoff_max_s
    log.error("run %s failed (%s, retryable=%s): %s; nothing committed, retry in %.1f s", run_id,
              type(exc).__name__, retryable, exc, wait_s, exc_info=not isinstance(exc, TrainerError))
    ctx.events.failed(run_id, model_version=None, base_model=ctx.cfg.tier3_base_model, details={
        **batch.describe(), "error": str(exc)[:2000], "error_type": type(exc).__name__,
        "retryable": retryable, "retry_in_s": wait_s})
    ctx.events.flush(5.0)
    return wait_s


def succeeded_details(m: RunManifest, s: TrainerSettings) -> dict[str, Any]:
    run_dir = s.runs_dir / m.run_id
    return {
        "run_dir": str(run_dir), "adapter_dir": str(run_dir / m.adapter_dir),
        "manifest": str(run_dir / "manifest.json"), "dataset_sha256": m.dataset.sha256,
        "n_train": m.dataset.n_train, "n_holdout": m.dataset.n_holdout, "n_unique": m.n_unique,
        "offsets": {str(p): [r.start, r.end] for p, r in sorted(m.offsets.items())},
        "backend": m.backend, "metrics": m.metrics, "trigger": m.trigger, "attempt": m.attempt,
    }


def _default_train(dataset: BuiltDataset, cfg: SFTConfig, out_dir: Path, *,
                   on_step: Callable[[int, int], None] | None = None) -> Any:
    from trainer.sft_trainer import train  # torch, transformers, trl: seconds to import, only when training

    return train(dataset, cfg, out_dir, on_step=on_step)


def check_commit_result(results: list[Any] | None, expected: dict[int, int]) -> None:
    """Raise CommitFailed unless the broker accepted every partition at exactly the expected offset."""
    if results is None:
        raise CommitFailed("the commit returned no result")
    errors = {tp.partition: tp.error for tp in results if tp.error is not None}
    if errors:
        raise CommitFailed("commit refused: " + ", ".join(f"[{p}] {e}" for p, e in sorted(errors.items())))
    got = {tp.partition: tp.offset for tp in results}
    if got != expected:
        raise CommitFailed(f"commit result {got} differs from the offsets asked for {expected}")
