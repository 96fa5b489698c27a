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
         "--rows", "constant,production,teacher,answer-8,multitask-8-s7", "--traces", "8", "--max-new-tokens", "32",
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
    assert list(rows) == ["constant", "production", "teacher", "answer-8", "multitask-8-s7"]
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

    # Distilling Step-by-Step at equal optimiser steps (multitask:3 = two examples a trace, answer:6 = one), served
    # answer-only, with its own seed; the rationale examples make it train more tokens
    mt = rows["multitask-8-s7"]
    assert mt["phases"] == "multitask:3" and mt["seed"] == 7 and student["seed"] == 42
    assert mt["prompt_format"] == "answer" and mt["n_rationale"] == 8 and mt["rationale_weight"] == 0.5
    assert mt["training"]["steps"] == tr["steps"]
    assert mt["training"]["tokens"] > tr["tokens"]
    assert mt["evaluated_via"]["gguf"] == f"multitask-8-s7-{quant}.gguf"
    groups = {g["group"]: g for g in report["aggregate"]}
    assert set(groups) == {"answer-8", "multitask-8"} and groups["multitask-8"]["seeds"] == [7]
    f1 = groups["answer-8"]["slices"]["golden"]["task_f1"]
    assert f1["min"] == f1["max"] == f1["mean"] == student["slices"]["golden"]["task_f1"]


def test_row_names_and_seed_expansion() -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import quality
    finally:
        sys.path.remove(str(ROOT / "bench"))
    assert quality._student("answer-50") == ("answer", 50, None)
    assert quality._student("multitask-100-s43") == ("multitask", 100, 43)
    assert quality._student("rationale-8-s0") == ("rationale", 8, 0)
    for bad in ("answer", "answer-x", "teacher-5", "answer-5-43", "answer-5-s", "answer-5-s1-s2", "base"):
        assert quality._student(bad) is None, bad
    rows = [{"kind": "student", "student_kind": "answer", "n": 50, "seed": sd, "phases": "answer:6",
             "slices": {"golden": {"task_f1": f1 / 2, "f1": f1, "latency_ms_p50": None}},
             "training": {"steps": 38, "tokens": 1000 + sd, "train_wall_s": 1.0, "tokens_per_s": None}}
            for sd, f1 in ((42, 0.5), (43, 0.7), (44, 0.6))]
    (g,) = quality.aggregate([*rows, {"kind": "recorded", "row": "teacher"}])
    assert g["group"] == "answer-50" and g["seeds"] == [42, 43, 44]
    assert g["slices"]["golden"]["f1"] == {"mean": pytest.approx(0.6), "min": 0.5, "max": 0.7}
    assert g["slices"]["golden"]["task_f1"] == {"mean": pytest.approx(0.3), "min": 0.25, "max": 0.35}
    assert "latency_ms_p50" not in g["slices"]["golden"] and "tokens_per_s" not in g["training"]
    assert g["training"]["tokens"]["max"] == 1044
    assert "0.600 [0.500, 0.700]" in quality.table({"slice_names": ["golden"], "rows": [], "aggregate": [g]})
