"""Evaluate a student on its run's holdout: agreement with the teacher, validity, latency; and a report.

For every holdout example the student answers the inference-time prompt (the production messages plus the
output-format instruction, exactly what it was trained on) with greedy decoding and a bounded length. Each
output is scored against the teacher's validated answer:

- **JSON validity**: the ``<answer>`` block (or the whole text, for a bare JSON reply) parses as JSON;
- **schema validity**: that JSON matches the task's answer schema;
- **exact match**: the answer equals the teacher's answer (same JSON value; list order counts);
- **field F1**: :func:`schemas.tasks.field_f1` (mean over the teacher's fields of set-F1 for set fields such
  as the widget list, exact match for the others); plus ``set_f1_<field>`` per set field (the widget-set F1).

The rule is :func:`schemas.tasks.score_output`, shared with the worker's online evaluation.

The production baseline (the ``response`` recorded in each experience, i.e. what the application actually
answered) is scored the same way, so the gate can ask "is the student at least as close to the teacher as
what production serves today?". An output that is not a JSON object scores 0 on agreement.

The student that is evaluated is the one that ships: the base model with the LoRA adapter merged into its
weights (``merge_and_unload``), prompted in the format it learnt last (``prompt_format`` in the adapter's
``tier3_adapter.json``: the answer-only or the reasoning instruction), decoded greedily with the KV cache, in
batches of ``TIER3_EVAL_BATCH_SIZE`` prompts (left padding).

Latency is what one request waits when it is served alone: the first ``TIER3_EVAL_LATENCY_SAMPLES`` examples are
generated once more, one at a time, and ``latency_ms_p50``/``latency_ms_p95`` are over those wall times (linear
interpolation between order statistics, numpy's default). A batch's wall time is not a request's latency: each row
keeps its batch's wall time as ``batch_ms``. ``tokens_per_s`` is generated tokens over the batches' total time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import orjson

from schemas import EnrichedTrace, TaskDefinition, TrainingRun, get_task
from schemas.runs import fold_runs
from schemas.runtime.stats import percentile
from schemas.tasks import OutputScore, score_output  # the one scoring rule, shared with the worker's online eval
from trainer.close_loop.settings import CloseLoopSettings
from trainer.errors import EvaluationError, TrainerError
from trainer.events import TrainerEvents, now_ms, read_run_events
from trainer.manifest import write_atomic

log = logging.getLogger("tier3.trainer.close_loop.evaluate")

#: ``generate(messages) -> (text, n_generated_tokens, latency_s)``; the trainer's ``inference.generate`` bound
#: to a loaded model, or a stub in tests.
Generate = Callable[[list[dict[str, str]]], tuple[str, int, float]]
#: ``generate_batch([messages, ...]) -> ([(text, n_generated_tokens), ...], wall_s of the batch)``
BatchGenerate = Callable[[list[list[dict[str, str]]]], tuple[list[tuple[str, int]], float]]


@dataclass(frozen=True)
class HoldoutExample:
    """What evaluation needs from one held-out trace."""

    experience_id: str
    prompt: list[dict[str, str]]  # the inference-time messages (trainer.dataset.inference_messages)
    teacher_answer: dict[str, Any]
    baseline_response: str  # experience.response: what production answered


def examples_from_traces(traces: Iterable[EnrichedTrace]) -> list[HoldoutExample]:
    """Project enriched traces into holdout examples (first occurrence of an experience id wins)."""
    from trainer.dataset import inference_messages

    seen: set[str] = set()
    out: list[HoldoutExample] = []
    for t in traces:
        if t.experience_id in seen:
            continue
        seen.add(t.experience_id)
        out.append(HoldoutExample(experience_id=t.experience_id,
                                  prompt=inference_messages(t.experience, reasoning=True),
                                  teacher_answer=dict(t.answer), baseline_response=t.experience.response))
    return out


def examples_from_holdout(path: Path, *, reasoning: bool = True) -> tuple[str | None, list[HoldoutExample]]:
    """(task name, examples) from a run's ``holdout.jsonl`` (written by trainer.dataset.build_dataset); the prompts
    ask for reasoning then the answer, or (``reasoning=False``) for the answer only."""
    task: str | None = None
    out: list[HoldoutExample] = []
    for line in Path(path).read_bytes().splitlines():
        if not line.strip():
            continue
        r = orjson.loads(line)
        task = task or r.get("task")
        prompt = r["messages"] if reasoning else r.get("answer_only_messages", r["messages"])
        out.append(HoldoutExample(experience_id=r["experience_id"], prompt=prompt,
                                  teacher_answer=r["teacher_answer"], baseline_response=r["production_response"]))
    return task, out


@dataclass(frozen=True)
class EvalRow:
    """One holdout example's outcome (kept in the report for inspection)."""

    experience_id: str
    output: str
    n_tokens: int
    latency_ms: float | None  # served alone (None: not one of the latency samples)
    student: OutputScore
    baseline: OutputScore
    batch_ms: float | None = None  # wall time of the batch this output came from


@dataclass(frozen=True)
class EvalResult:
    metrics: dict[str, Any]
    rows: list[EvalRow]


def _rates(prefix: str, scores: Sequence[OutputScore], set_fields: Sequence[str]) -> dict[str, float | None]:
    n = len(scores)

    def mean(xs: Iterable[float]) -> float | None:
        vals = list(xs)
        return sum(vals) / n if n else None

    out: dict[str, float | None] = {
        f"{prefix}json_valid_rate": mean(float(s.json_valid) for s in scores),
        f"{prefix}schema_valid_rate": mean(float(s.schema_valid) for s in scores),
        f"{prefix}exact_match": mean(float(s.exact) for s in scores),
        f"{prefix}f1": mean(s.f1 for s in scores),
        f"{prefix}task_f1": mean(s.task_f1 for s in scores),  # the task's primary metric (weighted fields)
    }
    for k in set_fields:
        out[f"{prefix}set_f1_{k}"] = mean(s.set_f1.get(k, 0.0) for s in scores)
    return out


def evaluate_examples(task: TaskDefinition, examples: Sequence[HoldoutExample], generate: Generate, *,
                      generate_batch: BatchGenerate | None = None, batch_size: int = 8,
                      latency_samples: int = 3) -> EvalResult:
    """Generate an answer for each example and compute the metrics (see the module docstring).

    With ``generate_batch`` the outputs come from batches of ``batch_size`` and ``generate`` (one request alone)
    is timed on the first ``latency_samples`` examples; without it every example goes through ``generate`` and
    each one's time is its latency.
    """
    from trainer.sft_trainer import progress_bar

    rows: list[EvalRow] = []
    gen_s = 0.0
    bar = progress_bar(len(examples), "evaluating", "example")
    try:
        if generate_batch is None:
            for ex in examples:
                text, n_tokens, latency_s = _guarded(ex.experience_id, generate, ex.prompt)
                gen_s += latency_s
                rows.append(_row(task, ex, text, n_tokens, latency_s * 1000.0, None))
                bar.update(1)
        else:
            size = max(1, batch_size)
            for i in range(0, len(examples), size):
                chunk = examples[i:i + size]
                outs, wall_s = _guarded(chunk[0].experience_id, generate_batch, [ex.prompt for ex in chunk])
                gen_s += wall_s
                for ex, (text, n_tokens) in zip(chunk, outs, strict=True):
                    rows.append(_row(task, ex, text, n_tokens, None, wall_s * 1000.0))
                bar.update(len(chunk))
    finally:
        bar.close()
    if generate_batch is not None:  # one request alone, for latency
        for j in range(min(latency_samples, len(rows))):
            _, _, latency_s = _guarded(examples[j].experience_id, generate, examples[j].prompt)
            rows[j] = replace(rows[j], latency_ms=latency_s * 1000.0)
    latencies_ms = [r.latency_ms for r in rows if r.latency_ms is not None]
    total_tokens = sum(r.n_tokens for r in rows)
    metrics: dict[str, Any] = {"task": task.name, "n_examples": len(rows), "latency_samples": len(latencies_ms),
                               "batch_size": batch_size if generate_batch is not None else 1,
                               "generation_s": gen_s}
    metrics.update(_rates("", [r.student for r in rows], task.set_fields))
    metrics.update(_rates("baseline_", [r.baseline for r in rows], task.set_fields))
    metrics.update({
        "latency_ms_p50": percentile(latencies_ms, 50),
        "latency_ms_p95": percentile(latencies_ms, 95),
        "generated_tokens": total_tokens,
        "tokens_per_s": (total_tokens / gen_s) if gen_s > 0 else None,
    })
    metrics["latency_ms_mean"] = (sum(latencies_ms) / len(latencies_ms)) if latencies_ms else None
    return EvalResult(metrics=metrics, rows=rows)


def _guarded(experience_id: str, call: Callable[[Any], Any], arg: Any) -> Any:
    try:
        return call(arg)
    except Exception as exc:  # one failing generation fails the evaluation: metrics must cover the holdout
        raise EvaluationError(f"generation failed on {experience_id}: {exc}") from exc


def _row(task: TaskDefinition, ex: HoldoutExample, text: str, n_tokens: int, latency_ms: float | None,
         batch_ms: float | None) -> EvalRow:
    return EvalRow(experience_id=ex.experience_id, output=text, n_tokens=int(n_tokens), latency_ms=latency_ms,
                   student=score_output(task, text, ex.teacher_answer),
                   baseline=score_output(task, ex.baseline_response, ex.teacher_answer), batch_ms=batch_ms)


def model_generators(adapter_dir: Path, max_new_tokens: int) -> tuple[Generate, BatchGenerate]:
    """Load the merged student once: (one request at a time, a batch at a time), both greedy with the KV cache."""
    from trainer.inference import cached_generators, load_merged_student

    model, tokenizer = load_merged_student(adapter_dir)
    return cached_generators(model, tokenizer, max_new_tokens)  # type: ignore[no-any-return]


# --------------------------------------------------------------------------------------------- report


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


PLOT_MARKERS = ("o", "s", "^", "D", "v", "P")
PLOT_DASHES = ("-", "--", ":", "-.")  # lines on top of each other show through each other's gaps


def plot_per_version(ax: Any, labels: Sequence[str], lines: Sequence[tuple[str, Sequence[float]]]) -> None:
    """Rates (0..1) per model version, one line each, every line visible even where they coincide (a student at 0
    on every version lies on the others and on the axis): each line is shifted a little sideways and has its own
    marker and dash pattern, the y axis starts below 0, and the legend sits below the axes, off the data."""
    n = len(lines)
    step = min(0.08, 0.5 / max(1, n))
    for j, (label, values) in enumerate(lines):
        dx = (j - (n - 1) / 2) * step
        ax.plot([i + dx for i in range(len(labels))], list(values), marker=PLOT_MARKERS[j % len(PLOT_MARKERS)],
                linestyle=PLOT_DASHES[j % len(PLOT_DASHES)], markersize=7 - min(j, 3), linewidth=1.6, label=label,
                zorder=3 + j, clip_on=False)
    ax.set_xticks(range(len(labels)), list(labels))
    ax.set_xlim(-0.5, len(labels) - 0.5)
    ax.set_ylim(-0.06, 1.06)
    ax.axhline(0, color="0.75", linewidth=0.8, zorder=1)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=min(3, max(1, n)), fontsize=8, frameon=False)


def write_report(report_dir: Path, *, run_id: str, model_version: int | None, result: EvalResult,
                 history: Sequence[tuple[int, Mapping[str, Any]]] = ()) -> dict[str, Path]:
    """Write ``report.md``, ``metrics.json``, ``examples.jsonl`` and PNG plots into ``report_dir``.

    ``history`` is (model_version, metrics) of earlier evaluated versions; the plots show them with this one.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot's import
    import matplotlib.pyplot as plt

    report_dir.mkdir(parents=True, exist_ok=True)
    m = result.metrics
    versions: dict[int, Mapping[str, Any]] = {int(v): hm for v, hm in history}
    if model_version is not None:
        versions[model_version] = m
    order = sorted(versions)
    paths: dict[str, Path] = {}

    paths["metrics"] = report_dir / "metrics.json"
    write_atomic(paths["metrics"], json.dumps({"run_id": run_id, "model_version": model_version, "metrics": m,
                                                "history": {str(v): dict(versions[v]) for v in order}},
                                               indent=2, sort_keys=True).encode())
    paths["examples"] = report_dir / "examples.jsonl"
    write_atomic(paths["examples"], b"".join(orjson.dumps(asdict(r)) + b"\n" for r in result.rows))

    def series(key: str) -> list[float]:  # a metric a version lacks is a gap, never a 0
        return [float(x) if isinstance(x := versions[v].get(key), int | float) else math.nan for v in order]

    if not order:  # no version number yet: plot this run alone
        versions, order = {0: m}, [0]
    labels = [f"v{v}" if v else "this run" for v in order]

    def per_version_plot(name: str, lines: list[tuple[str, str]], ylabel: str, title: str) -> None:
        fig, ax = plt.subplots(figsize=(6, 3.8))
        plot_per_version(ax, labels, [(label, series(key)) for key, label in lines])
        ax.set_xlabel("model version")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        paths[f"{name}_png"] = report_dir / f"{name}.png"
        fig.savefig(paths[f"{name}_png"], dpi=100, bbox_inches="tight")  # the legend sits below the axes
        plt.close(fig)

    per_version_plot("agreement", [("f1", "student F1 vs teacher"), ("exact_match", "student exact match"),
                                   ("baseline_f1", "production baseline F1")],
                     "agreement with teacher", "Agreement per model version")
    per_version_plot("validity", [("json_valid_rate", "JSON valid"), ("schema_valid_rate", "schema valid")],
                     "rate", "Output validity per model version")

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.hist([r.latency_ms for r in result.rows if r.latency_ms is not None] or [0.0], bins=20)
    ax1.set_xlabel("generation latency (ms)")
    ax1.set_ylabel("examples")
    ax1.set_title("This run")
    ax2.plot(labels, series("latency_ms_p50"), marker="o", label="p50")
    ax2.plot(labels, series("latency_ms_p95"), marker="s", label="p95")
    ax2.set_xlabel("model version")
    ax2.set_ylabel("ms")
    ax2.legend(fontsize=8)
    ax2.set_title("Latency per model version")
    fig.tight_layout()
    paths["latency_png"] = report_dir / "latency.png"
    fig.savefig(paths["latency_png"], dpi=100)
    plt.close(fig)

    lines = [
        f"# Evaluation of run `{run_id}`" + (f" (model version v{model_version})" if model_version else ""),
        "",
        f"Task `{m.get('task')}`, {m.get('n_examples')} holdout examples, greedy decoding.",
        "",
        "| metric | student | production baseline |",
        "|---|---|---|",
    ]
    for key in ["json_valid_rate", "schema_valid_rate", "exact_match", "f1",
                *[k for k in m if k.startswith("set_f1_")]]:
        lines.append(f"| {key} | {_fmt(m.get(key))} | {_fmt(m.get('baseline_' + key))} |")
    lines += [
        "",
        f"Latency (one request alone, {m.get('latency_samples')} samples) p50 {_fmt(m.get('latency_ms_p50'))} ms, "
        f"p95 {_fmt(m.get('latency_ms_p95'))} ms; {_fmt(m.get('tokens_per_s'))} tokens/s in batches of "
        f"{m.get('batch_size')} ({m.get('generated_tokens')} tokens generated).",
        "",
        "Agreement is measured against the teacher's validated answer on the run's holdout (never trained on).",
        "",
        "![agreement](agreement.png)",
        "![validity](validity.png)",
        "![latency](latency.png)",
        "",
    ]
    paths["report_md"] = report_dir / "report.md"
    write_atomic(paths["report_md"], "\n".join(lines).encode())
    return paths


# --------------------------------------------------------------------------------------------- a run


@dataclass(frozen=True)
class RunEvaluation:
    run_id: str
    model_version: int | None
    metrics: dict[str, Any]
    report_paths: dict[str, Path]


def evaluate_holdout(holdout_path: Path, generate: Generate, *, task_name: str | None = None,
                     max_examples: int = 0, generate_batch: BatchGenerate | None = None, batch_size: int = 8,
                     latency_samples: int = 3, reasoning: bool = True) -> EvalResult:
    """Evaluate on a run's ``holdout.jsonl``; ``max_examples`` > 0 evaluates only the first ones. An empty holdout
    gives ``n_examples == 0`` (the gate rejects it) rather than an error, so the run itself can still commit."""
    file_task, examples = examples_from_holdout(holdout_path, reasoning=reasoning)
    if max_examples:
        examples = examples[:max_examples]
    return evaluate_examples(get_task(file_task or task_name or "widget_selector"), examples, generate,
                             generate_batch=generate_batch, batch_size=batch_size, latency_samples=latency_samples)


def evaluate_and_report(settings: CloseLoopSettings, run_id: str, model_version: int | None, adapter_dir: Path,
                        holdout_path: Path, *, generate: Generate | None = None, read_history: bool = True
                        ) -> tuple[dict[str, Any], dict[str, Path]]:
    """Evaluate an adapter on a holdout file and write the report folder; return (metrics, report paths)."""
    from trainer.inference import adapter_prompt_format

    generate_batch: BatchGenerate | None = None
    if generate is None:
        generate, generate_batch = model_generators(adapter_dir, settings.tier3_eval_max_new_tokens)
    fmt = adapter_prompt_format(adapter_dir)
    result = evaluate_holdout(holdout_path, generate, task_name=settings.tier3_task,
                              max_examples=settings.tier3_eval_max_examples, generate_batch=generate_batch,
                              batch_size=settings.tier3_eval_batch_size,
                              latency_samples=settings.tier3_eval_latency_samples, reasoning=fmt == "reasoning")
    metrics = {**result.metrics, "evaluated_at_ms": now_ms(), "holdout_sha256": _sha256_file(holdout_path),
               "max_new_tokens": settings.tier3_eval_max_new_tokens, "prompt_format": fmt, "model": "merged"}
    history: list[tuple[int, dict[str, Any]]] = []
    if read_history:
        try:
            history = [(v, m) for v, m in fold_runs(read_run_events(settings)).history() if v != model_version]
        except TrainerError as exc:  # the plots' earlier versions are a nicety: never fail a run over them
            log.warning("report of %s without earlier versions: %s", run_id, exc)
    paths = write_report(settings.reports_dir / run_id, run_id=run_id, model_version=model_version,
                         result=EvalResult(metrics=metrics, rows=result.rows), history=history)
    metrics["report_dir"] = str(paths["report_md"].parent)
    return metrics, paths


def evaluation_hook(settings: CloseLoopSettings) -> Callable[..., dict[str, Any]]:
    """The commit protocol's ``RunContext.evaluate`` (``trainer.protocol.EvaluateFn``): (adapter dir,
    BuiltDataset, SFTConfig, run id, model version) -> metrics, stored in the manifest as
    ``metrics["evaluation"]`` before the offsets are committed."""

    def hook(adapter_dir: Path, built: Any, _cfg: Any, *, run_id: str, model_version: int) -> dict[str, Any]:
        metrics, _ = evaluate_and_report(settings, run_id, model_version, Path(adapter_dir),
                                         Path(built.holdout_path))
        return metrics

    return hook


def evaluated_event(run_id: str, manifest: Any, metrics: dict[str, Any]) -> TrainingRun:
    return TrainingRun(run_id=run_id, event="evaluated", at_ms=now_ms(), model_name=manifest.model_name,
                       model_version=manifest.model_version, base_model=manifest.base_model,
                       details={"metrics": metrics, "report_dir": metrics.get("report_dir")})


def evaluate_run(settings: CloseLoopSettings, run_id: str, *, generate: Generate | None = None,
                 publish: bool = True, source: Mapping[str, Any] | None = None) -> RunEvaluation:
    """``tier3 eval RUN_ID``: evaluate a trained run, store the metrics in its manifest (atomically, as
    ``metrics["evaluation"]``), write the report folder and publish an ``evaluated`` event. ``source`` says
    what generated (``tier3 eval --served``: the exported GGUF through a server) and lands in the metrics."""
    from trainer.manifest import find_manifest, write_manifest

    run_dir = settings.runs_dir / run_id
    manifest = find_manifest(settings.runs_dir, run_id)
    holdout = Path(manifest.dataset.holdout_path)
    holdout = holdout if holdout.is_absolute() else run_dir / holdout
    metrics, paths = evaluate_and_report(settings, run_id, manifest.model_version, run_dir / manifest.adapter_dir,
                                         holdout, generate=generate, read_history=publish)
    if source is not None:  # what answered: e.g. the exported GGUF through a server, not the adapter
        metrics["evaluated_via"] = dict(source)
        metrics["model"] = f"served ({source.get('via', 'server')})"
    write_manifest(run_dir, manifest.model_copy(update={"metrics": {**manifest.metrics, "evaluation": metrics}}))
    if publish:
        with TrainerEvents(settings) as writer:
            writer.record(evaluated_event(run_id, manifest, metrics))
    return RunEvaluation(run_id=run_id, model_version=manifest.model_version, metrics=metrics, report_paths=paths)


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
