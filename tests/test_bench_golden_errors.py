"""bench/golden_errors.py: each served golden answer lands in the one kind of error it shows."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from schemas import get_task

ROOT = Path(__file__).resolve().parent.parent


def _module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("golden_errors", ROOT / "bench" / "golden_errors.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["golden_errors"] = mod
    spec.loader.exec_module(mod)
    return mod


REF: dict[str, Any] = {"widgets": ["latency_percentiles", "error_rate", "cpu_usage", "incident_timeline"],
                       "time_range": "1h"}


def _out(widgets: list[str], tr: str = "1h") -> str:
    return "<answer>\n" + json.dumps({"widgets": widgets, "time_range": tr}) + "\n</answer>"


def test_classify_each_kind() -> None:
    ge = _module()
    task = get_task("widget_selector")
    assert ge.classify(task, _out(REF["widgets"]), REF) == ("widgets_exact", True)
    assert ge.classify(task, _out(REF["widgets"][:2], "24h"), REF) == ("widgets_trimmed", False)
    assert ge.classify(task, _out(["latency_percentiles", "uptime_sla"]), REF) == ("lead_right_rest_off", True)
    # the same widgets in another order: the lead is wrong, so is the reading of the question
    assert ge.classify(task, _out(["error_rate", "latency_percentiles"]), REF) == ("lead_wrong", True)
    assert ge.classify(task, "not json at all", REF) == ("invalid", None)
    assert ge.classify(task, _out(["no_such_widget"]), REF) == ("invalid", None)


def test_breakdown_counts_rows_with_golden_outputs_only() -> None:
    ge = _module()
    task = get_task("widget_selector")
    golden = {"golden-001": {"answer": REF}, "golden-002": {"answer": {**REF, "time_range": "7d"}}}
    report = {"rows": [
        {"row": "constant"},  # no outputs: left out
        {"row": "answer-50", "outputs": {"golden": [
            {"experience_id": "golden-001", "output": _out(REF["widgets"][:3])},
            {"experience_id": "golden-002", "output": "{"},
        ]}},
    ]}
    (row,) = ge.breakdown(report, golden, task)
    assert row["row"] == "answer-50" and row["n"] == 2
    assert row["widgets_trimmed"] == 1 and row["invalid"] == 1 and row["widgets_exact"] == 0
    assert row["range_right"] == 1 and row["range_wrong"] == 0
