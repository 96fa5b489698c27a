"""Distillation quality on the widget-selector example data: base zero-shot, students, the teacher; printed as JSON.

Data: ``examples/widget_selector/experiences.jsonl`` joined with ``recorded_teacher.jsonl`` (the rule-based
example teacher's answers) by experience id. A fixed holdout (the first ``--holdout`` traces of the
deterministic hash split, never trained on) scores every row; students train on the first N of the others.

Rows (``--rows``, comma-separated; default all):

- ``base``: the base model zero-shot (no adapter), answer-only prompt;
- ``answer-N`` for N in ``--traces``: a student trained with the answer-only curriculum (``--answer-phases``);
- ``reasoning-N``: a student trained with the reasoning curriculum (``--reasoning-phases``, default
  ``answer:1,reasoning:2``) on the same N traces, prompted for reasoning then the answer;
- ``teacher``: the teacher's own recorded outputs (agreement 1 by construction: it shows the scorer's ceiling);
- ``production``: what the example production model answered (the gate's baseline).

Columns: JSON validity, schema validity, widget-set F1 and field F1 against the teacher, exact match, latency
p50/p95 of one request alone (the first ``--latency-samples`` holdout examples), tokens/s of batched greedy
generation, training wall time. Students are evaluated merged (``merge_and_unload``), batched, greedy, with the
KV cache: what :mod:`trainer.close_loop.evaluate` does for a run. Nothing here is tuned to a goal; the training
settings are the product's defaults (``trainer.sft_config.SFTConfig``, environment overrides apply) except the
curriculum.

    .venv/bin/python bench/quality.py --rows base,answer-50,teacher --traces 50
    .venv/bin/python bench/quality.py                       # everything: hours on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
EXAMPLES = ROOT / "examples" / "widget_selector"


def load_traces() -> list[Any]:
    """Example experiences + the recorded teacher's answers, as enriched traces (log order = file order)."""
    import orjson

    from schemas import EnrichedTrace, Experience, decode, get_task
    from schemas.messages import SourceOffset, TeacherInfo

    teacher = {}
    for line in (EXAMPLES / "recorded_teacher.jsonl").read_bytes().splitlines():
        if line.strip():
            r = orjson.loads(line)
            teacher[r["experience_id"]] = r
    out = []
    for i, line in enumerate((EXAMPLES / "experiences.jsonl").read_bytes().splitlines()):
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


def split(traces: list[Any], n_holdout: int) -> tuple[list[Any], list[Any]]:
    from trainer.dataset import is_holdout

    hold = [t for t in traces if is_holdout(t.experience_id, 0.10)][:n_holdout]
    ids = {t.experience_id for t in hold}
    return [t for t in traces if t.experience_id not in ids], hold


def _metrics(res: Any) -> dict[str, Any]:
    m = res.metrics
    return {k: m.get(k) for k in ("n_examples", "json_valid_rate", "schema_valid_rate", "set_f1_widgets", "f1",
                                  "exact_match", "latency_ms_p50", "latency_ms_p95", "latency_samples",
                                  "tokens_per_s", "generated_tokens", "generation_s", "batch_size")}


def eval_model(model: Any, tokenizer: Any, holdout: list[Any], reasoning: bool, a: argparse.Namespace
               ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from schemas import get_task
    from trainer.close_loop.evaluate import evaluate_examples, examples_from_traces
    from trainer.sft_trainer import cached_generators

    examples = examples_from_traces(holdout)
    if not reasoning:
        from trainer.dataset import inference_messages

        prompts = {t.experience_id: inference_messages(t.experience, reasoning=False) for t in holdout}
        examples = [type(ex)(ex.experience_id, prompts[ex.experience_id], ex.teacher_answer, ex.baseline_response)
                    for ex in examples]
    gen, gen_batch = cached_generators(model, tokenizer, a.max_new_tokens)  # what trainer.close_loop.evaluate does
    res = evaluate_examples(
        get_task("widget_selector"), examples, gen, generate_batch=gen_batch,
        batch_size=a.batch_size, latency_samples=a.latency_samples)
    rows = [{"experience_id": r.experience_id, "output": r.output, "json_valid": r.student.json_valid,
             "f1": r.student.f1} for r in res.rows]
    return _metrics(res), rows


def row_base(holdout: list[Any], a: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.models import resolve_base_model
    from trainer.sft_config import SFTConfig

    base = resolve_base_model(SFTConfig().tier3_base_model)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    m, rows = eval_model(model, tok, holdout, reasoning=False, a=a)
    return {"row": "base zero-shot", "base_model": base, **m, "outputs": rows}


def row_student(kind: str, n: int, pool: list[Any], holdout: list[Any], a: argparse.Namespace) -> dict[str, Any]:
    from trainer.dataset import build_dataset
    from trainer.sft_config import SFTConfig
    from trainer.sft_trainer import load_merged_student, prompt_format, train

    phases = a.answer_phases if kind == "answer" else a.reasoning_phases
    cfg = SFTConfig(tier3_phases=phases, tier3_holdout_fraction=0.0, tier3_backend="trl")
    with tempfile.TemporaryDirectory(prefix="tier3-quality-") as tmp:
        ds = build_dataset(pool[:n], cfg, Path(tmp) / "data")
        t0 = time.perf_counter()
        r = train(ds, cfg, Path(tmp))
        train_s = time.perf_counter() - t0
        model, tok = load_merged_student(r.adapter_dir)
        fmt = prompt_format(cfg.phases)
        m, rows = eval_model(model, tok, holdout, reasoning=fmt == "reasoning", a=a)
    return {"row": f"student {kind} N={n}", "phases": phases, "n_train": ds.n_train, "prompt_format": fmt,
            "train_wall_s": train_s, "train_tokens_per_s": r.tokens_per_s, "train_loss": r.train_loss,
            "phase_losses": r.phase_losses, "hyperparameters": {k: v for k, v in r.hyperparameters.items()
                                                                 if k.startswith("tier3_")}, **m, "outputs": rows}


def row_recorded(kind: str, holdout: list[Any]) -> dict[str, Any]:
    """The teacher's recorded text or production's recorded response, scored like a student's output."""
    from schemas import get_task
    from trainer.close_loop.evaluate import score_output

    task = get_task("widget_selector")
    teacher = {}
    if kind == "teacher":
        import orjson

        for line in (EXAMPLES / "recorded_teacher.jsonl").read_bytes().splitlines():
            if line.strip():
                r = orjson.loads(line)
                teacher[r["experience_id"]] = r["text"]
    scores = [score_output(task, teacher[t.experience_id] if kind == "teacher" else t.experience.response,
                           t.answer) for t in holdout]
    n = len(scores) or 1
    return {"row": "teacher (rule-based example teacher, recorded)" if kind == "teacher"
            else "production model (recorded responses)", "n_examples": len(scores),
            "json_valid_rate": sum(s.json_valid for s in scores) / n,
            "schema_valid_rate": sum(s.schema_valid for s in scores) / n,
            "set_f1_widgets": sum(s.set_f1.get("widgets", 0.0) for s in scores) / n,
            "f1": sum(s.f1 for s in scores) / n, "exact_match": sum(s.exact for s in scores) / n,
            "latency_ms_p50": None, "latency_ms_p95": None, "tokens_per_s": None,
            "note": "recorded outputs: no generation here, so no latency"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="", help="comma-separated: base, answer-N, reasoning-N, teacher, production "
                    "(default: all, with N from --traces)")
    ap.add_argument("--traces", default="50,100,200", help="N values for the default rows")
    ap.add_argument("--holdout", type=int, default=24, help="holdout examples (never trained on)")
    ap.add_argument("--answer-phases", default="answer:6", help="answer-only curriculum (the product default)")
    ap.add_argument("--reasoning-phases", default="answer:1,reasoning:2", help="reasoning curriculum")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--latency-samples", type=int, default=3)
    ap.add_argument("--out", type=Path, help="also write the JSON here (written after every row)")
    ap.add_argument("--no-outputs", action="store_true", help="leave the per-example outputs out of the JSON")
    a = ap.parse_args()

    traces = load_traces()
    pool, holdout = split(traces, a.holdout)
    ns = [int(x) for x in a.traces.split(",") if x.strip()]
    wanted = [r.strip() for r in a.rows.split(",") if r.strip()] or [
        "teacher", "production", "base", *[f"answer-{n}" for n in ns], f"reasoning-{max(ns)}"]
    report: dict[str, Any] = {
        "bench": "quality", "holdout": len(holdout), "pool": len(pool),
        "machine": {"cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0], "python": platform.python_version()},
        "goals": {"json_valid_rate": ">= 0.95", "f1_vs_teacher": ">= 0.85 from <= 200 traces",
                  "reasoning": "no worse than answer-only"},
        "rows": [],
    }
    for name in wanted:
        t0 = time.perf_counter()
        if name in ("teacher", "production"):
            row = row_recorded(name, holdout)
        elif name == "base":
            row = row_base(holdout, a)
        else:
            kind, _, n_s = name.partition("-")
            if kind not in ("answer", "reasoning") or not n_s.isdigit():
                sys.exit(f"unknown row {name!r}")
            row = row_student(kind, int(n_s), pool, holdout, a)
        row["row_wall_s"] = time.perf_counter() - t0
        if a.no_outputs:
            row.pop("outputs", None)
        report["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "outputs"}), file=sys.stderr, flush=True)
        if a.out:
            a.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
