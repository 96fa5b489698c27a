"""bench/quality.py end to end on the tiny random model: every row as served, on the near-twin-free holdout and the
golden set.

The tiny model learns nothing useful from 8 traces, so the figures are not checked, only the plumbing: the split
(contamination 0.0), which rows carry which slices, and that the student went through train → merge → GGUF →
llama.cpp's server. Answers are bounded to 32 tokens (the tiny model does not stop) so the run takes about a minute.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python (the `serve` extra, also in `dev`) is not installed")
def test_quality_bench_scores_every_row_as_served_on_holdout_and_golden(tmp_path: Path) -> None:
    from trainer.tiny_model import build_tiny_model

    tiny = build_tiny_model(tmp_path / "tiny-model")
    out = tmp_path / "quality.json"
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "quality.py"), "--base-model", str(tiny),
         "--rows", "constant,production,teacher,answer-8", "--traces", "8", "--max-new-tokens", "32",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    wall = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert json.loads(out.read_text()) == report
    print(f"bench/quality.py on the tiny model: {wall:.0f} s")

    # the near-twin-free holdout (trainer/split.py at 0.10: about 29 of 336); nothing in the pool is its twin
    assert 20 <= report["holdout_size"] <= 40, report["holdout_size"]
    assert report["contamination_rate"] == 0.0
    assert 0.0 <= report["contamination_rate_loose"] <= 1.0
    assert report["split"]["twins_excluded_from_pool"] == 0
    assert report["pool_size"] + report["holdout_size"] == report["split"]["n_traces"] == 336
    assert report["golden"]["size"] == 54 and report["golden"]["contamination_rate"] == 0.0
    assert report["base_model"] == str(tiny)

    rows = {r["row"]: r for r in report["rows"]}
    assert list(rows) == ["constant", "production", "teacher", "answer-8"]
    sizes = {"holdout": report["holdout_size"], "golden": 54}
    for name in ("constant", "teacher", "answer-8"):
        assert set(rows[name]["slices"]) == {"holdout", "golden"}, name
        for sl, n in sizes.items():
            assert rows[name]["slices"][sl]["n_examples"] == n, (name, sl)
    assert set(rows["production"]["slices"]) == {"holdout"}  # golden items have no production answer
    assert "golden" in rows["production"]["slices_not_applicable"]
    assert rows["teacher"]["slices"]["holdout"]["task_f1"] == rows["teacher"]["slices"]["golden"]["task_f1"] == 1.0
    assert rows["constant"]["answer"] is not None
    assert rows["constant"]["slices"]["golden"]["json_valid_rate"] == 1.0

    student = rows["answer-8"]
    via = student["evaluated_via"]
    quant = report["serving"]["quant"]
    assert "llama_cpp.server" in via["server"] and via["quant"] == quant
    assert via["gguf"] == f"answer-8-{quant}.gguf" and via["gguf_bytes"] > 0 and len(via["gguf_sha256"]) == 64
    assert via["max_tokens"] == 32 and student["prompt_format"] == "answer"
    for sl in sizes:
        m = student["slices"][sl]
        assert set(m) >= {"json_valid_rate", "schema_valid_rate", "set_f1_widgets", "f1", "task_f1", "exact_match",
                          "latency_ms_p50", "latency_ms_p95"}
        assert m["latency_ms_p50"] is not None and m["latency_ms_p95"] >= m["latency_ms_p50"] > 0
        assert len(student["outputs"][sl]) == sizes[sl]
        assert all(o["n_tokens"] <= 32 for o in student["outputs"][sl])
    assert student["n_train"] == 8 and student["holdout_vs_train"]["contamination_rate"] == 0.0
    tr = student["training"]
    assert tr["steps"] > 0 and tr["tokens"] > 0 and tr["tokens_per_s"] > 0 and tr["train_wall_s"] > 0
    assert "pytorch" not in student and "f16" not in student  # diagnostics only when asked for
