"""The task's primary metric (schemas/tasks.py): ``task_f1`` weighs answer fields by the task file's
``field_weights``; OutputScore carries it; task files name their primary metric and are checked on load."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from schemas.errors import SchemaError
from schemas.tasks import PRIMARY_METRICS, TaskDefinition, _load_file, field_f1, get_task, score_output, task_f1

TASK = get_task("widget_selector")
REF = {"widgets": ["cpu_usage", "memory_usage"], "time_range": "24h"}


def test_widget_selector_declares_its_metric_and_weights() -> None:
    assert TASK.primary_metric == "task_f1" and TASK.primary_metric in PRIMARY_METRICS
    assert dict(TASK.field_weights) == {"widgets": 0.8, "time_range": 0.2}


def test_right_time_range_wrong_widgets_scores_low() -> None:
    wrong_widgets = {"widgets": ["revenue_trend"], "time_range": "24h"}
    assert field_f1(TASK, wrong_widgets, REF) == 0.5  # the headline metric's blind spot
    assert task_f1(TASK, wrong_widgets, REF) == pytest.approx(0.2)
    assert task_f1(TASK, {"widgets": ["cpu_usage", "memory_usage"], "time_range": "7d"}, REF) == pytest.approx(0.8)
    half = {"widgets": ["cpu_usage"], "time_range": "24h"}
    assert task_f1(TASK, half, REF) == pytest.approx(0.8 * 2 / 3 + 0.2)
    assert task_f1(TASK, REF, REF) == 1.0 and task_f1(TASK, {}, REF) == 0.0
    assert task_f1(TASK, REF, {}) == 1.0  # nothing to agree with, as field_f1


def test_equal_weights_when_none_given_and_unweighted_fields() -> None:
    plain = TaskDefinition(name="t", system_prompt="s", answer_schema={"type": "object"}, set_fields=("a",))
    ref = {"a": [1, 2], "b": "x", "c": 3}
    for pred in ({"a": [1], "b": "x", "c": 4}, {"a": [3], "b": "y"}, ref, {}):
        assert task_f1(plain, pred, ref) == pytest.approx(field_f1(plain, pred, ref))
    weighted = TaskDefinition(name="t", system_prompt="s", answer_schema={"type": "object"}, set_fields=("a",),
                              field_weights={"a": 3.0, "b": 1.0, "z": 5.0})
    # c is not weighted: weight 0; z is weighted but absent from the reference: skipped
    assert task_f1(weighted, {"a": [1, 2], "b": "y", "c": 0}, ref) == pytest.approx(0.75)
    # none of the reference's fields is weighted: equal weights over them (= field_f1)
    assert task_f1(weighted, {"c": 3, "d": 1}, {"c": 3, "d": 2}) == pytest.approx(0.5)


def test_output_score_carries_task_f1() -> None:
    s = score_output(TASK, orjson.dumps({"widgets": ["revenue_trend"], "time_range": "24h"}).decode(), REF)
    assert s.schema_valid and s.f1 == 0.5 and s.task_f1 == pytest.approx(0.2)
    assert score_output(TASK, "not json", REF).task_f1 == 0.0
    assert score_output(TASK, "[1, 2]", REF).task_f1 == 0.0
    off = score_output(TASK, '{"widgets": ["crystal_ball"], "time_range": "24h"}', REF)
    assert not off.schema_valid and off.task_f1 == pytest.approx(0.2)  # scored field by field, like f1


def test_task_files_are_checked(tmp_path: Path) -> None:
    base = {"name": "t", "system_prompt": "s",
            "answer_schema": {"type": "object", "properties": {"a": {}, "b": {}}}}
    p = tmp_path / "t.json"
    p.write_bytes(orjson.dumps(base))
    t = _load_file(p)
    assert t.primary_metric == "task_f1" and dict(t.field_weights) == {}
    p.write_bytes(orjson.dumps({**base, "primary_metric": "f1", "field_weights": {"a": 1, "b": 0}}))
    t = _load_file(p)
    assert t.primary_metric == "f1" and dict(t.field_weights) == {"a": 1, "b": 0}
    for bad in ({"primary_metric": "accuracy"}, {"field_weights": {"a": -1}}, {"field_weights": {"a": 0}},
                {"field_weights": {"nope": 1}}, {"field_weights": {"a": "high"}}, {"field_weights": {"a": True}}):
        p.write_bytes(orjson.dumps({**base, **bad}))
        with pytest.raises(SchemaError):
            _load_file(p)
