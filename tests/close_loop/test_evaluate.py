"""Evaluation metrics on hand-checked cases (a stub generator), and the report files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from schemas import get_task
from schemas.runtime.stats import percentile
from trainer.close_loop.evaluate import HoldoutExample, evaluate_examples, score_output, write_report
from trainer.errors import EvaluationError

TASK = get_task("widget_selector")
SYS = [{"role": "system", "content": TASK.system_prompt}]


def _ex(i: int, teacher: dict, baseline: str) -> HoldoutExample:
    prompt = TASK.messages_for_model([*SYS, {"role": "user", "content": f"question {i}"}])
    return HoldoutExample(experience_id=f"e{i}", prompt=prompt,
                          teacher_answer=teacher, baseline_response=baseline)


REF = {"widgets": ["cpu_usage", "memory_usage", "disk_io"], "time_range": "24h"}

# (student output, latency_s, n_tokens) per example; every number below is worked out by hand in the comments
CASES = [
    # 1. exact: widgets set F1 1, time_range 1 -> field F1 1.0, exact
    ('<reasoning>\nhosts\n</reasoning>\n<answer>\n{"widgets": ["cpu_usage", "memory_usage", "disk_io"], '
     '"time_range": "24h"}\n</answer>', 0.1, 10),
    # 2. partial overlap: pred {cpu_usage, error_rate} vs ref {cpu, memory, disk}: P=1/2, R=1/3, F1=0.4;
    #    time_range 7d != 24h -> 0; field F1 = (0.4 + 0) / 2 = 0.2; schema valid, not exact
    ('<answer>{"widgets": ["cpu_usage", "error_rate"], "time_range": "7d"}</answer>', 0.2, 20),
    # 3. not JSON -> everything 0
    ('<answer>{"widgets": [cpu_usage</answer>', 0.3, 30),
    # 4. valid JSON, off-schema (unknown widget): widgets {cpu, memory, disk, bogus} vs ref: P=3/4, R=1 -> 6/7;
    #    time_range 24h ok -> field F1 = (6/7 + 1) / 2 = 13/14; json valid, schema invalid, not exact
    ('<answer>{"widgets": ["cpu_usage", "memory_usage", "disk_io", "bogus"], "time_range": "24h"}</answer>',
     0.4, 40),
]
BASELINES = [
    '{"widgets": ["cpu_usage", "memory_usage", "disk_io"], "time_range": "24h"}',  # bare JSON, exact
    '{"widgets": ["memory_usage"], "time_range": "24h"}',  # P=1, R=1/3 -> 0.5; tr 1 -> 0.75
    "I think you want CPU charts",  # not JSON
    '["cpu_usage"]',  # JSON but not an object: valid JSON, invalid schema, 0
]


def _stub(outputs: list[tuple[str, float, int]]):  # type: ignore[no-untyped-def]
    it = iter(outputs)
    seen: list[list[dict[str, str]]] = []

    def gen(messages: list[dict[str, str]]) -> tuple[str, int, float]:
        seen.append(messages)
        text, lat, n = next(it)
        return text, n, lat

    return gen, seen


def test_score_output_cases() -> None:
    s = score_output(TASK, CASES[1][0], REF)
    assert (s.json_valid, s.schema_valid, s.exact) == (True, True, False)
    assert s.set_f1["widgets"] == pytest.approx(0.4)
    assert s.f1 == pytest.approx(0.2)
    bad = score_output(TASK, CASES[2][0], REF)
    assert (bad.json_valid, bad.schema_valid, bad.f1) == (False, False, 0.0)
    off = score_output(TASK, CASES[3][0], REF)
    assert (off.json_valid, off.schema_valid, off.exact) == (True, False, False)
    assert off.f1 == pytest.approx(13 / 14)
    # order of the widget list matters for exact match, not for F1
    swapped = score_output(TASK, '{"widgets": ["memory_usage", "cpu_usage", "disk_io"], "time_range": "24h"}', REF)
    assert swapped.f1 == 1.0 and not swapped.exact


def test_evaluate_examples_exact_metrics(tmp_path: Path) -> None:
    examples = [_ex(i, REF, b) for i, b in enumerate(BASELINES)]
    gen, seen = _stub(CASES)
    res = evaluate_examples(TASK, examples, gen)
    m = res.metrics
    assert m["n_examples"] == 4
    assert m["json_valid_rate"] == pytest.approx(3 / 4)
    assert m["schema_valid_rate"] == pytest.approx(2 / 4)
    assert m["exact_match"] == pytest.approx(1 / 4)
    assert m["f1"] == pytest.approx((1.0 + 0.2 + 0.0 + 13 / 14) / 4)
    assert m["set_f1_widgets"] == pytest.approx((1.0 + 0.4 + 0.0 + 6 / 7) / 4)
    assert m["baseline_json_valid_rate"] == pytest.approx(3 / 4)
    assert m["baseline_schema_valid_rate"] == pytest.approx(2 / 4)
    assert m["baseline_exact_match"] == pytest.approx(1 / 4)
    assert m["baseline_f1"] == pytest.approx((1.0 + 0.75 + 0.0 + 0.0) / 4)
    # latencies 100, 200, 300, 400 ms: p50 = 250, p95 = 100 + 3*0.95 -> 385 (linear interpolation)
    assert m["latency_ms_p50"] == pytest.approx(250.0)
    assert m["latency_ms_p95"] == pytest.approx(385.0)
    assert m["generated_tokens"] == 100
    assert m["tokens_per_s"] == pytest.approx(100 / 1.0)
    assert seen[0] == examples[0].prompt  # the inference-time prompt, as built by the dataset projection

    paths = write_report(tmp_path / "rep", run_id="r1", model_version=3, result=res,
                         history=[(1, {"f1": 0.1, "json_valid_rate": 0.5}), (2, {"f1": 0.3})])
    for key in ("report_md", "metrics", "examples", "agreement_png", "validity_png", "latency_png"):
        assert paths[key].exists() and paths[key].stat().st_size > 0, key
    assert paths["agreement_png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads(paths["metrics"].read_text())
    assert doc["model_version"] == 3 and sorted(doc["history"]) == ["1", "2", "3"]
    assert len(paths["examples"].read_text().splitlines()) == 4
    assert "| f1 |" in paths["report_md"].read_text()


def test_percentile_and_empty() -> None:
    assert percentile([], 50) is None
    assert percentile([5.0], 95) == 5.0
    assert percentile([1.0, 2.0, 3.0], 50) == 2.0


def test_generation_error_is_evaluation_error() -> None:
    def boom(_m: list[dict[str, str]]) -> tuple[str, int, float]:
        raise RuntimeError("cuda oom")

    with pytest.raises(EvaluationError):
        evaluate_examples(TASK, [_ex(0, REF, "")], boom)


def test_empty_holdout_gives_zero_examples_and_a_report(tmp_path: Path) -> None:
    res = evaluate_examples(TASK, [], lambda m: ("", 0, 0.0))
    assert res.metrics["n_examples"] == 0 and res.metrics["f1"] is None and res.metrics["latency_ms_p95"] is None
    paths = write_report(tmp_path / "empty", run_id="r0", model_version=None, result=res)
    assert "| f1 | – | – |" in paths["report_md"].read_text()


def _visible_pixels(lines: list[tuple[str, list[float]]], labels: list[str], plot: Any) -> dict[str, int]:
    """Render lines with ``plot(ax, labels, lines)`` and count, per line, the pixels of its colour inside the axes
    (the legend taken off first, so its swatches do not count)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=100)
    try:
        plot(ax, labels, lines)
        if ax.get_legend() is not None:
            ax.get_legend().remove()
        fig.canvas.draw()
        img = np.asarray(fig.canvas.buffer_rgba())[:, :, :3].astype(int)
        box = ax.get_window_extent()
        h = img.shape[0]
        # the axes, and a margin around it: points drawn on the bottom spine spill over it
        crop = img[max(0, int(h - box.y1) - 8):int(h - box.y0) + 8, max(0, int(box.x0) - 8):int(box.x1) + 8]
        out = {}
        for line in ax.get_lines():
            label = str(line.get_label())
            if label.startswith("_"):
                continue
            rgb = np.array(matplotlib.colors.to_rgb(line.get_color())) * 255
            out[label] = int((np.abs(crop - rgb).sum(axis=2) < 40).sum())
        return out
    finally:
        plt.close(fig)


def test_student_lines_at_zero_stay_visible() -> None:
    """The agreement chart of a student that never agrees: its lines lie at 0 on every version, with each other
    and on the axis. Each must still show (not only the last one drawn)."""
    from trainer.close_loop.evaluate import plot_per_version

    labels = ["v1", "v2", "v3"]
    lines = [("student F1 vs teacher", [0.0, 0.0, 0.0]), ("student exact match", [0.0, 0.0, 0.0]),
             ("production baseline F1", [0.0, 0.0, 0.0])]
    seen = _visible_pixels(lines, labels, plot_per_version)
    assert set(seen) == {label for label, _ in lines}
    assert all(n >= 30 for n in seen.values()), seen

    # the way the charts were drawn before: one marker, no offset, the axis at 0 -> all but the last hidden
    def before(ax: Any, labels: list[str], lines: list[tuple[str, list[float]]]) -> None:
        for label, values in lines:
            ax.plot(labels, values, marker="o", label=label)
        ax.set_ylim(0, 1.05)

    old = _visible_pixels(lines, labels, before)
    assert old["student F1 vs teacher"] < 30 and old["student exact match"] < 30, old

def test_batched_evaluation_scores_batches_and_times_single_requests() -> None:
    """Outputs come from batches; latency is only what a request served alone took (the latency samples)."""
    examples = [_ex(i, REF, b) for i, b in enumerate(BASELINES)]
    batches: list[int] = []

    def gen_batch(prompts: list[list[dict[str, str]]]) -> tuple[list[tuple[str, int]], float]:
        start = sum(batches)
        batches.append(len(prompts))
        return [(CASES[start + k][0], CASES[start + k][2]) for k in range(len(prompts))], 2.0  # 2 s per batch

    alone: list[str] = []

    def gen(messages: list[dict[str, str]]) -> tuple[str, int, float]:
        alone.append(messages[-2]["content"])
        return "", 1, 0.5 if len(alone) == 1 else 0.7

    res = evaluate_examples(TASK, examples, gen, generate_batch=gen_batch, batch_size=3, latency_samples=2)
    m = res.metrics
    assert batches == [3, 1] and alone == ["question 0", "question 1"]
    assert m["f1"] == pytest.approx((1.0 + 0.2 + 0.0 + 13 / 14) / 4)  # the batch outputs are what is scored
    assert [r.latency_ms for r in res.rows] == [500.0, 700.0, None, None]
    assert [r.batch_ms for r in res.rows] == [2000.0, 2000.0, 2000.0, 2000.0]
    assert m["latency_samples"] == 2 and m["latency_ms_p50"] == pytest.approx(600.0)
    assert m["batch_size"] == 3 and m["generated_tokens"] == 100
    assert m["tokens_per_s"] == pytest.approx(100 / 4.0)  # generated tokens over the batches' time


def test_holdout_prompt_follows_the_students_format(tmp_path: Path) -> None:
    """A student trained answer-only is asked for the answer only (the prompt it was trained on)."""
    from trainer.close_loop.evaluate import examples_from_holdout

    reasoned = TASK.messages_for_model([*SYS, {"role": "user", "content": "q"}], reasoning=True)
    answer_only = TASK.messages_for_model([*SYS, {"role": "user", "content": "q"}], reasoning=False)
    path = tmp_path / "holdout.jsonl"
    path.write_text(json.dumps({"experience_id": "e", "task": TASK.name, "messages": reasoned,
                                "answer_only_messages": answer_only, "teacher_answer": REF,
                                "production_response": "{}"}) + "\n")
    assert examples_from_holdout(path)[1][0].prompt == reasoned
    assert examples_from_holdout(path, reasoning=False)[1][0].prompt == answer_only
    assert reasoned != answer_only
