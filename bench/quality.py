"""Distillation quality on the widget-selector example data, **as served**: every row on the GGUF that would ship.

Data: ``examples/widget_selector/experiences.jsonl`` joined with ``recorded_teacher.jsonl`` (the rule-based
example teacher's answers) by experience id: 336 traces (``--examples DIR`` reads both files from another folder,
e.g. ``make_examples.py --variety wide --out DIR``: the same scenarios and labelling rules with more phrasings,
entities, time phrases, framings and typing noise). Two slices score every row:

- ``holdout``: the **near-twin-free holdout** of the example traces: :func:`trainer.split.split_holdout` at
  ``--holdout-fraction`` (default 0.10, the product's; about 29 of 336 traces), i.e. whole groups of near-duplicate
  questions, never trained on. The training pool is every other trace less any trace that is a near-twin of a
  holdout trace (none, by construction of the groups; checked again here). The report records ``holdout_size``
  and the split's independent check, ``contamination_rate`` (share of the holdout with a near-twin in the pool,
  Jaccard >= ``trainer.split.NEAR_DUP_JACCARD``: 0.0 by construction) and ``contamination_rate_loose`` (at
  ``LOOSE_JACCARD``, for information);
- ``golden``: the user's own evaluation set (``--golden``, default ``examples/widget_selector/golden.jsonl``: 54
  hand-written requests with reference answers labelled by the example teacher's rules); ``--golden ''`` drops it.

Rows (``--rows``, comma-separated; default all):

- ``constant``: the most common teacher answer of the training pool, given to every item
  (:func:`trainer.close_loop.served_eval.constant_answer`): what "no learning" scores;
- ``teacher``: the teacher's recorded outputs on the holdout; on the golden slice its reference answers (labelled
  with the example teacher's rules, so the teacher's own answer): 1.0 by construction, the scorer's ceiling;
- ``production``: what the example production model answered (recorded in each experience; the gate's baseline).
  Holdout only: golden items have no production answer;
- ``base``: the base model zero-shot (no adapter), answer-only prompt, **converted to GGUF the same way as the
  students** (the base folder with llama.cpp's converter at ``--quant``) and served;
- ``answer-N`` for N in ``--traces``: a student trained on the first N traces of the pool with the answer-only
  curriculum (``--answer-phases``), then merged (``merge_adapter``), converted to GGUF at ``--quant`` and served;
- ``multitask-N``: the same with Distilling Step-by-Step (``--multitask-phases``, default ``multitask:3``): each
  trace trains the answer task and a separate rationale task (loss weight ``--rationale-weight``, default the
  product's ``TIER3_RATIONALE_WEIGHT``), served answer-only;
- ``rationale-N``: rationale-then-answer (``--rationale-phases``, default ``reasoning:6``): trained and prompted to
  give the reasoning, then the answer;
- ``reasoning-N``: the reasoning curriculum (``--reasoning-phases``, default ``answer:2,reasoning:4``), prompted for
  reasoning then the answer.

**Equal compute.** The default phases give every student row the same number of optimiser steps: six passes of
one example per trace (``answer:6``, ``reasoning:6``, ``answer:2,reasoning:4``) or three passes of two examples per
trace (``multitask:3``), i.e. ``6 * N / TIER3_BATCH_SIZE`` steps (rounded up per pass); the trained tokens differ
(a rationale is longer than an answer) and are reported per row (``training.tokens``), so both halves of the
budget are stated. A student row name may end in ``-sSEED`` (``answer-50-s43``) to train with that
``TIER3_SEED``; ``--seeds 42,43,44`` expands the default student rows over the seeds, and ``aggregate`` in the
report gives each (kind, N) the mean, minimum and maximum over its seeds of every slice column.

How a model row is evaluated (``evaluated_via`` in each row): the GGUF is served by ``tier3 serve``'s launcher
(:class:`trainer.close_loop.serve.LlamaServer`: llama-cpp-python's OpenAI-compatible server on a free loopback
port) and every item is asked as the production router asks (:func:`trainer.close_loop.served_eval.ask_served`):
the production messages plus the output-format instruction of the student's prompt format, greedy, at most
``--max-new-tokens`` (default ``TIER3_STUDENT_MAX_TOKENS``) tokens, one request at a time. These are the figures of
what ships, not of the PyTorch model. Optional diagnostics: ``--f16`` also serves the f16 GGUF (``f16`` and
``quantisation_cost_task_f1`` = f16 − served), ``--pytorch`` also evaluates the merged PyTorch model in batches
(the path this script used before: ``pytorch`` in the row; its latency is not a served latency).

Columns per slice (``slices.<slice>`` of each row; a markdown table is printed to stderr at the end):
``n_examples``, ``json_valid_rate``, ``schema_valid_rate``, ``set_f1_widgets`` (widget-set F1), ``f1`` (field F1),
``task_f1`` (the task's primary metric: the gate decides on it), ``exact_match`` (all against the teacher's answer
or the golden reference), and for served rows ``latency_ms_p50`` / ``latency_ms_p95`` (wall time of each request
to the server, alone). Per student row, ``training``: ``train_wall_s`` (the optimiser loop), ``wall_s`` (load +
train + adapter write), ``steps`` (optimiser steps), ``tokens`` and ``tokens_per_s`` (trained tokens over the
optimiser loop's time), so that equal-compute comparisons can be stated. Nothing here is tuned to a goal; the
training settings are the product's defaults (``trainer.sft_config.SFTConfig``, environment overrides apply)
except the curriculum and, with ``--base-model``, the base model.

    # quick (SmolLM2, one student; roughly 15-20 min on 2 idle CPU cores, most of it training)
    .venv/bin/python bench/quality.py --rows constant,teacher,production,answer-50 --traces 50 \\
        --out bench/results/quality-served-answer-50.json
    # the schedules at equal compute over three seeds (SmolLM2; about 25 min a row on 2 CPU cores)
    .venv/bin/python bench/quality.py --rows answer-50,multitask-50,rationale-50,reasoning-50 --seeds 42,43,44 \\
        --out bench/results/quality-schedules-50.json
    # everything (SmolLM2: base, all four schedules at N=50/100/200, with the f16 and PyTorch diagnostics): hours
    .venv/bin/python bench/quality.py --f16 --pytorch --out bench/results/quality-served-all.json
    # the tiny random model (plumbing only, it learns nothing; under a minute; tests/test_bench_quality.py)
    .venv/bin/python bench/quality.py --base-model "$(.venv/bin/python -c \\
        'from trainer.tiny_model import build_tiny_model; print(build_tiny_model("/tmp/tiny"))')" \\
        --rows constant,production,teacher,answer-8 --traces 8 --max-new-tokens 32

The base row serves an answer-only prompt to a model that does not stop by itself: each item runs to
``--max-new-tokens``, so on SmolLM2 it alone takes tens of minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
EXAMPLES = ROOT / "examples" / "widget_selector"
GOLDEN = EXAMPLES / "golden.jsonl"
TASK_NAME = "widget_selector"
HOLDOUT_FRACTION = 0.10  # the product's default (SFTConfig.tier3_holdout_fraction)
SLICE_COLUMNS = ("n_examples", "json_valid_rate", "schema_valid_rate", "set_f1_widgets", "f1", "task_f1",
                 "exact_match", "latency_ms_p50", "latency_ms_p95")
SERVER = "llama_cpp.server through tier3 serve's launcher (trainer.close_loop.serve.LlamaServer)"
DECODING = "greedy (temperature 0), one request at a time, as the router asks (served_eval.ask_served)"


# ------------------------------------------------------------------------------------------- the data


def load_traces(examples: Path = EXAMPLES) -> list[Any]:
    """Example experiences + the recorded teacher's answers (both files in ``examples``), as enriched traces (log
    order = file order)."""
    import orjson

    from schemas import EnrichedTrace, Experience, decode, get_task
    from schemas.messages import SourceOffset, TeacherInfo

    teacher = {}
    for line in (examples / "recorded_teacher.jsonl").read_bytes().splitlines():
        if line.strip():
            r = orjson.loads(line)
            teacher[r["experience_id"]] = r
    out = []
    for i, line in enumerate((examples / "experiences.jsonl").read_bytes().splitlines()):
        if not line.strip():
            continue
        e = decode(line, Experience)
        rec = teacher.get(e.experience_id)
        if rec is None:
            continue
        reasoning, answer = get_task(e.task).parse_output(rec["text"])
        out.append(EnrichedTrace(
            experience_id=e.experience_id, task=e.task, enriched_at_ms=e.created_at_ms, sample_reason="random",
            experience=e, teacher=TeacherInfo(kind="recorded", model=rec["model"], latency_ms=0.0, attempts=1,
                                              recorded=True),
            reasoning=reasoning, answer=answer, source=SourceOffset(topic="bench", partition=0, offset=i)))
    return out


def twin_free_split(traces: Sequence[Any], fraction: float = HOLDOUT_FRACTION
                    ) -> tuple[list[Any], list[Any], dict[str, Any]]:
    """(pool, holdout, info): the holdout of ``trainer.split`` at ``fraction`` (whole near-twin groups); the pool is
    every other trace that has no near-twin in the holdout (all of them, since groups are closed under twins: the
    filter is a second guard, counted in ``info["twins_excluded_from_pool"]``). ``info`` carries the split's
    independent contamination check (strict and loose)."""
    from trainer.split import (
        LOOSE_JACCARD,
        NEAR_DUP_JACCARD,
        SPLIT_RULE,
        contamination_rate,
        features,
        jaccard,
        split_holdout,
        user_text,
    )

    texts = {t.experience_id: user_text(t.experience) for t in traces}
    sp = split_holdout(texts.items(), fraction)
    holdout = [t for t in traces if sp.is_holdout(t.experience_id)]
    hold_sets = [features(texts[t.experience_id]) for t in holdout]
    rest = [t for t in traces if not sp.is_holdout(t.experience_id)]
    pool = [t for t in rest
            if not any(jaccard(features(texts[t.experience_id]), h) >= NEAR_DUP_JACCARD for h in hold_sets)]
    hold_texts = [texts[t.experience_id] for t in holdout]
    pool_texts = [texts[t.experience_id] for t in pool]
    info = {"split_rule": SPLIT_RULE, "holdout_fraction": fraction, "n_traces": len(traces),
            "holdout_size": len(holdout), "pool_size": len(pool), "n_near_dup_groups": sp.n_near_dup_groups,
            "twins_excluded_from_pool": len(rest) - len(pool),
            "contamination_rate": contamination_rate(hold_texts, pool_texts, NEAR_DUP_JACCARD),
            "contamination_rate_loose": contamination_rate(hold_texts, pool_texts, LOOSE_JACCARD),
            "thresholds": {"strict": NEAR_DUP_JACCARD, "loose": LOOSE_JACCARD}}
    return pool, holdout, info


def split(traces: Sequence[Any], n_holdout: int | None = None, *, fraction: float = HOLDOUT_FRACTION
          ) -> tuple[list[Any], list[Any]]:
    """(pool, holdout) of :func:`twin_free_split`; ``n_holdout`` keeps only the first holdout traces (the pool
    still excludes every holdout group, so no twin straddles). Kept for ``bench/quality_curve.py``."""
    pool, holdout, _ = twin_free_split(traces, fraction)
    return pool, holdout[:n_holdout] if n_holdout else holdout


def contamination(items: Sequence[str], train: Sequence[str]) -> dict[str, float]:
    from trainer.split import LOOSE_JACCARD, NEAR_DUP_JACCARD, contamination_rate

    return {"contamination_rate": contamination_rate(items, train, NEAR_DUP_JACCARD),
            "contamination_rate_loose": contamination_rate(items, train, LOOSE_JACCARD)}


class Slices:
    """The items of each slice, with the prompts of either format (built once)."""

    def __init__(self, holdout: Sequence[Any], golden: Path | None, task: Any) -> None:
        from trainer.close_loop.evaluate import HoldoutExample
        from trainer.close_loop.served_eval import load_golden
        from trainer.dataset import inference_messages

        self.task = task
        self.holdout_traces = list(holdout)
        self.golden_path = golden
        self._by_format: dict[bool, dict[str, list[HoldoutExample]]] = {}
        for reasoning in (False, True):
            slices = {"holdout": [HoldoutExample(
                experience_id=t.experience_id, prompt=inference_messages(t.experience, reasoning=reasoning, task=task),
                teacher_answer=dict(t.answer), baseline_response=t.experience.response) for t in holdout]}
            if golden is not None:
                slices["golden"] = load_golden(golden, task, reasoning=reasoning)
            self._by_format[reasoning] = slices

    def examples(self, prompt_format: str) -> dict[str, list[Any]]:
        return self._by_format[prompt_format == "reasoning"]

    @property
    def names(self) -> list[str]:
        return list(self._by_format[False])


# ------------------------------------------------------------------------------------------- scoring


def slice_metrics(m: Mapping[str, Any]) -> dict[str, Any]:
    return {k: m.get(k) for k in SLICE_COLUMNS}


def score_texts(task: Any, pairs: Sequence[tuple[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """Recorded or constant outputs scored with the one rule; no generation, so no latency."""
    from schemas.tasks import score_output
    from trainer.close_loop.evaluate import _rates

    out: dict[str, Any] = {"n_examples": len(pairs)}
    out.update(_rates("", [score_output(task, text, ref) for text, ref in pairs], task.set_fields))
    out.update({"latency_ms_p50": None, "latency_ms_p95": None})
    return slice_metrics(out)


def output_rows(res: Any) -> list[dict[str, Any]]:
    return [{"experience_id": r.experience_id, "output": r.output, "n_tokens": r.n_tokens,
             "latency_ms": r.latency_ms, "json_valid": r.student.json_valid, "task_f1": r.student.task_f1}
            for r in res.rows]


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _diff(a: Any, b: Any) -> float | None:
    return None if a is None or b is None else float(a) - float(b)


# ------------------------------------------------------------------------------------------- serving


def servable_base_copy(base: str, out: Path) -> Path:
    """The base model as a folder the converter takes, with what ``merge_adapter`` does to a student's folder:
    the training-only ``{% generation %}`` markers out of the chat template and a byte-level BPE tokenizer that
    llama.cpp reads as one. A local folder is linked file by file (the tokenizer files copied: they are edited);
    a hub id is loaded and saved."""
    from trainer.close_loop.export import plain_byte_level_bpe, strip_generation_markers

    src = Path(base)
    out.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        for f in src.iterdir():
            if f.is_file():
                if f.name.startswith("tokenizer") or f.name.endswith((".jinja", ".json")):
                    shutil.copy2(f, out / f.name)
                else:
                    os.symlink(f.resolve(), out / f.name)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        AutoModelForCausalLM.from_pretrained(base).save_pretrained(str(out), safe_serialization=True)
        AutoTokenizer.from_pretrained(base).save_pretrained(str(out))
    strip_generation_markers(out)
    plain_byte_level_bpe(out)
    return out


def to_gguf(settings: Any, model_dir: Path, out_dir: Path, stem: str, outtypes: Sequence[str]) -> dict[str, Path]:
    """llama.cpp's converter (what ``tier3 export`` runs) on a Hugging Face folder, one GGUF per type."""
    from trainer.close_loop.gguf_converter import convert_to_gguf, declared_pre_tokenizer, ensure_converter

    converter = ensure_converter(settings)
    pre = declared_pre_tokenizer(settings.tier3_gguf_pre_tokenizer, model_dir)
    return {t: convert_to_gguf(model_dir, out_dir / f"{stem}-{t}.gguf", t, converter, pre_tokenizer=pre,
                               model_name=stem) for t in dict.fromkeys(outtypes)}


def served_row(settings: Any, ggufs: Mapping[str, Path], alias: str, slices: Slices, prompt_format: str,
               a: argparse.Namespace) -> dict[str, Any]:
    """Serve the GGUF of the serving quantisation (and the f16 one with ``--f16``) and ask every slice."""
    from trainer.close_loop.served_eval import ask_served

    examples = slices.examples(prompt_format)
    quant = settings.tier3_gguf_quant
    t0 = time.perf_counter()
    served, _ = ask_served(settings, ggufs[quant], alias, slices.task, examples)
    eval_s = time.perf_counter() - t0
    gguf = ggufs[quant]
    row: dict[str, Any] = {
        "prompt_format": prompt_format,
        "evaluated_via": {"server": SERVER, "gguf": gguf.name, "gguf_sha256": _sha256(gguf),
                          "gguf_bytes": gguf.stat().st_size, "quant": quant, "decoding": DECODING,
                          "max_tokens": settings.tier3_student_max_tokens, "n_ctx": settings.tier3_serve_n_ctx},
        "slices": {name: slice_metrics(res.metrics) for name, res in served.items()},
        "eval_wall_s": eval_s,
        "outputs": {name: output_rows(res) for name, res in served.items()},
    }
    if a.f16 and quant != "f16":
        f16, _ = ask_served(settings, ggufs["f16"], f"{alias}-f16", slices.task, examples)
        row["f16"] = {name: slice_metrics(res.metrics) for name, res in f16.items()}
        row["quantisation_cost_task_f1"] = {name: _diff(f16[name].metrics.get("task_f1"),
                                                        served[name].metrics.get("task_f1")) for name in served}
    return row


def pytorch_diagnostic(model: Any, tokenizer: Any, slices: Slices, prompt_format: str, settings: Any,
                       a: argparse.Namespace) -> dict[str, Any]:
    """The merged PyTorch model, batched, greedy, with the KV cache (what ``trainer.close_loop.evaluate`` does):
    the figure this script reported before it evaluated what is served. Its latency is not a served one."""
    from trainer.close_loop.evaluate import evaluate_examples
    from trainer.inference import cached_generators

    gen, gen_batch = cached_generators(model, tokenizer, settings.tier3_student_max_tokens)
    out: dict[str, Any] = {}
    for name, examples in slices.examples(prompt_format).items():
        res = evaluate_examples(slices.task, examples, gen, generate_batch=gen_batch, batch_size=a.batch_size,
                                latency_samples=a.latency_samples)
        out[name] = {**slice_metrics(res.metrics), "tokens_per_s": res.metrics.get("tokens_per_s")}
    return out


# ------------------------------------------------------------------------------------------- rows


def row_base(base: str, slices: Slices, settings: Any, work: Path, a: argparse.Namespace) -> dict[str, Any]:
    folder = servable_base_copy(base, work / "base-hf")
    outtypes = [settings.tier3_gguf_quant, *(["f16"] if a.f16 else [])]
    t0 = time.perf_counter()
    ggufs = to_gguf(settings, folder, work / "base-gguf", "base", outtypes)
    convert_s = time.perf_counter() - t0
    row = {"row": "base", "label": "base model zero-shot (no adapter), answer-only prompt", "kind": "model",
           "base_model": base,
           "artifact": f"the base folder converted to {settings.tier3_gguf_quant} GGUF with llama.cpp's converter, "
                       "as the students are (not the GGUF a base model's wheel may ship)",
           "convert_wall_s": convert_s, **served_row(settings, ggufs, "base", slices, "answer", a)}
    if a.pytorch:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(base).eval()
        row["pytorch"] = pytorch_diagnostic(model, AutoTokenizer.from_pretrained(base), slices, "answer",
                                            settings, a)
    return row


def row_student(kind: str, n: int, pool: Sequence[Any], slices: Slices, base: str, settings: Any, work: Path,
                a: argparse.Namespace, seed: int | None = None) -> dict[str, Any]:
    from trainer.close_loop.export import merge_adapter
    from trainer.dataset import build_dataset
    from trainer.inference import load_merged_student, prompt_format
    from trainer.sft_config import SFTConfig
    from trainer.sft_trainer import train
    from trainer.split import user_text

    if n > len(pool):
        sys.exit(f"row {kind}-{n}: the training pool has only {len(pool)} traces")
    phases = {"answer": a.answer_phases, "multitask": a.multitask_phases, "rationale": a.rationale_phases,
              "reasoning": a.reasoning_phases}[kind]
    extra: dict[str, Any] = {}
    if a.rationale_weight is not None:
        extra["tier3_rationale_weight"] = a.rationale_weight
    if seed is not None:
        extra["tier3_seed"] = seed
    cfg = SFTConfig(tier3_phases=phases, tier3_holdout_fraction=0.0, tier3_backend="trl",
                    tier3_base_model=base, **extra)  # type: ignore[call-arg]
    name = f"{kind}-{n}" + (f"-s{seed}" if seed is not None else "")
    d = work / name
    ds = build_dataset(pool[:n], cfg, d / "data")
    r = train(ds, cfg, d)
    fmt = prompt_format(cfg.phases)
    t0 = time.perf_counter()
    merged = merge_adapter(r.adapter_dir, d / "merged")
    outtypes = [settings.tier3_gguf_quant, *(["f16"] if a.f16 else [])]
    ggufs = to_gguf(settings, merged, d / "gguf", name, outtypes)
    export_s = time.perf_counter() - t0
    trained = {t.experience_id: user_text(t.experience) for t in pool[:n]}
    row: dict[str, Any] = {
        "row": name, "label": f"student {kind} N={n}", "kind": "student", "student_kind": kind, "n": n,
        "seed": cfg.tier3_seed, "base_model": base, "phases": phases, "n_train": ds.n_train,
        "n_rationale": ds.n_rationale,
        "rationale_weight": cfg.tier3_rationale_weight if kind == "multitask" else None,
        "training": {"train_wall_s": r.train_wall_s, "wall_s": r.wall_s, "steps": r.steps, "tokens": r.tokens,
                     "tokens_per_s": r.tokens_per_s, "train_loss": r.train_loss, "phase_losses": r.phase_losses,
                     "backend": r.backend},
        "hyperparameters": {k: v for k, v in r.hyperparameters.items() if k.startswith("tier3_")},
        "holdout_vs_train": contamination([user_text(t.experience) for t in slices.holdout_traces],
                                          list(trained.values())),
        "artifact": f"LoRA merged (merge_adapter), converted to {settings.tier3_gguf_quant} GGUF (llama.cpp's "
                    "converter, as tier3 export does)",
        "export_wall_s": export_s,
        **served_row(settings, ggufs, f"student-{name}", slices, fmt, a),
    }
    if a.pytorch:
        model, tok = load_merged_student(r.adapter_dir)
        row["pytorch"] = pytorch_diagnostic(model, tok, slices, fmt, settings, a)
    return row


def row_recorded(kind: str, slices: Slices, examples: Path = EXAMPLES) -> dict[str, Any]:
    """The teacher's recorded text or production's recorded response, scored like a student's output."""
    import orjson

    task = slices.task
    hold = slices.holdout_traces
    row: dict[str, Any] = {"row": kind, "kind": "recorded"}
    if kind == "teacher":
        teacher = {}
        for line in (examples / "recorded_teacher.jsonl").read_bytes().splitlines():
            if line.strip():
                r = orjson.loads(line)
                teacher[r["experience_id"]] = r["text"]
        row["label"] = "teacher (rule-based example teacher, recorded)"
        row["slices"] = {"holdout": score_texts(task, [(teacher[t.experience_id], t.answer) for t in hold])}
        if "golden" in slices.names:
            # the golden references are labelled with the example teacher's rules: they are its answers
            golden = slices.examples("answer")["golden"]
            row["slices"]["golden"] = score_texts(task, [(task.format_output(ex.teacher_answer, None),
                                                          ex.teacher_answer) for ex in golden])
        row["evaluated_via"] = {"recorded": "recorded_teacher.jsonl on the holdout; the golden references (labelled "
                                            "with the example teacher's rules) on the golden slice",
                                "note": "1.0 by construction: the scorer's ceiling; no generation, no latency"}
    else:
        row["label"] = "production model (recorded responses)"
        row["slices"] = {"holdout": score_texts(task, [(t.experience.response, t.answer) for t in hold])}
        row["slices_not_applicable"] = {"golden": "golden items have no production answer"}
        row["evaluated_via"] = {"recorded": "experience.response (what production answered)",
                                "note": "no generation, no latency"}
    return row


def row_constant(pool: Sequence[Any], slices: Slices, work: Path) -> dict[str, Any]:
    from trainer.close_loop.served_eval import constant_answer, score_constant
    from trainer.dataset import build_dataset
    from trainer.sft_config import SFTConfig

    ds = build_dataset(pool, SFTConfig(tier3_phases="answer:1", tier3_holdout_fraction=0.0), work / "constant")
    answer = constant_answer(ds.train_path, slices.task)
    out: dict[str, Any] = {}
    for name, examples in slices.examples("answer").items():
        m = score_constant(slices.task, answer, examples) or {}
        out[name] = slice_metrics({**m, "latency_ms_p50": None, "latency_ms_p95": None})
    return {"row": "constant", "label": "constant answer (the training pool's most common teacher answer)",
            "kind": "constant", "answer": answer, "from": f"training pool ({len(pool)} traces)", "slices": out,
            "evaluated_via": {"constant": "served_eval.constant_answer / score_constant", "note": "no model"}}


# ------------------------------------------------------------------------------------------- report


def _f(v: Any) -> str:
    if v is None:
        return "–"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def aggregate(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Student rows grouped by (kind, N) over their seeds: mean, min and max of every slice column and of the
    training budget (steps, tokens, train_wall_s), so a difference between kinds can be read against the spread
    between seeds."""
    groups: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
    for r in rows:
        if r.get("kind") == "student":
            groups.setdefault((r["student_kind"], r["n"]), []).append(r)
    out = []
    for (kind, n), rs in groups.items():
        g: dict[str, Any] = {"group": f"{kind}-{n}", "student_kind": kind, "n": n, "phases": rs[0]["phases"],
                             "seeds": [r["seed"] for r in rs], "slices": {}, "training": {}}
        for sl in {s for r in rs for s in (r.get("slices") or {})}:
            g["slices"][sl] = {}
            for c in SLICE_COLUMNS:
                vals = [r["slices"][sl][c] for r in rs if sl in r["slices"] and r["slices"][sl].get(c) is not None]
                if vals:
                    g["slices"][sl][c] = {"mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals)}
        for c in ("steps", "tokens", "train_wall_s", "tokens_per_s"):
            vals = [r["training"][c] for r in rs if r["training"].get(c) is not None]
            if vals:
                g["training"][c] = {"mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals)}
        out.append(g)
    return out


def table(report: Mapping[str, Any]) -> str:
    """The rows as markdown, one table per slice."""
    lines: list[str] = []
    for name in report.get("slice_names", []):
        lines += [f"## {name}", "", "| row | " + " | ".join(SLICE_COLUMNS) + " | train s | steps | tok/s |",
                  "|---" * (len(SLICE_COLUMNS) + 4) + "|"]
        for row in report["rows"]:
            m = (row.get("slices") or {}).get(name)
            if m is None:
                continue
            tr = row.get("training") or {}
            lines.append(f"| {row['row']} | " + " | ".join(_f(m.get(c)) for c in SLICE_COLUMNS)
                         + f" | {_f(tr.get('train_wall_s'))} | {_f(tr.get('steps'))} | {_f(tr.get('tokens_per_s'))} |")
        lines.append("")
    groups = report.get("aggregate") or []
    if any(len(g["seeds"]) > 1 for g in groups):
        lines += ["## over seeds (mean [min, max] of field F1, `f1`)", "",
                  "| group | seeds | steps | tokens | " + " | ".join(report.get("slice_names", [])) + " |",
                  "|---" * (4 + len(report.get("slice_names", []))) + "|"]
        for g in groups:
            cells = []
            for name in report.get("slice_names", []):
                m = g["slices"].get(name, {}).get("f1")
                cells.append("–" if m is None else f"{m['mean']:.3f} [{m['min']:.3f}, {m['max']:.3f}]")
            tr = g["training"]
            lines.append(f"| {g['group']} | {len(g['seeds'])} | {_f(tr.get('steps', {}).get('mean'))} | "
                         f"{_f(tr.get('tokens', {}).get('mean'))} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


STUDENT_KINDS = ("answer", "multitask", "rationale", "reasoning")


def _student(name: str) -> tuple[str, int, int | None] | None:
    """``kind-N`` or ``kind-N-sSEED`` -> (kind, N, seed or None); anything else -> None."""
    parts = name.split("-")
    if len(parts) not in (2, 3) or parts[0] not in STUDENT_KINDS or not parts[1].isdigit():
        return None
    if len(parts) == 3:
        if not (parts[2].startswith("s") and parts[2][1:].isdigit()):
            return None
        return parts[0], int(parts[1]), int(parts[2][1:])
    return parts[0], int(parts[1]), None


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="", help="comma-separated: constant, teacher, production, base, answer-N, "
                    "multitask-N, rationale-N, reasoning-N, each student row optionally ending in -sSEED (default: "
                    "all, with N from --traces)")
    ap.add_argument("--seeds", default="", help="comma-separated TIER3_SEED values: every student row without "
                    "its own -sSEED is trained once per seed (default: the product's seed only)")
    ap.add_argument("--traces", default="50,100,200", help="N values for the default rows")
    ap.add_argument("--base-model", default=None, help="base model of the students and the base row: a name "
                    "(smollm2-135m, tiny), a local folder or a hub id (default: the product's, SFTConfig / "
                    "TIER3_BASE_MODEL)")
    ap.add_argument("--holdout-fraction", type=float, default=HOLDOUT_FRACTION,
                    help="target share of the near-twin-free holdout (trainer/split.py)")
    ap.add_argument("--examples", type=Path, default=EXAMPLES,
                    help="folder with experiences.jsonl and recorded_teacher.jsonl (default the committed example "
                         "data; e.g. the output of make_examples.py --variety wide)")
    ap.add_argument("--golden", default=str(GOLDEN), help="golden set JSONL ('' for none)")
    ap.add_argument("--quant", default=None, help="GGUF type served (default TIER3_GGUF_QUANT, q8_0)")
    ap.add_argument("--f16", action="store_true", help="also serve the f16 GGUF (the quantisation's cost)")
    ap.add_argument("--pytorch", action="store_true",
                    help="also evaluate the merged PyTorch model, batched (diagnostic column, the former path)")
    ap.add_argument("--answer-phases", default="answer:6", help="answer-only curriculum (the product default)")
    ap.add_argument("--multitask-phases", default="multitask:3", help="Distilling Step-by-Step (two examples "
                    "per trace: 3 passes = the steps of answer:6)")
    ap.add_argument("--rationale-phases", default="reasoning:6", help="rationale-then-answer")
    ap.add_argument("--reasoning-phases", default="answer:2,reasoning:4",
                    help="the reasoning curriculum (the steps of answer:6)")
    ap.add_argument("--rationale-weight", type=float, default=None,
                    help="multitask rows: the rationale examples' loss weight (default TIER3_RATIONALE_WEIGHT)")
    ap.add_argument("--max-new-tokens", type=int, default=None,
                    help="bound of one answer (default TIER3_STUDENT_MAX_TOKENS: what the router asks)")
    ap.add_argument("--serve-threads", type=int, default=None, help="server threads (default TIER3_SERVE_THREADS)")
    ap.add_argument("--batch-size", type=int, default=8, help="--pytorch only")
    ap.add_argument("--latency-samples", type=int, default=3, help="--pytorch only")
    ap.add_argument("--work-dir", type=Path, help="keep datasets, adapters, merged models and GGUFs here "
                    "(default: a temporary folder, removed at the end)")
    ap.add_argument("--out", type=Path, help="also write the JSON here (written after every row)")
    ap.add_argument("--no-outputs", action="store_true", help="leave the per-item outputs out of the JSON")
    a = ap.parse_args(argv)

    from schemas import get_task
    from trainer.close_loop.settings import CloseLoopSettings
    from trainer.models import resolve_base_model
    from trainer.sft_config import SFTConfig
    from trainer.split import user_text

    update: dict[str, Any] = {}
    if a.quant:
        update["tier3_gguf_quant"] = a.quant
    if a.max_new_tokens:
        update["tier3_student_max_tokens"] = a.max_new_tokens
    if a.serve_threads is not None:
        update["tier3_serve_threads"] = a.serve_threads
    settings = CloseLoopSettings().model_copy(update=update)
    task = get_task(TASK_NAME)
    base = resolve_base_model(a.base_model or SFTConfig().tier3_base_model)

    traces = load_traces(a.examples)
    pool, holdout, info = twin_free_split(traces, a.holdout_fraction)
    golden = Path(a.golden) if a.golden else None
    slices = Slices(holdout, golden, task)
    ns = [int(x) for x in a.traces.split(",") if x.strip()]
    wanted = [r.strip() for r in a.rows.split(",") if r.strip()] or [
        "constant", "teacher", "production", "base",
        *[f"{k}-{n}" for n in ns for k in ("answer", "multitask", "rationale", "reasoning")]]
    seeds = [int(x) for x in a.seeds.split(",") if x.strip()]
    if seeds:  # a student row without its own seed, once per seed
        expanded = []
        for w in wanted:
            parsed = _student(w)
            expanded += [f"{w}-s{sd}" for sd in seeds] if parsed is not None and parsed[2] is None else [w]
        wanted = expanded
    report: dict[str, Any] = {
        "bench": "quality", "evaluated": "as served: GGUF through llama.cpp's server, asked as the router asks",
        "task": TASK_NAME, "primary_metric": task.primary_metric, "base_model": base,
        "examples": str(a.examples), "traces": len(traces),
        "holdout_size": info["holdout_size"], "contamination_rate": info["contamination_rate"],
        "contamination_rate_loose": info["contamination_rate_loose"], "pool_size": len(pool), "split": info,
        "slice_names": slices.names,
        "serving": {"quant": settings.tier3_gguf_quant, "f16": bool(a.f16), "max_tokens":
                    settings.tier3_student_max_tokens, "n_ctx": settings.tier3_serve_n_ctx,
                    "threads": settings.tier3_serve_threads or os.cpu_count()},
        "machine": {"cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0], "python": platform.python_version()},
        "goals": {"json_valid_rate": ">= 0.95", "task_f1_vs_teacher": ">= 0.85 from <= 200 traces",
                  "reasoning": "a schedule using the teacher's reasoning beats answer-only by >= 0.05 field F1 "
                               "on the golden set at equal compute, served latency no worse"},
        "rows": [],
    }
    if golden is not None:
        golden_items = slices.examples("answer")["golden"]
        report["golden"] = {"path": str(golden), "size": len(golden_items), **contamination(
            ["\n".join(m["content"] for m in ex.prompt if m["role"] == "user") for ex in golden_items],
            [user_text(t.experience) for t in pool])}
    print(json.dumps({k: report[k] for k in ("holdout_size", "contamination_rate", "contamination_rate_loose",
                                             "pool_size", "base_model")}), file=sys.stderr, flush=True)

    work = a.work_dir or Path(tempfile.mkdtemp(prefix="tier3-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        for name in wanted:
            t0 = time.perf_counter()
            if name in ("teacher", "production"):
                row = row_recorded(name, slices, a.examples)
            elif name == "constant":
                row = row_constant(pool, slices, work)
            elif name == "base":
                row = row_base(base, slices, settings, work, a)
            else:
                parsed = _student(name)
                if parsed is None:
                    sys.exit(f"unknown row {name!r}")
                row = row_student(parsed[0], parsed[1], pool, slices, base, settings, work, a, seed=parsed[2])
            row["row_wall_s"] = time.perf_counter() - t0
            if a.no_outputs:
                row.pop("outputs", None)
            report["rows"].append(row)
            report["aggregate"] = aggregate(report["rows"])
            print(json.dumps({k: v for k, v in row.items() if k != "outputs"}), file=sys.stderr, flush=True)
            if a.out:
                a.out.write_text(json.dumps(report, indent=2))
    finally:
        if a.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(table(report), file=sys.stderr, flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
