"""The run manifest: what one training run read, produced and committed, written atomically.

A manifest is the durable record that ties a model (the adapter beside it) to the exact slice of the log it was
trained on: per-partition offset ranges, the dataset's sha256 and holdout ids, the base model and every
hyper-parameter. It is written *before* the offsets are committed (docs/design.md, "Commit only after success"), so a
trainer that crashes between the two finds it on restart and commits instead of training the batch again.

Offset ranges are half-open ``[start, end)``: ``end`` is the offset committed to Kafka (the next one to read).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from schemas.runtime.files import write_atomic as write_atomic  # defined once in schemas.runtime.files; re-exported
from trainer.errors import ManifestError

MANIFEST_NAME = "manifest.json"
ADAPTER_NAME = "adapter"

#: trained = adapter and manifest durable, offsets not yet committed; committed = offsets committed;
#: published = the `succeeded` event was acknowledged too
RunState = Literal["trained", "committed", "published"]


class OffsetRange(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    start: int = Field(ge=0, description="first offset read (inclusive)")
    end: int = Field(ge=0, description="one past the last offset read: the offset committed")


class DatasetInfo(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    sha256: str
    n_train: int
    n_holdout: int
    train_path: str
    holdout_path: str
    phases: list[str] = Field(default_factory=list)


class RunManifest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    manifest_version: Literal[1] = 1
    run_id: str
    state: RunState = "trained"
    created_at_ms: int
    committed_at_ms: int | None = None
    model_name: str
    model_version: int
    base_model: str
    backend: str
    hyperparameters: dict[str, Any]
    topic: str
    group: str
    #: the batch this run consumed and commits (per partition, half-open)
    offsets: dict[int, OffsetRange]
    #: the slice of the log the dataset was built from (== offsets for scope "new"; from the start of each
    #: partition for scope "all"); replaying exactly this slice rebuilds ``dataset.sha256``
    dataset_offsets: dict[int, OffsetRange]
    scope: str
    n_messages: int
    n_unique: int
    n_bad: int
    n_new: int = 0  # distinct ids not inside an earlier run (duplicates of trained traces excluded)
    dataset: DatasetInfo
    holdout_ids: list[str]
    metrics: dict[str, Any]
    adapter_dir: str = ADAPTER_NAME
    trigger: str = ""
    attempt: int = 1

    def commit_offsets(self) -> dict[int, int]:
        return {p: r.end for p, r in self.offsets.items()}


def write_manifest(run_dir: Path, manifest: RunManifest) -> Path:
    path = run_dir / MANIFEST_NAME
    try:
        write_atomic(path, manifest.model_dump_json(indent=2).encode())
    except OSError as exc:
        raise ManifestError(f"could not write {path}: {exc}") from exc
    return path


def read_manifest(path: Path) -> RunManifest:
    """Read one manifest (a file, or the run folder holding it)."""
    if path.is_dir():
        path = path / MANIFEST_NAME
    try:
        return RunManifest.model_validate_json(path.read_bytes())
    except (OSError, ValidationError) as exc:
        raise ManifestError(f"could not read manifest {path}: {exc}", retryable=False) from exc


def list_manifests(runs_dir: Path) -> list[RunManifest]:
    """Every readable manifest under ``runs_dir``, oldest first. Run folders without one (a run that crashed
    or failed before step 3) are skipped: nothing was committed for them."""
    out: list[RunManifest] = []
    if not runs_dir.is_dir():
        return out
    for path in runs_dir.glob(f"*/{MANIFEST_NAME}"):
        try:
            out.append(read_manifest(path))
        except ManifestError:
            continue  # a foreign or damaged file is no reason to stop the trainer; replay can rebuild it
    out.sort(key=lambda m: (m.created_at_ms, m.run_id))
    return out


def find_manifest(runs_dir: Path, run_id: str) -> RunManifest:
    path = runs_dir / run_id / MANIFEST_NAME
    if not path.exists():
        raise ManifestError(f"no manifest for run {run_id!r} at {path}", retryable=False)
    return read_manifest(path)
