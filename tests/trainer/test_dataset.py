"""Dataset projection: dedup, holdout split, phases, prompt parity, deterministic sha256 (no torch needed)."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import orjson
import pytest
from pydantic import ValidationError

from schemas.messages import EnrichedTrace, SourceOffset
from schemas.tasks import ANSWER_ONLY_INSTRUCTION, REASONED_INSTRUCTION
from tests.synthetic import synthetic_traces
from trainer.dataset import build_dataset, inference_messages, is_holdout, read_jsonl
from trainer.sft_config import Phase, SFTConfig, parse_phases
from trainer.split import split_holdout, user_text


def _cfg(**kw: object) -> SFTConfig:
    # a two-phase curriculum (answer, then reasoning), so both projections are exercised
    return SFTConfig(**{"tier3_base_model": "unused", "tier3_phases": "answer:1,reasoning:2", **kw})  # type: ignore[arg-type]


def _moved(t: EnrichedTrace, partition: int, offset: int, **changes: object) -> EnrichedTrace:
    src = SourceOffset(topic=t.source.topic if t.source else "t", partition=partition, offset=offset)
    return t.model_copy(update={"source": src, **changes})


def test_duplicates_count_once_and_the_first_by_offset_wins(tmp_path: Path) -> None:
    traces = synthetic_traces(20, partitions=1)
    first = traces[3]
    # a redelivery of trace 3 (enrichment is at-least-once) at a later offset, with a different reasoning
    dup_late = _moved(first, partition=0, offset=1000, reasoning="LATE COPY")
    # handed over *before* the original: the order given must not matter, the log order does
    built = build_dataset([dup_late, *traces, dup_late], _cfg(tier3_holdout_fraction=0.0), tmp_path)
    assert built.n_duplicates == 2
    assert built.n_train == 20
    recs = read_jsonl(built.train_path)
    assert len(recs) == 20 * 2  # one line per trace per phase kind (answer, reasoning)
    assert len({(r["experience_id"], r["phase"]) for r in recs}) == len(recs)
    assert not any("LATE COPY" in m["content"] for r in recs for m in r["messages"])


def test_holdout_never_in_the_training_file(tmp_path: Path) -> None:
    traces = synthetic_traces(300)
    built = build_dataset(traces, _cfg(), tmp_path)
    train_ids = {r["experience_id"] for r in read_jsonl(built.train_path)}
    holdout_ids = {r["experience_id"] for r in read_jsonl(built.holdout_path)}
    assert holdout_ids == set(built.holdout_ids)
    assert not train_ids & holdout_ids
    assert not any(f"\"{h}\"" in built.train_path.read_text() for h in holdout_ids)
    assert train_ids | holdout_ids == {t.experience_id for t in traces}
    # whole groups of near-twin questions (trainer.split): the synthetic questions are 8 templates x 8 services,
    # so ~10 groups and a realised share far from the 10 % target; none of the holdout has a twin in training
    assert built.n_holdout > 0 and built.contamination_rate == 0.0 and built.n_near_dup_groups > 0
    items = [(t.experience_id, user_text(t.experience)) for t in traces]
    assert set(built.holdout_ids) == split_holdout(items, 0.10).holdout_ids


def test_holdout_split_is_a_pure_function_of_the_id() -> None:
    ids = [f"id-{i}" for i in range(2000)]
    a = [is_holdout(i, 0.1) for i in ids]
    assert a == [is_holdout(i, 0.1) for i in ids]
    assert 140 <= sum(a) <= 260
    assert not any(is_holdout(i, 0.0) for i in ids)
    # growing the fraction only adds ids: an id never leaves the holdout
    assert all(is_holdout(i, 0.2) for i, h in zip(ids, a, strict=True) if h)


def test_same_traces_give_the_same_sha256_in_any_order(tmp_path: Path) -> None:
    traces = synthetic_traces(60)
    a = build_dataset(traces, _cfg(), tmp_path / "a")
    shuffled = traces[:]
    random.Random(7).shuffle(shuffled)
    b = build_dataset(shuffled + traces[:5], _cfg(), tmp_path / "b")  # reordered, with redeliveries
    assert a.sha256 == b.sha256
    assert a.train_path.read_bytes() == b.train_path.read_bytes()
    assert a.holdout_path.read_bytes() == b.holdout_path.read_bytes()
    assert a.train_sha256 == hashlib.sha256(a.train_path.read_bytes()).hexdigest()
    c = build_dataset(traces[:-1], _cfg(), tmp_path / "c")
    assert c.sha256 != a.sha256
    d = build_dataset(traces, _cfg(tier3_phases="reasoning:3"), tmp_path / "d")
    assert d.sha256 != a.sha256  # a different projection is a different dataset


def test_phases_and_prompt_parity(tmp_path: Path) -> None:
    traces = synthetic_traces(30)
    built = build_dataset(traces, _cfg(tier3_holdout_fraction=0.0), tmp_path)
    assert built.phases == (Phase("answer", 1.0), Phase("reasoning", 2.0))
    recs = read_jsonl(built.train_path)
    assert [r["phase"] for r in recs] == ["answer"] * 30 + ["reasoning"] * 30  # curriculum order
    by_id = {t.experience_id: t for t in traces}
    for r in recs:
        t = by_id[r["experience_id"]]
        reasoning = r["phase"] == "reasoning"
        prompt, assistant = r["messages"][:-1], r["messages"][-1]
        # the exact prompt the student gets at inference
        assert prompt == inference_messages(t.experience, reasoning=reasoning)
        assert prompt[0] == {"role": "system", "content": t.experience.messages[0].content}
        assert prompt[-1]["content"] == (REASONED_INSTRUCTION if reasoning else ANSWER_ONLY_INSTRUCTION)
        assert assistant["role"] == "assistant"
        assert assistant["content"].startswith("<reasoning>" if reasoning else "<answer>")
        assert assistant["content"].endswith("</answer>")
        assert ('"time_range":"' + t.answer["time_range"] + '"') in assistant["content"]


def test_holdout_records_carry_what_evaluation_needs(tmp_path: Path) -> None:
    traces = synthetic_traces(100)
    built = build_dataset(traces, _cfg(tier3_holdout_fraction=0.3), tmp_path)
    rec = read_jsonl(built.holdout_path)[0]
    t = next(t for t in traces if t.experience_id == rec["experience_id"])
    assert rec["messages"] == inference_messages(t.experience, reasoning=True)
    assert rec["teacher_answer"] == t.answer
    assert rec["production_response"] == t.experience.response


def test_unusable_traces_are_skipped_with_a_reason(tmp_path: Path) -> None:
    good = synthetic_traces(5, partitions=1)
    bad_answer = good[0].model_copy(update={"experience_id": "bad-1", "answer": {"widgets": ["nope"]},
                                            "source": SourceOffset(topic="t", partition=0, offset=99)})
    bad_task = good[1].model_copy(update={"experience_id": "bad-2", "task": "no_such_task",
                                          "source": SourceOffset(topic="t", partition=0, offset=100)})
    built = build_dataset([*good, bad_answer, bad_task], _cfg(tier3_holdout_fraction=0.0), tmp_path)
    assert built.n_train == 5
    assert {s[0] for s in built.skipped} == {"bad-1", "bad-2"}
    assert "bad-" not in built.train_path.read_text()


@pytest.mark.parametrize("poison", ["</reasoning>", "<answer>", "<|im_end|>", "<|eot_id|>", "<end_of_turn>",
                                    "<|endoftext|>", "[/INST]"])
def test_traces_with_format_tags_or_special_tokens_are_never_trained(tmp_path: Path, poison: str) -> None:
    # traces written before the worker enforced the untrusted-text rule: the trainer refuses them too, and counts
    good = synthetic_traces(6, partitions=1)
    in_reasoning = good[0].model_copy(update={"reasoning": f"think {poison} more"})
    at_start = good[1].model_copy(update={"reasoning": f"{poison}"})  # (the widget answer schema has no free text)
    built = build_dataset([in_reasoning, at_start, *good[2:]], _cfg(tier3_holdout_fraction=0.0), tmp_path)
    assert built.n_train == 4 and built.n_unsafe == 2
    assert {s[0] for s in built.skipped} == {good[0].experience_id, good[1].experience_id}
    assert all(reason.startswith("unsafe_text:") for _, reason in built.skipped)
    text = built.train_path.read_text()
    assert f"think {poison}" not in text and good[0].experience_id not in text
    assert orjson.loads((tmp_path / "dataset.json").read_bytes())["n_unsafe"] == 2


def test_everything_in_holdout_gives_an_empty_training_set(tmp_path: Path) -> None:
    built = build_dataset(synthetic_traces(3), _cfg(tier3_holdout_fraction=0.999), tmp_path)
    assert built.n_train == 0 and built.n_holdout == 3
    assert built.train_path.read_bytes() == b""


def test_phase_spec_parsing_and_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_phases("answer:1, reasoning:2.5") == (Phase("answer", 1.0), Phase("reasoning", 2.5))
    assert parse_phases("reasoning") == (Phase("reasoning", 1.0),)
    for bad in ("", "thinking:1", "answer:x", "answer:0"):
        with pytest.raises(ValueError):
            parse_phases(bad)
    with pytest.raises(ValidationError, match="kind must be one of"):
        _cfg(tier3_phases="answer:1,thinking:2")
    with pytest.raises(ValidationError, match="TIER3_LOAD_IN_4BIT"):
        _cfg(tier3_backend="trl", tier3_load_in_4bit=True)
    monkeypatch.setenv("TIER3_PHASES", "reasoning:3")
    monkeypatch.setenv("TIER3_LORA_R", "8")
    cfg = SFTConfig()
    assert cfg.phases == (Phase("reasoning", 3.0),)
    assert cfg.tier3_lora_r == 8
    assert cfg.hyperparameters()["tier3_lora_r"] == 8
    assert cfg.target_modules == "all-linear"
    assert _cfg(tier3_lora_target_modules="q_proj, v_proj").target_modules == ["q_proj", "v_proj"]


def test_each_answer_value_is_validated_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # validation was most of a replay's time (issue 10): once per distinct answer value of a task, not once per
    # trace and phase kind
    from schemas.tasks import TaskDefinition

    traces = synthetic_traces(50)
    distinct = {(t.task, orjson.dumps(t.answer)) for t in traces}
    assert 1 < len(distinct) < 50  # the synthetic answers repeat: the test means something
    calls = 0
    inner = TaskDefinition.validate_answer

    def counting(self: TaskDefinition, answer: object) -> dict:
        nonlocal calls
        calls += 1
        return inner(self, answer)

    monkeypatch.setattr(TaskDefinition, "validate_answer", counting)
    built = build_dataset(traces, _cfg(tier3_holdout_fraction=0.0), tmp_path)
    assert built.n_train == 50 and len({p.kind for p in built.phases}) == 2
    assert calls == len(distinct)


def test_an_answer_seen_before_does_not_excuse_unsafe_reasoning_nor_a_different_answer(tmp_path: Path) -> None:
    good = synthetic_traces(3, partitions=1)
    same_answer = [_moved(good[0], 0, 10 + i, experience_id=f"again-{i}") for i in range(3)]
    same_answer[1] = same_answer[1].model_copy(update={"reasoning": "fine <|im_end|> not"})
    # the same answer value with its keys in another order: checked as a new value, and accepted
    reordered = _moved(good[0], 0, 20, experience_id="reordered",
                       answer=dict(reversed(list(good[0].answer.items()))))
    wrong = _moved(good[0], 0, 21, experience_id="wrong", answer={**good[0].answer, "widgets": ["nope"]})
    built = build_dataset([*good, *same_answer, reordered, wrong], _cfg(tier3_holdout_fraction=0.0), tmp_path)
    assert {s[0] for s in built.skipped} == {"again-1", "wrong"}
    assert built.n_unsafe == 1 and built.n_train == 3 + 2 + 1
