"""A real trained run of the tiny model (built offline, trained with TRL on CPU), shared by the close-loop tests.

Trained once per test session (~15 s on 2 cores) into a run folder shaped exactly as the commit protocol
writes it (``<runs_dir>/<run_id>/{adapter,dataset,manifest.json}``); tests copy it into their own data dir.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from trainer.manifest import DatasetInfo, OffsetRange, RunManifest, write_manifest

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class TrainedRun:
    runs_dir: Path
    run_id: str
    base_model: Path

    def install(self, runs_dir: Path, run_id: str | None = None, model_version: int = 1) -> str:
        """Copy the run into ``runs_dir`` (optionally under another id and version); return its id."""
        from trainer.manifest import read_manifest

        rid = run_id or self.run_id
        dst = runs_dir / rid
        shutil.copytree(self.runs_dir / self.run_id, dst)
        m = read_manifest(dst)
        write_manifest(dst, m.model_copy(update={"run_id": rid, "model_version": model_version}))
        return rid


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    from tests.synthetic import synthetic_traces
    from trainer.dataset import build_dataset
    from trainer.sft_config import SFTConfig
    from trainer.sft_trainer import train
    from trainer.tiny_model import build_tiny_model

    # a private copy (a few seconds): the shared cache folder may be rebuilt by another process meanwhile
    root = tmp_path_factory.mktemp("trained")
    base = build_tiny_model(root / "tiny-model")
    runs = root / "runs"
    run_id = "run-tiny-1"
    run_dir = runs / run_id
    cfg = SFTConfig(tier3_base_model=str(base), tier3_backend="trl", tier3_phases="answer:1,reasoning:1",
                    tier3_holdout_fraction=0.25, tier3_batch_size=8, tier3_max_seq_len=1024,
                    tier3_learning_rate=5e-3)  # type: ignore[call-arg]
    traces = synthetic_traces(48, seed=7, topic="tier3.enriched-traces", partitions=1)
    built = build_dataset(traces, cfg, run_dir / "dataset")
    assert built.n_holdout >= 5, built.n_holdout
    result = train(built, cfg, run_dir / ".work")
    shutil.move(str(result.adapter_dir), str(run_dir / "adapter"))
    shutil.rmtree(run_dir / ".work", ignore_errors=True)
    manifest = RunManifest(
        run_id=run_id, created_at_ms=1, model_name="cc-widget-selector", model_version=1, base_model=str(base),
        backend=result.backend, hyperparameters=dict(result.hyperparameters), topic="tier3.enriched-traces",
        group="tier3-trainer", offsets={0: OffsetRange(start=0, end=48)}, dataset_offsets={0: OffsetRange(start=0,
        end=48)}, scope="all", n_messages=48, n_unique=48, n_bad=0,
        dataset=DatasetInfo(sha256=built.sha256, n_train=built.n_train, n_holdout=built.n_holdout,
                            train_path=str(built.train_path.relative_to(run_dir)),
                            holdout_path=str(built.holdout_path.relative_to(run_dir)),
                            phases=[str(p) for p in built.phases]),
        holdout_ids=list(built.holdout_ids), metrics={"train_loss": result.train_loss})
    write_manifest(run_dir, manifest)
    return TrainedRun(runs_dir=runs, run_id=run_id, base_model=base)
