"""Dataset projection: enriched traces -> chat-format SFT examples (JSONL with a sha256), holdout split, phases.

Prompt parity: the prompt of every training example is :func:`inference_messages`, the exact message list the
student gets at inference (the production messages unchanged, plus the task's one output-format instruction);
the evaluator builds its prompts with the same function. The assistant turn is ``task.format_output(answer,
reasoning)``: the teacher's reasoning then its answer for a ``reasoning`` phase, the answer alone (and the
answer-only instruction in the prompt) for an ``answer`` phase. A ``multitask`` phase (Distilling Step-by-Step) has
two examples per trace: the answer task (byte for byte an ``answer`` example's messages) and the rationale task
(:func:`rationale_messages`: the answer-only prompt with :data:`schemas.tasks.RATIONALE_INSTRUCTION` in place of
its instruction, the teacher's reasoning alone as the assistant turn). The rationale target is the trace's
reasoning, which passed the untrusted-text rule like every target (a trace that fails it gives no example at all,
as in every other phase); a trace with empty reasoning gives only its answer example.

Reproducibility: traces are ordered by (partition, offset) of their source record, deduplicated by experience_id
(enrichment is at-least-once: the first copy wins), split into train and holdout by whole groups of near-twin
questions (``trainer.split``: a group's side is a hash of its smallest experience_id, so no holdout question has
a near-twin in training), and written as JSONL with sorted keys. The same traces therefore always give the same
bytes and the same sha256, whatever order they were handed over in: a replay up to a run's offsets rebuilds that
run's dataset hash.

Files written to ``out_dir``:

- ``train.jsonl``: one line per (phase kind, trace), phase kinds in curriculum order, then source order:
  ``{"experience_id", "messages", "phase", "task"}``; a ``multitask`` phase has two lines per trace (answer, then
  rationale), told apart by an ``"objective": "answer" | "rationale"`` field that only its lines have (lines of
  other kinds are unchanged, so are their bytes and sha256; the rationale loss weight is a training setting, not
  part of the dataset);
- ``holdout.jsonl``: one line per holdout trace: the inference prompt (reasoning format), the teacher's answer
  and reasoning, and the production response, for evaluation only;
- ``dataset.json``: counts, ids, sha256s (for people; the run manifest carries the same numbers).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from schemas.errors import SchemaError, UnsafeText
from schemas.fastcodec import ExperienceLike, TraceLike, served_by_json
from schemas.tasks import (
    ANSWER_ONLY_INSTRUCTION,
    RATIONALE_INSTRUCTION,
    TaskDefinition,
    check_reasoning_text,
    check_trace_text,
    get_task,
)
from trainer.manifest import write_atomic
from trainer.sft_config import Phase, PhaseKind, SFTConfig
from trainer.split import (
    LOOSE_JACCARD,
    NEAR_DUP_JACCARD,
    SPLIT_RULE,
    contamination_rate,
    hash_side,
    split_holdout,
    user_text,
)

TRAIN_FILE = "train.jsonl"
HOLDOUT_FILE = "holdout.jsonl"
SUMMARY_FILE = "dataset.json"


def is_holdout(experience_id: str, fraction: float) -> bool:
    """The id-hash split (sha256 of the id against ``fraction``): the side of an item with no near-twin, and of a
    near-twin group by its smallest id (``trainer.split``). ``build_dataset`` splits by groups, not by this alone."""
    return hash_side(experience_id, fraction)


def inference_messages(experience: ExperienceLike, reasoning: bool = True, *, task: TaskDefinition | None = None
                       ) -> list[dict[str, str]]:
    """The messages the student is given for ``experience``: in training, in evaluation and in production.
    ``task``: the experience's task definition, when the caller has it already."""
    task = task or get_task(experience.task)
    return task.messages_for_model([{"role": m.role, "content": m.content} for m in experience.messages],
                                   reasoning=reasoning)


def training_messages(trace: TraceLike, reasoning: bool, *, answer: dict[str, Any] | None = None,
                      task: TaskDefinition | None = None) -> list[dict[str, str]]:
    """One SFT example: the inference prompt plus the teacher's output as the assistant turn.

    ``answer``: the trace's answer already validated by the caller (validation is the costly part: once per
    trace, not once per phase kind); when None it is validated here.
    """
    task = task or get_task(trace.task)
    if answer is None:
        answer = task.validate_answer(trace.answer)
    completion = task.format_output(answer, trace.reasoning if reasoning else None)
    return [*inference_messages(trace.experience, reasoning=reasoning, task=task),
            {"role": "assistant", "content": completion}]


def rationale_messages(trace: TraceLike, *, task: TaskDefinition | None = None) -> list[dict[str, str]]:
    """The rationale-task example of a ``multitask`` phase: the answer-only inference prompt with
    :data:`RATIONALE_INSTRUCTION` in place of its instruction, and the teacher's reasoning alone
    (:meth:`TaskDefinition.format_rationale`) as the assistant turn.

    The reasoning goes through the untrusted-text rule (:func:`check_reasoning_text`, raises UnsafeText) as every
    training target does; ``build_dataset`` has checked it already, this keeps the function safe on its own.
    """
    task = task or get_task(trace.task)
    check_reasoning_text(trace.reasoning)
    prompt = inference_messages(trace.experience, reasoning=False, task=task)
    if not prompt or prompt[-1] != {"role": "user", "content": ANSWER_ONLY_INSTRUCTION}:
        raise RuntimeError("TaskDefinition.messages_for_model no longer ends with the answer-only instruction: "
                           "rationale_messages must follow it")
    return [*prompt[:-1], {"role": "user", "content": RATIONALE_INSTRUCTION},
            {"role": "assistant", "content": task.format_rationale(trace.reasoning)}]


@dataclass(frozen=True)
class BuiltDataset:
    """What :func:`build_dataset` wrote, and what the run manifest records."""

    train_path: Path
    holdout_path: Path
    sha256: str  # of train.jsonl then holdout.jsonl: the dataset's identity
    n_train: int  # traces in training (each appears once per phase kind in train.jsonl)
    n_holdout: int
    holdout_ids: list[str]
    phases: tuple[Phase, ...]
    train_ids: list[str] = field(default_factory=list)
    n_duplicates: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (experience_id, reason): cannot be trained
    train_sha256: str = ""
    holdout_sha256: str = ""
    split_rule: str = ""  # trainer.split.SPLIT_RULE: how near-twins were kept on one side
    n_near_dup_groups: int = 0  # groups of near-twin traces (more than one member)
    contamination_rate: float = 0.0  # share of the holdout with a near-twin in training (0.0 by construction)
    contamination_rate_loose: float = 0.0  # the same at trainer.split.LOOSE_JACCARD (for information)
    n_rationale: int = 0  # rationale-task lines of a multitask phase (a trace with empty reasoning has none)

    @property
    def n_unsafe(self) -> int:
        """Traces refused by the untrusted-text rule (format tags or chat-template special tokens in the teacher's
        reasoning or answer; ``schemas.tasks``): written before the worker enforced it, never trained on."""
        return sum(1 for _, reason in self.skipped if reason.startswith(f"{UnsafeText.kind}:"))

    @property
    def n_examples(self) -> int:
        """Lines in train.jsonl: one per trace per phase kind, plus the multitask rationale lines."""
        return self.n_train * len({p.kind for p in self.phases}) + self.n_rationale

    def summary(self) -> dict[str, Any]:
        out = {
            "sha256": self.sha256, "train_sha256": self.train_sha256, "holdout_sha256": self.holdout_sha256,
            "n_train": self.n_train, "n_holdout": self.n_holdout, "n_duplicates": self.n_duplicates,
            "n_examples": self.n_examples, "n_unsafe": self.n_unsafe, "phases": [str(p) for p in self.phases],
            "holdout_ids": self.holdout_ids, "train_ids": self.train_ids,
            "skipped": [list(s) for s in self.skipped], "split_rule": self.split_rule,
            "n_near_dup_groups": self.n_near_dup_groups, "contamination_rate": self.contamination_rate,
            "contamination_rate_loose": self.contamination_rate_loose,
        }
        if any(p.kind == "multitask" for p in self.phases):  # (other schedules: the summary as it was)
            out["n_rationale"] = self.n_rationale
        return out


def order_and_dedup(traces: Iterable[TraceLike]) -> tuple[list[TraceLike], int]:
    """Traces in log order ((partition, offset); those without a source keep their given order, after the
    others), one per experience_id (the first wins). Returns (traces, number of duplicates dropped)."""
    indexed = list(enumerate(traces))

    def key(item: tuple[int, TraceLike]) -> tuple[int, str, int, int, int]:
        i, t = item
        if t.source is None:
            return (1, "", 0, 0, i)
        return (0, t.source.topic, t.source.partition, t.source.offset, i)

    seen: set[str] = set()
    out: list[TraceLike] = []
    for _, t in sorted(indexed, key=key):
        if t.experience_id in seen:
            continue
        seen.add(t.experience_id)
        out.append(t)
    return out, len(indexed) - len(out)


def _line(obj: dict[str, Any]) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS | orjson.OPT_APPEND_NEWLINE)


def build_dataset(traces: Iterable[TraceLike], cfg: SFTConfig, out_dir: Path) -> BuiltDataset:
    """Project ``traces`` into ``out_dir/train.jsonl`` and ``out_dir/holdout.jsonl`` (see the module doc).

    A trace whose task is unknown, whose answer fails the task's schema, or whose reasoning or answer holds the
    format's tags or a chat template's special tokens (``schemas.tasks.check_trace_text``: traces in the log may
    predate the worker's rule) is not trained on, nor used for evaluation; it is listed in ``BuiltDataset.skipped``
    with the reason (counted in ``n_unsafe`` for the last kind; the caller may dead-letter it). Nothing here raises
    for an empty result: ``n_train == 0`` is for the caller to judge (``train`` raises :class:`EmptyDataset`).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    phases = cfg.phases
    kinds: list[PhaseKind] = list(dict.fromkeys(p.kind for p in phases))  # curriculum order, once each

    ordered, n_dup = order_and_dedup(traces)
    train_ids: list[str] = []
    holdout_ids: list[str] = []
    skipped: list[tuple[int, tuple[str, str]]] = []  # (position in ``ordered``, entry): reported in log order
    per_kind: dict[str, list[bytes]] = {k: [] for k in kinds}
    holdout_lines: list[bytes] = []
    n_rationale = 0
    # (task, answer JSON) already accepted in this build: the schema and the untrusted-text rule are pure functions
    # of the answer's value, and orjson's bytes tell values apart exactly (1 / 1.0 / true): checked once per value
    accepted: set[tuple[str, bytes]] = set()
    tasks: dict[str, TaskDefinition] = {}
    # (1) validation: only usable traces take part in the split
    usable: list[tuple[int, TraceLike, TaskDefinition, dict[str, Any]]] = []
    for pos, t in enumerate(ordered):
        try:
            task = tasks.get(t.task) or tasks.setdefault(t.task, get_task(t.task))
            seen_answer = (t.task, orjson.dumps(t.answer))
            if seen_answer in accepted:
                answer = dict(t.answer)
                check_reasoning_text(t.reasoning)  # the answer's own text passed already
            else:
                answer = task.validate_answer(t.answer)
                check_trace_text(t.reasoning, answer)
                accepted.add(seen_answer)
        except SchemaError as exc:
            skipped.append((pos, (t.experience_id, f"{exc.kind}: {exc}")))
            continue
        usable.append((pos, t, task, answer))
    # (2) the split: whole groups of near-twin questions on one side (trainer.split)
    texts = {t.experience_id: user_text(t.experience) for _, t, _, _ in usable}
    split = split_holdout(texts.items(), cfg.tier3_holdout_fraction)
    # (3) the lines
    for pos, t, task, answer in usable:
        try:
            if split.is_holdout(t.experience_id):
                holdout_lines.append(_line({
                    "experience_id": t.experience_id, "task": t.task,
                    "messages": inference_messages(t.experience, reasoning=True, task=task),
                    "answer_only_messages": inference_messages(t.experience, reasoning=False, task=task),
                    "teacher_answer": answer, "teacher_reasoning": t.reasoning,
                    "production_response": t.experience.response,
                    "served_by": served_by_json(t.experience),
                }))
                holdout_ids.append(t.experience_id)
                continue
            lines: dict[PhaseKind, bytes] = {
                k: _multitask_lines(t, task, answer) if k == "multitask" else
                _line({"experience_id": t.experience_id, "task": t.task, "phase": k,
                       "messages": training_messages(t, reasoning=(k == "reasoning"), answer=answer, task=task)})
                for k in kinds}
        except SchemaError as exc:
            skipped.append((pos, (t.experience_id, f"{exc.kind}: {exc}")))
            continue
        for k in kinds:
            per_kind[k].append(lines[k])
        train_ids.append(t.experience_id)
        if "multitask" in kinds and t.reasoning.strip():
            n_rationale += 1

    train_bytes = b"".join(b"".join(per_kind[k]) for k in kinds)
    holdout_bytes = b"".join(holdout_lines)
    train_path, holdout_path = out_dir / TRAIN_FILE, out_dir / HOLDOUT_FILE
    write_atomic(train_path, train_bytes)
    write_atomic(holdout_path, holdout_bytes)
    train_sha = hashlib.sha256(train_bytes).hexdigest()
    holdout_sha = hashlib.sha256(holdout_bytes).hexdigest()
    # one hash for the pair, unambiguous because each part's length is fixed (hex digests)
    sha = hashlib.sha256(f"tier3-dataset-v1\n{train_sha}\n{holdout_sha}\n".encode()).hexdigest()
    # an independent check of the split (plain pairwise Jaccard, not the split's join): 0.0 by construction
    holdout_texts = [texts[i] for i in holdout_ids]
    train_texts = [texts[i] for i in train_ids]
    built = BuiltDataset(
        train_path=train_path, holdout_path=holdout_path, sha256=sha, n_train=len(train_ids),
        n_holdout=len(holdout_ids), holdout_ids=holdout_ids, phases=phases, train_ids=train_ids,
        n_duplicates=n_dup, skipped=[entry for _, entry in sorted(skipped, key=lambda s: s[0])],
        train_sha256=train_sha, holdout_sha256=holdout_sha, split_rule=SPLIT_RULE,
        n_near_dup_groups=split.n_near_dup_groups,
        contamination_rate=contamination_rate(holdout_texts, train_texts, NEAR_DUP_JACCARD),
        contamination_rate_loose=contamination_rate(holdout_texts, train_texts, LOOSE_JACCARD),
        n_rationale=n_rationale,
    )
    write_atomic(out_dir / SUMMARY_FILE, orjson.dumps(built.summary(), option=orjson.OPT_SORT_KEYS |
                                                       orjson.OPT_INDENT_2))
    return built


def _multitask_lines(t: TraceLike, task: TaskDefinition, answer: dict[str, Any]) -> bytes:
    """A trace's lines of a ``multitask`` phase: the answer task (an ``answer`` example's messages), then the
    rationale task (:func:`rationale_messages`) unless the reasoning is empty."""
    common = {"experience_id": t.experience_id, "task": t.task, "phase": "multitask"}
    out = _line({**common, "objective": "answer",
                 "messages": training_messages(t, reasoning=False, answer=answer, task=task)})
    if t.reasoning.strip():
        out += _line({**common, "objective": "rationale", "messages": rationale_messages(t, task=task)})
    return out


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL file written here."""
    return [orjson.loads(line) for line in Path(path).read_bytes().splitlines() if line.strip()]


def phase_examples(dataset: BuiltDataset, kind: PhaseKind, *, rationale_weight: float = 1.0
                   ) -> list[dict[str, Any]]:
    """The ``{"messages": [...]}`` examples of one phase kind, in file order.

    ``multitask``: both tasks' examples; ``rationale_weight`` (``TIER3_RATIONALE_WEIGHT``) is the rationale
    examples' loss weight relative to the answer examples'. At 1 the examples carry no weight (plain SFT); at 0
    the rationale examples are left out; otherwise every example has a ``"weight"`` (1.0 for the answer task) that
    the trainer's loss applies per example (:func:`trainer.sft_trainer.target_only_loss`).
    """
    if rationale_weight < 0:
        raise ValueError(f"rationale_weight must be >= 0, not {rationale_weight}")
    out: list[dict[str, Any]] = []
    for r in read_jsonl(dataset.train_path):
        if r["phase"] != kind:
            continue
        rationale = r.get("objective") == "rationale"
        if rationale and rationale_weight == 0:
            continue
        ex: dict[str, Any] = {"messages": r["messages"]}
        if kind == "multitask" and rationale_weight not in (0, 1):
            ex["weight"] = float(rationale_weight) if rationale else 1.0
        out.append(ex)
    return out


def holdout_records(dataset: BuiltDataset) -> Sequence[dict[str, Any]]:
    """The holdout records (for the evaluator)."""
    return read_jsonl(dataset.holdout_path)
