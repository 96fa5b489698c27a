"""Multi-task distillation (Distilling Step-by-Step): ``multitask`` phases, the rationale task, its loss weight.

Each trace of a ``multitask`` phase gives an answer example (the answer-only instruction -> the answer) and a
rationale example (RATIONALE_INSTRUCTION -> the teacher's reasoning alone); the student is served answer-only; the
rationale examples' loss is weighted by TIER3_RATIONALE_WEIGHT. The tiny random model only (never the 135M one).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from schemas.messages import SourceOffset
from schemas.tasks import ANSWER_ONLY_INSTRUCTION, RATIONALE_INSTRUCTION, REASONED_INSTRUCTION, get_task
from tests.synthetic import synthetic_traces
from trainer.dataset import (
    build_dataset,
    inference_messages,
    phase_examples,
    rationale_messages,
    read_jsonl,
    training_messages,
)
from trainer.errors import BackendUnavailable
from trainer.inference import adapter_prompt_format, prompt_format
from trainer.sft_config import PHASE_KINDS, PROMPT_FORMAT_OF, Phase, SFTConfig, parse_phases
from trainer.sft_trainer import (
    IGNORE_INDEX,
    WEIGHT_COLUMN,
    choose_backend,
    make_lora_model,
    make_trl_trainer,
    target_only_loss,
    train,
)
from trainer.tiny_model import cached_tiny_model


def _cfg(**kw: object) -> SFTConfig:
    return SFTConfig(**{"tier3_base_model": "unused", "tier3_phases": "multitask:2",  # type: ignore[arg-type]
                        "tier3_holdout_fraction": 0.0, **kw})


# ---------------------------------------------------------------------------------------------- dataset


def test_each_trace_gives_an_answer_and_a_rationale_example(tmp_path: Path) -> None:
    traces = synthetic_traces(20)
    built = build_dataset(traces, _cfg(), tmp_path)
    recs = read_jsonl(built.train_path)
    assert built.n_train == 20 and built.n_rationale == 20 and built.n_examples == len(recs) == 40
    assert built.summary()["n_rationale"] == 20
    # per trace, in log order: its answer example, then its rationale example
    assert [r["objective"] for r in recs] == ["answer", "rationale"] * 20
    assert all(r["phase"] == "multitask" for r in recs)
    assert [r["experience_id"] for r in recs[::2]] == [r["experience_id"] for r in recs[1::2]] == built.train_ids
    by_id = {t.experience_id: t for t in traces}
    task = get_task("widget_selector")
    for ans, rat in zip(recs[::2], recs[1::2], strict=True):
        t = by_id[ans["experience_id"]]
        # the answer task: exactly an `answer` phase example (the served prompt, the answer alone)
        assert ans["messages"] == training_messages(t, reasoning=False)
        assert ans["messages"][:-1] == inference_messages(t.experience, reasoning=False)
        assert ans["messages"][-2]["content"] == ANSWER_ONLY_INSTRUCTION
        assert ans["messages"][-1]["content"] == task.format_output(t.answer, None)
        # the rationale task: the same production messages, its own instruction, the teacher's reasoning alone
        assert rat["messages"][:-2] == ans["messages"][:-2]
        assert rat["messages"][-2] == {"role": "user", "content": RATIONALE_INSTRUCTION}
        assert rat["messages"][-1] == {"role": "assistant", "content": f"<reasoning>\n{t.reasoning}\n</reasoning>"}
        assert "<answer>" not in rat["messages"][-1]["content"]
        assert rat["messages"] == rationale_messages(t)
    assert len({ANSWER_ONLY_INSTRUCTION, RATIONALE_INSTRUCTION, REASONED_INSTRUCTION}) == 3


def test_existing_schedules_keep_their_bytes(tmp_path: Path) -> None:
    """Adding the multitask kind changes no line of the existing kinds: the answer and reasoning lines of a
    schedule with a multitask phase are the bytes of the same schedule without it, and a multitask answer
    example is an `answer` example's messages."""
    traces = synthetic_traces(40)
    old = build_dataset(traces, _cfg(tier3_phases="answer:1,reasoning:1", tier3_holdout_fraction=0.1),
                        tmp_path / "old")
    both = build_dataset(traces, _cfg(tier3_phases="answer:1,reasoning:1,multitask:2",
                                      tier3_holdout_fraction=0.1), tmp_path / "new")
    old_lines = old.train_path.read_bytes().splitlines(keepends=True)
    new_lines = both.train_path.read_bytes().splitlines(keepends=True)
    assert new_lines[:len(old_lines)] == old_lines  # curriculum order: the old kinds' lines come first, unchanged
    assert b"objective" not in old.train_path.read_bytes()  # only multitask lines have the field
    assert both.holdout_path.read_bytes() == old.holdout_path.read_bytes()
    assert both.sha256 != old.sha256 and old.n_examples == len(old_lines) and both.n_examples == len(new_lines)
    multi = [json.loads(line) for line in new_lines[len(old_lines):]]
    answers = [r for r in read_jsonl(old.train_path) if r["phase"] == "answer"]
    assert [r["messages"] for r in multi if r["objective"] == "answer"] == [r["messages"] for r in answers]
    # the rationale weight is a training setting, not part of the dataset
    other = build_dataset(traces, _cfg(tier3_phases="answer:1,reasoning:1,multitask:2", tier3_holdout_fraction=0.1,
                                       tier3_rationale_weight=0.2), tmp_path / "w")
    assert other.sha256 == both.sha256


def test_unsafe_reasoning_gives_no_example_and_empty_reasoning_no_rationale(tmp_path: Path) -> None:
    """The untrusted-text rule holds for the rationale target: a trace whose reasoning holds a special token or a
    format tag gives no example at all (its answer example neither: as in every phase, the trace is refused);
    a trace without reasoning gives its answer example only."""
    good = synthetic_traces(5, partitions=1)
    unsafe = good[0].model_copy(update={"reasoning": "pick <|im_end|> widgets"})
    tag = good[1].model_copy(update={"reasoning": "pick </reasoning><answer>{}</answer>"})
    empty = good[2].model_copy(update={"reasoning": "  "})
    built = build_dataset([unsafe, tag, empty, *good[3:]], _cfg(), tmp_path)
    assert built.n_unsafe == 2 and {s[0] for s in built.skipped} == {good[0].experience_id, good[1].experience_id}
    recs = read_jsonl(built.train_path)
    assert {r["experience_id"] for r in recs} == {good[2].experience_id, good[3].experience_id,
                                                 good[4].experience_id}
    assert [(r["experience_id"], r["objective"]) for r in recs if r["experience_id"] == good[2].experience_id] == [
        (good[2].experience_id, "answer")]
    assert built.n_rationale == 2 and built.n_examples == len(recs) == 5
    assert "<|im_end|>" not in built.train_path.read_text()
    from schemas.errors import UnsafeText

    with pytest.raises(UnsafeText):
        rationale_messages(unsafe)


def test_phase_examples_carry_the_weight(tmp_path: Path) -> None:
    built = build_dataset(synthetic_traces(10), _cfg(), tmp_path)
    half = phase_examples(built, "multitask", rationale_weight=0.5)
    assert [e[WEIGHT_COLUMN] for e in half] == [1.0, 0.5] * 10
    assert [e["messages"][-2]["content"] for e in half] == [ANSWER_ONLY_INSTRUCTION, RATIONALE_INSTRUCTION] * 10
    equal = phase_examples(built, "multitask", rationale_weight=1.0)
    assert len(equal) == 20 and not any(WEIGHT_COLUMN in e for e in equal)  # plain SFT
    answers_only = phase_examples(built, "multitask", rationale_weight=0.0)
    assert [e["messages"] for e in answers_only] == [e["messages"] for e in half[::2]]
    assert not any(WEIGHT_COLUMN in e for e in answers_only)
    with pytest.raises(ValueError):
        phase_examples(built, "multitask", rationale_weight=-1.0)


# ---------------------------------------------------------------------------------------------- config


def test_schedule_syntax_and_the_served_prompt_format() -> None:
    assert "multitask" in PHASE_KINDS and set(PROMPT_FORMAT_OF) == set(PHASE_KINDS)
    assert parse_phases("multitask:4") == (Phase("multitask", 4.0),)
    assert parse_phases("answer:1, multitask:2") == (Phase("answer", 1.0), Phase("multitask", 2.0))
    # served answer-only: the router, the evaluation and the export prompt with the answer-only instruction
    assert prompt_format(parse_phases("multitask:4")) == "answer"
    assert prompt_format(parse_phases("answer:1,multitask:2")) == "answer"
    assert prompt_format(parse_phases("reasoning:1,multitask:2")) == "answer"
    assert prompt_format(parse_phases("multitask:2,reasoning:1")) == "reasoning"
    assert prompt_format(parse_phases("answer:1,reasoning:2")) == "reasoning"  # unchanged
    assert Phase("multitask", 1).prompt_format == "answer" and not Phase("multitask", 1).reasoning
    assert SFTConfig(tier3_base_model="unused").tier3_phases == "answer:6"  # the default is not changed here
    assert _cfg().tier3_rationale_weight == 0.5
    assert _cfg(tier3_rationale_weight=2).hyperparameters()["tier3_rationale_weight"] == 2.0
    with pytest.raises(ValidationError):
        _cfg(tier3_rationale_weight=-0.1)
    with pytest.raises(ValidationError, match="TIER3_PACKING"):
        _cfg(tier3_packing=True)
    _cfg(tier3_packing=True, tier3_rationale_weight=1.0)  # no weights: packing is fine
    _cfg(tier3_packing=True, tier3_phases="answer:1")


def test_unsloth_takes_no_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """unsloth computes its own loss: a weight other than 0 or 1 is refused when unsloth is asked for, and makes
    auto choose TRL (which weighs each example) on a CUDA machine with unsloth."""
    from trainer import sft_trainer

    monkeypatch.setattr(sft_trainer, "cuda_available", lambda: True)
    monkeypatch.setattr(sft_trainer, "unsloth_installed", lambda: True)
    assert choose_backend(_cfg()) == "trl"
    assert choose_backend(_cfg(tier3_rationale_weight=1.0)) == "unsloth"
    assert choose_backend(_cfg(tier3_rationale_weight=0.0)) == "unsloth"
    assert choose_backend(_cfg(tier3_phases="answer:2")) == "unsloth"
    with pytest.raises(BackendUnavailable, match="TIER3_RATIONALE_WEIGHT"):
        choose_backend(_cfg(tier3_backend="unsloth"))
    assert choose_backend(_cfg(tier3_backend="unsloth", tier3_rationale_weight=1.0)) == "unsloth"
    with pytest.raises(BackendUnavailable, match="TIER3_LOAD_IN_4BIT"):
        choose_backend(_cfg(tier3_load_in_4bit=True))


# ---------------------------------------------------------------------------------------------- masks and loss


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = cached_tiny_model()
    cfg = _cfg(tier3_base_model=str(base), tier3_batch_size=6)
    out = tmp_path_factory.mktemp("mt")
    built = build_dataset(synthetic_traces(12), cfg, out / "data")
    tok: Any = AutoTokenizer.from_pretrained(base)
    model = make_lora_model(AutoModelForCausalLM.from_pretrained(base), cfg)
    examples = phase_examples(built, "multitask", rationale_weight=0.5)[:6]  # 3 traces: answer, rationale, ...
    trainer = make_trl_trainer(model, tok, examples, cfg, Phase("multitask", 1.0), out, on_cuda=False)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(examples))])
    return {"base": base, "cfg": cfg, "built": built, "tok": tok, "model": model, "examples": examples,
            "trainer": trainer, "batch": batch}


def test_labels_cover_the_assistant_turn_only_for_both_tasks(tiny: dict[str, Any]) -> None:
    tok, batch, examples = tiny["tok"], tiny["batch"], tiny["examples"]
    assert batch[WEIGHT_COLUMN].tolist() == [1.0, 0.5] * 3  # the weights reach the batch, one per row
    for ids, labels, ex in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), examples, strict=True):
        targets = [(i, t) for i, t in zip(ids, labels, strict=True) if t != IGNORE_INDEX]
        assert all(i == t for i, t in targets)
        target_ids = [i for i, _ in targets]
        # the targets are the assistant turn exactly (its end-of-turn token included), nothing of the prompt
        assert tok.decode(target_ids) == ex["messages"][-1]["content"] + tok.eos_token
        first = labels.index(target_ids[0]) if target_ids else len(labels)
        assert all(t == IGNORE_INDEX for t in labels[:first])
        instruction = ex["messages"][-2]["content"]
        assert instruction in tok.decode(ids[:first]) and instruction not in tok.decode(target_ids)
    assert "<reasoning>" in tok.decode([t for t in batch["labels"][1].tolist() if t != IGNORE_INDEX])


def _batch_of(batch: dict[str, Any], rows: list[int]) -> dict[str, Any]:
    """Some rows of a collated batch, cut to their longest row (what the collator would give for them alone)."""
    sub = {k: v[rows] for k, v in batch.items()}
    n = int(sub["attention_mask"].sum(1).max())
    return {k: (v[:, :n] if v.dim() == 2 else v) for k, v in sub.items()}


def test_the_loss_weight(tiny: dict[str, Any]) -> None:
    """Weight 1 is today's loss; weight 0 is the answer examples' loss alone; otherwise the weighted mean over the
    target tokens."""
    import torch

    model, batch = tiny["model"], tiny["batch"]
    inputs = {k: v for k, v in batch.items() if k != WEIGHT_COLUMN}
    rows = batch["input_ids"].shape[0]
    with torch.no_grad():
        plain = target_only_loss(model, inputs)
        ones = target_only_loss(model, inputs, weights=torch.ones(rows))
        assert abs(float(ones) - float(plain)) < 1e-5
        answer_rows = [i for i in range(rows) if i % 2 == 0]
        zero_w = torch.tensor([1.0 if i in answer_rows else 0.0 for i in range(rows)])
        answers_alone = target_only_loss(model, _batch_of(inputs, answer_rows))
        assert abs(float(target_only_loss(model, inputs, weights=zero_w)) - float(answers_alone)) < 1e-5
        # a weighted mean of the per-row sums: sum(w_r * ce_r) / sum(w_r * n_r)
        w = batch[WEIGHT_COLUMN]
        sums, counts = [], []
        for i in range(rows):
            one = _batch_of(inputs, [i])
            n_i = int((one["labels"][:, 1:] != IGNORE_INDEX).sum())
            sums.append(float(target_only_loss(model, one)) * n_i)
            counts.append(n_i)
        expected = sum(float(w[i]) * sums[i] for i in range(rows)) / sum(float(w[i]) * counts[i] for i in range(rows))
        weighted = float(target_only_loss(model, inputs, weights=w))
        assert abs(weighted - expected) < 1e-4 and abs(weighted - float(plain)) > 1e-4
        # with the trainer's count across gradient accumulation: the count is weighted the same way
        trainer = tiny["trainer"]
        n_items = trainer._get_num_items_in_batch([batch], torch.device("cpu"))
        if n_items is not None:  # the model takes loss kwargs: the trainer counts targets itself
            assert abs(float(n_items) - sum(float(w[i]) * counts[i] for i in range(rows))) < 1e-3
            assert abs(float(target_only_loss(model, inputs, n_items, weights=w)) - weighted) < 1e-5
        # only weight-0 rows: no loss, no NaN
        assert float(target_only_loss(model, inputs, weights=torch.zeros(rows))) == 0.0


@pytest.mark.slow
def test_a_short_multitask_training_lowers_the_loss(tiny: dict[str, Any], tmp_path: Path) -> None:
    """multitask:2 on the tiny model: both tasks' loss falls, the student is served answer-only."""
    import torch

    from trainer.inference import load_student

    cfg = _cfg(tier3_base_model=str(tiny["base"]), tier3_learning_rate=1e-2, tier3_batch_size=4,
               tier3_holdout_fraction=0.2)
    traces = synthetic_traces(30)
    built = build_dataset(traces, cfg, tmp_path / "data")
    result = train(built, cfg, tmp_path)
    assert list(result.phase_losses) == ["1:multitask"] and result.backend == "trl"
    hp = result.hyperparameters
    assert hp["n_examples"] == {"multitask": 2 * built.n_train} and hp["prompt_format"] == "answer"
    assert hp["tier3_rationale_weight"] == 0.5 and "per-example" in hp["rationale_weighting"]
    assert adapter_prompt_format(result.adapter_dir) == "answer"
    # the loss of the training examples (both tasks, weighted), before and after
    examples = phase_examples(built, "multitask", rationale_weight=0.5)[:8]
    trainer = make_trl_trainer(tiny["model"], tiny["tok"], examples, cfg, Phase("multitask", 1.0), tmp_path,
                               on_cuda=False)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(examples))])
    weights = batch.pop(WEIGHT_COLUMN)
    student, _ = load_student(result.adapter_dir)
    with torch.no_grad():
        before = float(target_only_loss(make_lora_model(_fresh(tiny["base"]), cfg), batch, weights=weights))
        after = float(target_only_loss(student, batch, weights=weights))
        after_rationale = float(target_only_loss(student, _batch_of(batch, [1, 3, 5, 7])))
        before_rationale = float(target_only_loss(make_lora_model(_fresh(tiny["base"]), cfg),
                                                  _batch_of(batch, [1, 3, 5, 7])))
    assert after < 0.7 * before, (before, after)
    assert after_rationale < 0.7 * before_rationale, (before_rationale, after_rationale)


def _fresh(base: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base)


def test_holdout_is_unchanged_by_the_schedule(tmp_path: Path) -> None:
    """The holdout (evaluation) records do not depend on the phases: a multitask student is evaluated on the same
    records, with their answer-only prompt."""
    traces = synthetic_traces(60)
    a = build_dataset(traces, _cfg(tier3_phases="answer:6", tier3_holdout_fraction=0.2), tmp_path / "a")
    b = build_dataset(traces, _cfg(tier3_holdout_fraction=0.2), tmp_path / "b")
    assert a.holdout_path.read_bytes() == b.holdout_path.read_bytes() and a.n_holdout > 0
    rec = read_jsonl(b.holdout_path)[0]
    assert rec["answer_only_messages"][-1]["content"] == ANSWER_ONLY_INSTRUCTION


def test_redeliveries_count_once(tmp_path: Path) -> None:
    """Redeliveries count once in multitask phases too (the dedup happens before the projection)."""
    traces = synthetic_traces(6, partitions=1)
    assert traces[0].source is not None
    again = traces[0].model_copy(update={"source": SourceOffset(topic=traces[0].source.topic, partition=0,
                                                                offset=500),
                                         "reasoning": "LATE COPY"})
    built = build_dataset([again, *traces], _cfg(), tmp_path)
    assert built.n_duplicates == 1 and built.n_examples == 12
    assert "LATE COPY" not in built.train_path.read_text()


@pytest.mark.slow
def test_unsloth_path_trains_multitask_without_weights(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """unsloth (a stand-in with its API, see test_sft_trainer) trains a multitask phase at weight 1 (plain SFT on
    both tasks' examples, its response-only mask on each); at 0.5 it is refused before anything loads."""
    from tests.trainer.test_sft_trainer import _use_stand_in

    calls: dict[str, Any] = {}
    _use_stand_in(monkeypatch, calls)
    cfg = _cfg(tier3_base_model=str(cached_tiny_model()), tier3_phases="multitask:1", tier3_batch_size=4,
               tier3_rationale_weight=1.0)
    built = build_dataset(synthetic_traces(6), cfg, tmp_path / "data")
    result = train(built, cfg, tmp_path / "ok")
    assert result.backend == "unsloth" and result.eot_in_loss is True and result.train_loss > 0
    assert result.hyperparameters["n_examples"] == {"multitask": 12}
    assert adapter_prompt_format(result.adapter_dir) == "answer"
    calls.clear()
    with pytest.raises(BackendUnavailable, match=r"TIER3_RATIONALE_WEIGHT=0\.5"):
        train(built, cfg.model_copy(update={"tier3_rationale_weight": 0.5, "tier3_backend": "unsloth"}),
              tmp_path / "refused")
    assert "from_pretrained" not in calls
