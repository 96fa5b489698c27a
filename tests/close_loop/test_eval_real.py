"""Evaluation of a really trained tiny student, through the CLI command's code path, and the loop after a run."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable

import pytest

from schemas import TrainingRun, decode
from schemas.runs import fold_runs, metrics_of
from tests.close_loop.conftest import ROOT, TrainedRun
from tests.conftest import settings_env
from tests.kafka_utils import consume_values
from trainer.close_loop.gate import after_run, decide
from trainer.close_loop.settings import CloseLoopSettings
from trainer.events import read_run_events
from trainer.manifest import read_manifest


@pytest.mark.slow
def test_eval_cli_on_a_trained_tiny_model_then_the_gate(trained_run: TrainedRun,
                                                         make_settings: Callable[..., CloseLoopSettings]) -> None:
    s = make_settings(cls=CloseLoopSettings, tier3_eval_max_examples=6, tier3_eval_max_new_tokens=48,
                      tier3_gate_min_examples=5, tier3_auto_export=False, tier3_student_max_tokens=24,
                      tier3_golden_set=ROOT / "examples" / "widget_selector" / "golden.jsonl")
    run_id = trained_run.install(s.runs_dir, model_version=4)
    env = {**settings_env(s), "TIER3_RUNS_DIR": str(s.runs_dir)}
    proc = subprocess.run([sys.executable, "-m", "tier3", "eval", run_id], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    out = json.loads(proc.stdout)
    m = out["metrics"]
    assert out["model_version"] == 4 and m["n_examples"] == 6
    for key in ("json_valid_rate", "schema_valid_rate", "exact_match", "f1", "baseline_f1"):
        assert 0.0 <= m[key] <= 1.0, key
    assert m["schema_valid_rate"] <= m["json_valid_rate"]
    assert m["latency_ms_p50"] > 0 and m["latency_ms_p95"] >= m["latency_ms_p50"]
    assert m["generated_tokens"] > 0 and m["tokens_per_s"] > 0
    # the production baseline of the synthetic traces answers valid JSON
    assert m["baseline_json_valid_rate"] == 1.0
    # metrics are in the manifest, the report is on disk, the event is on the log
    assert read_manifest(s.runs_dir / run_id).metrics["evaluation"]["n_examples"] == 6
    report = s.reports_dir / run_id
    assert {p.name for p in report.iterdir()} >= {"report.md", "metrics.json", "examples.jsonl", "agreement.png",
                                                  "validity.png", "latency.png"}
    events = [decode(msg.value() or b"", TrainingRun) for msg in consume_values(s, s.training_runs_topic, 1)]
    assert [(e.event, e.run_id, e.model_version) for e in events] == [("evaluated", run_id, 4)]

    # after a run: an evaluation of the PyTorch model never decides. The close loop exports the candidate (GGUF f16 +
    # q8_0, `candidate: true`), evaluates that GGUF through the real llama.cpp server as the router asks, and the
    # gate decides on those figures (a tiny model trained for seconds usually fails JSON validity: rejected)
    assert decide(m, s, None).checks["served_artifact"]["passed"] is False
    result = after_run(s, run_id)
    verdict = result["verdict"]
    view = fold_runs(read_run_events(s))
    served = metrics_of(view.evaluated[run_id])
    assert served["model"] == "gguf-q8_0" and served["evaluated_via"]["quant"] == "q8_0"
    assert served["n_examples"] == 6 and served["holdout_size"] == 6
    assert served["slices"]["holdout"]["served"]["n_examples"] == 6
    assert served["slices"]["holdout"]["f16"]["n_examples"] == 6  # the quantisation's cost, beside it
    assert served["pytorch"]["n_examples"] == 6  # the PyTorch figure stays, as a diagnostic column
    assert served["agreement_pytorch_f16"]["n"] == 6
    assert served["paired"]["vs_production"]["verdict"] == "not_enough_evidence"  # 6 items decide nothing
    # the golden set: its own slice, with the constant answer beside it (no production answer there)
    golden = served["slices"]["golden"]
    assert golden["served"]["n_examples"] == served["golden"]["n_examples"] == 54
    assert golden["constant"]["n_examples"] == 54 and golden["constant"]["answer"]
    assert 0.0 <= golden["constant"]["task_f1"] <= 1.0 and golden["f16"]["n_examples"] == 54
    assert served["slices"]["holdout"]["constant"]["n_examples"] == 6
    assert served["contamination_rate"] == 0.0 and served["split_rule"]
    expected = decide(served, s, None)
    assert "served_artifact" not in expected.checks
    assert verdict.event == ("promoted" if expected.promote else "rejected") and verdict.model_version == 4
    assert verdict.details["reasons"] == expected.reasons
    assert any("not enough evidence" in r for r in verdict.details["reasons"])
    assert verdict.event == "rejected"
    assert result["exported"] is None  # not registered: rejected
    assert view.exported[run_id].details["candidate"] is True  # the candidate's files stay, unserved
    assert models_to_serve_or_none(s) is None
    assert view.verdicts[run_id].event == verdict.event
    assert view.current is None
    report = (s.reports_dir / run_id / "report.md").read_text()
    assert "What is served" in report and "constant answer" in report and "merged PyTorch (diagnostic)" in report


def models_to_serve_or_none(s: CloseLoopSettings) -> object:
    from trainer.close_loop.serve import models_to_serve
    from trainer.errors import ServeError

    try:
        return models_to_serve(s, read_run_events(s))
    except ServeError:
        return None


@pytest.mark.slow
def test_commit_protocol_hook_evaluates_the_adapter(trained_run: TrainedRun,
                                                    make_settings: Callable[..., CloseLoopSettings]) -> None:
    from types import SimpleNamespace

    from trainer.close_loop.evaluate import evaluation_hook

    s = make_settings(cls=CloseLoopSettings, tier3_eval_max_examples=3, tier3_eval_max_new_tokens=16)
    run_id = trained_run.install(s.runs_dir, run_id="run-hook")
    run_dir = s.runs_dir / run_id
    built = SimpleNamespace(holdout_path=run_dir / "dataset" / "holdout.jsonl")  # the BuiltDataset fields it uses
    metrics = evaluation_hook(s)(run_dir / "adapter", built, None, run_id=run_id, model_version=1)
    assert metrics["n_examples"] == 3 and 0.0 <= metrics["f1"] <= 1.0
    assert (s.reports_dir / run_id / "report.md").is_file()
