"""Why a served student misses the golden set: each golden item's served answer sorted by kind of error.

Reads ``bench/quality.py`` reports written **with** the per-item outputs (no ``--no-outputs``) and the golden set
they were scored on, and prints one JSON line per student row::

    .venv/bin/python bench/golden_errors.py bench/results/quality-schedules-100-s43s44.json

Kinds (each golden item is in exactly one widget kind, or ``invalid``):

- ``invalid``: the served text does not parse or validate against the task's answer schema;
- ``widgets_exact``: the reference widget list, in order;
- ``widgets_trimmed``: a strict prefix of the reference list: the right kind of question, fewer widgets. The
  golden references always carry the scenario's full list; the example generator trims the list for two thirds
  of its phrasings (``k = max(2, len - template_index % 3)``), so a student that recognised the question and
  trims as it was taught lands here;
- ``lead_right_rest_off``: the first (most important) widget right, the rest not a prefix of the reference;
- ``lead_wrong``: the first widget wrong: the student read the question as another kind.

Also ``range_right`` / ``range_wrong`` for the time range of the valid answers.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GOLDEN = ROOT / "examples" / "widget_selector" / "golden.jsonl"
KINDS = ("invalid", "widgets_exact", "widgets_trimmed", "lead_right_rest_off", "lead_wrong")


def classify(task: Any, output: str, reference: Mapping[str, Any]) -> tuple[str, bool | None]:
    """(widget kind, time range right) of one served output against its reference answer."""
    from schemas.tasks import parse_json_answer

    try:
        _, obj = parse_json_answer(output)
        answer = task.validate_answer(obj)
    except Exception:
        return "invalid", None
    got, ref = list(answer["widgets"]), list(reference["widgets"])
    if got == ref:
        kind = "widgets_exact"
    elif len(got) < len(ref) and got == ref[: len(got)]:
        kind = "widgets_trimmed"
    elif got[0] == ref[0]:
        kind = "lead_right_rest_off"
    else:
        kind = "lead_wrong"
    return kind, answer["time_range"] == reference["time_range"]


def breakdown(report: Mapping[str, Any], golden: Mapping[str, Mapping[str, Any]], task: Any) -> list[dict[str, Any]]:
    """One dict per row of ``report`` that kept golden outputs: the counts of each kind and of the time range."""
    out = []
    for row in report.get("rows", []):
        items = (row.get("outputs") or {}).get("golden")
        if not items:
            continue
        counts: collections.Counter[str] = collections.Counter({k: 0 for k in (*KINDS, "range_right", "range_wrong")})
        for item in items:
            kind, range_right = classify(task, item["output"], golden[item["experience_id"]]["answer"])
            counts[kind] += 1
            if range_right is not None:
                counts["range_right" if range_right else "range_wrong"] += 1
        out.append({"row": row["row"], "n": len(items), **counts})
    return out


def main(argv: Sequence[str] | None = None) -> None:
    from schemas import get_task

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("reports", nargs="+", type=Path, help="bench/quality.py JSON reports (with outputs)")
    ap.add_argument("--golden", type=Path, default=GOLDEN, help="the golden set the reports were scored on")
    a = ap.parse_args(argv)
    golden = {r["id"]: r for r in (json.loads(line) for line in a.golden.read_text().splitlines() if line.strip())}
    for path in a.reports:
        report = json.loads(path.read_text())
        task = get_task(report.get("task", "widget_selector"))
        rows = breakdown(report, golden, task)
        if not rows:
            print(f"{path}: no golden outputs (written with --no-outputs?)", file=sys.stderr)
        for r in rows:
            print(json.dumps({"report": path.name, **r}))


if __name__ == "__main__":
    main()
