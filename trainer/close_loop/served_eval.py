"""Judge what ships: the gate's evidence comes from the exported GGUF that will be served, through the real server.

The close loop's order is train → export → **evaluate the served artifact** → gate → promote
(:func:`trainer.close_loop.gate.after_run`). This module is the third step:

1. The run's exported GGUF of the serving quantisation (``TIER3_GGUF_QUANT``, from its ``exported`` event) is
   loaded by the same launcher ``tier3 serve`` uses (:class:`trainer.close_loop.serve.LlamaServer`: llama-cpp-python's
   OpenAI-compatible server, weight repacking off) on a free loopback port.
2. Every item is asked exactly what the router asks the student: the production messages plus the output-format
   instruction of the student's ``prompt_format`` (:meth:`schemas.tasks.TaskDefinition.messages_for_model`),
   ``temperature`` 0, at most ``TIER3_STUDENT_MAX_TOKENS`` tokens, one request at a time. The wall time of each
   request is the served latency the gate checks.
3. Slices, each scored with the one rule (:func:`schemas.tasks.score_output`):

   - ``holdout``: the run's near-duplicate-free holdout (``trainer/split.py``); the production response recorded
     in each experience is scored on the same items (``baseline_*``);
   - ``golden``: the user's own evaluation set (``TIER3_GOLDEN_SET``, JSONL of requests with reference answers;
     the example ships ``examples/widget_selector/golden.jsonl``), when set;
   - for each slice a **constant answer** (the most common teacher answer of the run's training part): what "no
     learning" scores.

4. Diagnostics beside the decision: the f16 GGUF on the same slices (the quantisation's cost), the merged PyTorch
   model's figures from the commit protocol's evaluation hook, and how often the f16 export's greedy output equals
   the PyTorch model's on the holdout (``agreement_pytorch_f16``).
5. Paired comparisons on the task's primary metric (``task_f1``; :mod:`trainer.close_loop.verdict`): the student
   against production on the holdout items, and against the version in force (served from its own exported GGUF,
   on the same items) when there is one.

The ``evaluated`` event's top-level metrics are the served holdout figures (so every reader that knew the old
event keeps working); the slices, the diagnostics and the paired comparisons sit beside them.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import orjson

from schemas import TaskDefinition, get_task
from schemas.runs import RunsFold, fold_runs
from schemas.tasks import InvalidAnswer, score_output
from trainer.close_loop.evaluate import (
    EvalResult,
    HoldoutExample,
    RunEvaluation,
    _rates,
    _sha256_file,
    evaluate_examples,
    evaluated_event,
    examples_from_holdout,
    write_report,
)
from trainer.close_loop.settings import CloseLoopSettings
from trainer.close_loop.verdict import paired_comparison
from trainer.errors import EvaluationError, TrainerError
from trainer.events import TrainerEvents, now_ms, read_run_events
from trainer.manifest import write_atomic

log = logging.getLogger("tier3.trainer.close_loop.served_eval")

#: the metrics of a slice copied into the compact per-artifact tables (the full set is in the top level)
SLICE_KEYS = ("n_examples", "json_valid_rate", "schema_valid_rate", "exact_match", "f1", "task_f1",
              "set_f1_widgets", "latency_ms_p50", "latency_ms_p95")


# ------------------------------------------------------------------------------------------- the items


def load_golden(path: Path, task: TaskDefinition, *, reasoning: bool) -> list[HoldoutExample]:
    """The golden set: one JSON object a line with ``id``, ``messages`` (as production sent them: system + user)
    and ``answer`` (the reference). Every reference must match the task's answer schema; a bad line is an error
    that names the line (a golden set is the user's own file: it is fixed, never skipped)."""
    out: list[HoldoutExample] = []
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise EvaluationError(f"TIER3_GOLDEN_SET: cannot read {path}: {exc.strerror or exc}") from None
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = orjson.loads(line)
            messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in r["messages"]]
            answer = task.validate_answer(r["answer"])
            item_id = str(r.get("id") or f"golden-{n:04d}")
        except (orjson.JSONDecodeError, KeyError, TypeError, InvalidAnswer) as exc:
            raise EvaluationError(f"TIER3_GOLDEN_SET {path} line {n}: not a golden item ({type(exc).__name__}: "
                                  f"{str(exc)[:200]}); each line needs 'messages' and an 'answer' that matches "
                                  f"the {task.name} answer schema") from None
        out.append(HoldoutExample(experience_id=item_id,
                                  prompt=task.messages_for_model(messages, reasoning=reasoning),
                                  teacher_answer=answer, baseline_response=""))
    return out


def constant_answer(train_path: Path, task: TaskDefinition) -> dict[str, Any] | None:
    """The most common teacher answer of the training part (ties: the first seen): a model that learnt nothing but
    the prior would always answer it."""
    counts: Counter[bytes] = Counter()
    first: dict[bytes, dict[str, Any]] = {}
    try:
        lines = Path(train_path).read_bytes().splitlines()
    except OSError:
        return None
    for line in lines:
        if not line.strip():
            continue
        r = orjson.loads(line)
        content = next((m["content"] for m in reversed(r.get("messages", [])) if m.get("role") == "assistant"), None)
        if content is None:
            continue
        try:
            _, answer = task.parse_output(content)
        except InvalidAnswer:
            continue
        key = orjson.dumps(answer, option=orjson.OPT_SORT_KEYS)
        counts[key] += 1
        first.setdefault(key, answer)
    if not counts:
        return None
    best = max(counts.items(), key=lambda kv: kv[1])[0]  # max keeps the first of equal counts (insertion order)
    return first[best]


def score_constant(task: TaskDefinition, answer: Mapping[str, Any] | None,
                   examples: Sequence[HoldoutExample]) -> dict[str, Any] | None:
    if answer is None or not examples:
        return None
    text = orjson.dumps(answer).decode()
    out: dict[str, Any] = {"answer": dict(answer), "n_examples": len(examples)}
    out.update(_rates("", [score_output(task, text, ex.teacher_answer) for ex in examples], task.set_fields))
    return out


# ------------------------------------------------------------------------------------------- serving


def _exported_gguf(view: RunsFold, run_id: str, outtype: str) -> Path | None:
    """The run's exported GGUF of ``outtype`` when its file is on this machine."""
    ev = view.exported.get(run_id)
    files = (ev.details.get("files") if ev is not None else None) or {}
    info = files.get(outtype) if isinstance(files, dict) else None
    path = Path(str(info.get("path"))) if isinstance(info, dict) and info.get("path") else None
    return path if path is not None and path.is_file() else None


def ask_served(settings: CloseLoopSettings, gguf: Path, alias: str, task: TaskDefinition,
         slices: Mapping[str, Sequence[HoldoutExample]], *, also: tuple[str, Path] | None = None
         ) -> tuple[dict[str, EvalResult], dict[str, EvalResult]]:
    """Serve ``gguf`` (and ``also``: the version in force) with tier3 serve's launcher, ask every slice; return
    (results of ``alias``, results of ``also``'s alias)."""
    from trainer.close_loop.serve import LlamaServer, ServedModel, chat_generator

    models = [ServedModel(alias, gguf, "", 0)]
    if also is not None:
        models.append(ServedModel(also[0], also[1], "", 0))
    out: dict[str, EvalResult] = {}
    other: dict[str, EvalResult] = {}
    with LlamaServer(models, host="127.0.0.1", port=0, n_ctx=settings.tier3_serve_n_ctx,
                     threads=settings.tier3_serve_threads).start(settings.tier3_serve_start_timeout_s) as srv:
        for target, store in ((alias, out), *(((also[0], other),) if also is not None else ())):
            gen = chat_generator(srv.base_url, target, settings.tier3_student_max_tokens)
            for name, examples in slices.items():
                if examples:
                    store[name] = evaluate_examples(task, examples, gen)
    return out, other


def _compact(m: Mapping[str, Any], baseline: bool = False) -> dict[str, Any]:
    out = {k: m.get(k) for k in SLICE_KEYS}
    if baseline:
        out.update({f"baseline_{k}": m.get(f"baseline_{k}") for k in SLICE_KEYS[1:7]})
    return out


def _pytorch_agreement(pytorch_rows: Mapping[str, str], f16: EvalResult | None) -> dict[str, Any] | None:
    if f16 is None or not pytorch_rows:
        return None
    pairs = [(pytorch_rows[r.experience_id], r.output) for r in f16.rows if r.experience_id in pytorch_rows]
    if not pairs:
        return None
    same = sum(1 for a, b in pairs if a.strip() == b.strip())
    return {"n": len(pairs), "identical": same, "rate": same / len(pairs)}


def _read_rows(path: Path) -> dict[str, str]:
    try:
        return {r["experience_id"]: r["output"] for r in map(orjson.loads, path.read_bytes().splitlines()) if r}
    except (OSError, orjson.JSONDecodeError, KeyError, TypeError):
        return {}


# ------------------------------------------------------------------------------------------- a run


def evaluate_served_run(settings: CloseLoopSettings, run_id: str, *, publish: bool = True) -> RunEvaluation:
    """Evaluate a run's exported quantised GGUF through the server (see the module docstring), write the report
    and the manifest's ``metrics["served_evaluation"]``, and publish the ``evaluated`` event the gate decides on."""
    from trainer.inference import adapter_prompt_format
    from trainer.manifest import find_manifest, write_manifest

    run_dir = settings.runs_dir / run_id
    manifest = find_manifest(settings.runs_dir, run_id)
    view = fold_runs(read_run_events(settings))
    quant = settings.tier3_gguf_quant
    gguf = _exported_gguf(view, run_id, quant)
    if gguf is None:
        raise EvaluationError(f"run {run_id} has no exported {quant} GGUF on this machine: the gate judges what "
                              f"is served, so the run must be exported first (`tier3 export {run_id}`)")
    fmt = adapter_prompt_format(run_dir / manifest.adapter_dir)
    reasoning = fmt == "reasoning"
    holdout = Path(manifest.dataset.holdout_path)
    holdout = holdout if holdout.is_absolute() else run_dir / holdout
    train = Path(manifest.dataset.train_path)
    train = train if train.is_absolute() else run_dir / train
    file_task, hold = examples_from_holdout(holdout, reasoning=reasoning)
    task = get_task(file_task or settings.tier3_task)
    if settings.tier3_eval_max_examples:
        hold = hold[:settings.tier3_eval_max_examples]
    slices: dict[str, list[HoldoutExample]] = {"holdout": hold}
    if settings.tier3_golden_set is not None:
        slices["golden"] = load_golden(settings.tier3_golden_set, task, reasoning=reasoning)

    alias = f"{settings.tier3_student_name}:v{manifest.model_version}-candidate"
    current = view.current
    also = None
    if current is not None and current.run_id != run_id and current.model_version is not None:
        prev = _exported_gguf(view, current.run_id, quant)
        if prev is not None:
            also = (f"{settings.tier3_student_name}:v{current.model_version}", prev)
    served, in_force = ask_served(settings, gguf, alias, task, slices, also=also)
    f16: dict[str, EvalResult] = {}
    f16_path = _exported_gguf(view, run_id, "f16") if settings.tier3_eval_f16 and quant != "f16" else None
    if f16_path is not None:
        f16, _ = ask_served(settings, f16_path, f"{alias}-f16", task, slices)

    # -- the metrics: served holdout at the top level, the rest beside it
    main = served["holdout"] if "holdout" in served else EvalResult(metrics={"task": task.name, "n_examples": 0},
                                                                    rows=[])
    metrics: dict[str, Any] = dict(main.metrics)
    metrics.update({"evaluated_at_ms": now_ms(), "holdout_sha256": _sha256_file(holdout), "prompt_format": fmt,
                    "max_new_tokens": settings.tier3_student_max_tokens, "model": f"gguf-{quant}",
                    "base_model": manifest.base_model, "primary_metric": task.primary_metric,
                    "evaluated_via": {"server": "llama_cpp.server (tier3 serve's launcher)", "gguf": str(gguf),
                                      "gguf_sha256": _sha256_file(gguf), "quant": quant,
                                      "decoding": "greedy (temperature 0), as the router asks"}})
    dataset_info = _dataset_info(holdout)
    metrics["holdout_size"] = len(hold)
    metrics["contamination_rate"] = dataset_info.get("contamination_rate")
    metrics["split_rule"] = dataset_info.get("split_rule")
    const = constant_answer(train, task)
    metrics["slices"] = {name: {"served": _compact(res.metrics, baseline=name == "holdout"),
                                "f16": _compact(f16[name].metrics) if name in f16 else None,
                                "constant": score_constant(task, const, slices[name]),
                                "in_force": _compact(in_force[name].metrics) if name in in_force else None}
                         for name, res in served.items()}
    if "golden" in served:
        metrics["golden"] = metrics["slices"]["golden"]["served"]
    if "holdout" in f16:
        metrics["f16"] = _compact(f16["holdout"].metrics)
        metrics["quantisation_cost_task_f1"] = _diff(f16["holdout"].metrics.get("task_f1"),
                                                     main.metrics.get("task_f1"))
    pytorch = manifest.metrics.get("evaluation")
    report_dir = settings.reports_dir / run_id
    pytorch_rows = _read_rows(report_dir / "examples.jsonl") if pytorch else {}
    if pytorch_rows:
        write_atomic(report_dir / "examples_pytorch.jsonl", (report_dir / "examples.jsonl").read_bytes())
    if isinstance(pytorch, Mapping):
        metrics["pytorch"] = {k: pytorch.get(k) for k in SLICE_KEYS}
    metrics["agreement_pytorch_f16"] = _pytorch_agreement(pytorch_rows, f16.get("holdout"))

    metrics["paired"] = paired = {}
    if main.rows:
        paired["vs_production"] = paired_comparison(
            [r.student.task_f1 for r in main.rows], [r.baseline.task_f1 for r in main.rows],
            margin=settings.tier3_gate_baseline_margin, confidence=settings.tier3_gate_confidence,
            min_n=settings.tier3_gate_min_paired).as_dict()
    if "holdout" in in_force and also is not None:
        paired["vs_in_force"] = {"version": current.model_version if current else None, **paired_comparison(
            [r.student.task_f1 for r in main.rows], [r.student.task_f1 for r in in_force["holdout"].rows],
            margin=settings.tier3_gate_baseline_margin, confidence=settings.tier3_gate_confidence,
            min_n=settings.tier3_gate_min_paired).as_dict()}

    # -- the report and the record
    history: list[tuple[int, dict[str, Any]]] = []
    try:
        history = [(v, m) for v, m in view.history() if v != manifest.model_version]
    except TrainerError:
        pass
    paths = write_report(report_dir, run_id=run_id, model_version=manifest.model_version,
                         result=EvalResult(metrics=metrics, rows=main.rows), history=history)
    rows = [{"slice": name, "artifact": art, **asdict(r)} for art, results in (("served", served), ("f16", f16))
            for name, res in results.items() for r in res.rows]
    write_atomic(report_dir / "examples_served.jsonl", b"".join(orjson.dumps(r) + b"\n" for r in rows))
    md = paths["report_md"]
    write_atomic(md, (served_report_md(run_id, manifest.model_version, metrics) + "\n"
                      + md.read_text()).encode())
    metrics["report_dir"] = str(report_dir)
    write_manifest(run_dir, manifest.model_copy(update={"metrics": {**manifest.metrics,
                                                                     "served_evaluation": metrics}}))
    if publish:
        with TrainerEvents(settings) as writer:
            writer.record(evaluated_event(run_id, manifest, metrics))
    return RunEvaluation(run_id=run_id, model_version=manifest.model_version, metrics=metrics, report_paths=paths)


def _diff(a: Any, b: Any) -> float | None:
    return None if a is None or b is None else float(a) - float(b)


def _dataset_info(holdout: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((holdout.parent / "dataset.json").read_text()))
    except (OSError, ValueError, TypeError):
        return {}


def _f(v: Any) -> str:
    if v is None:
        return "–"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def served_report_md(run_id: str, version: int | None, m: Mapping[str, Any]) -> str:
    """The report's first section: what is served, on each slice, beside production, the constant answer, the f16
    export and the PyTorch model; the paired comparisons with their intervals."""
    cols = ("n_examples", "json_valid_rate", "schema_valid_rate", "set_f1_widgets", "f1", "task_f1", "exact_match",
            "latency_ms_p50", "latency_ms_p95")
    lines = [f"# What is served: run `{run_id}`" + (f" (v{version})" if version else ""), "",
             f"Artifact: `{m.get('evaluated_via', {}).get('gguf')}` through llama.cpp's server, asked as the router "
             f"asks (prompt format `{m.get('prompt_format')}`, greedy, at most {m.get('max_new_tokens')} tokens). "
             f"Decision metric: `{m.get('primary_metric')}`. Holdout: {m.get('holdout_size')} items, "
             f"contamination rate {_f(m.get('contamination_rate'))} ({m.get('split_rule') or 'split rule unknown'})."
             f" Base model: {m.get('base_model')}.", ""]
    for name, sl in (m.get("slices") or {}).items():
        lines += [f"## Slice `{name}`", "", "| row | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        rows: list[tuple[str, Mapping[str, Any] | None]] = [("served (" + str(m.get("model")) + ")", sl["served"])]
        if name == "holdout":
            base = {k: sl["served"].get(f"baseline_{k}") for k in cols}
            base["n_examples"] = sl["served"].get("n_examples")
            rows.append(("production (recorded)", base))
        rows += [("constant answer", sl.get("constant")), ("f16 GGUF", sl.get("f16")),
                 ("version in force", sl.get("in_force"))]
        if name == "holdout":
            rows.append(("merged PyTorch (diagnostic)", m.get("pytorch")))
        for label, r in rows:
            if r:
                lines.append(f"| {label} | " + " | ".join(_f(r.get(c)) for c in cols) + " |")
        lines.append("")
    agree = m.get("agreement_pytorch_f16")
    if agree:
        lines += [f"Greedy outputs identical between the merged PyTorch model and the f16 GGUF: {agree['identical']}"
                  f" of {agree['n']} ({agree['rate']:.2f}). Quantisation cost (f16 − served, task F1): "
                  f"{_f(m.get('quantisation_cost_task_f1'))}.", ""]
    for name, p in (m.get("paired") or {}).items():
        lines.append(f"Paired {name}: mean difference {_f(p.get('mean_diff'))}, {p.get('confidence')} interval "
                     f"[{_f(p.get('ci_low'))}, {_f(p.get('ci_high'))}], n {p.get('n')}, margin {p.get('margin')}: "
                     f"**{p.get('verdict')}** ({p.get('method')}).")
    return "\n".join(lines) + "\n"
