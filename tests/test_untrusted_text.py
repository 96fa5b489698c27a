"""The untrusted-text rule of the reasoned output format (schemas.tasks; docs/guarantees.md, "Untrusted text")."""

from __future__ import annotations

import pytest

from schemas import UnsafeText, get_task
from schemas.errors import InvalidAnswer
from schemas.tasks import check_trace_text

TASK = get_task("widget_selector")
ANSWER = {"widgets": ["cpu_usage"], "time_range": "24h"}
GOOD = TASK.format_output(ANSWER, "CPU first, then memory.")

SPECIAL = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>",
           "<|end_header_id|>", "<|eom_id|>", "<|end|>", "<|user|>", "<|channel|>", "<｜end▁of▁sentence｜>",
           "<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "[INST]", "[/INST]", "<<SYS>>", "</s>",
           "<think>", "</think>"]


def test_a_clean_output_parses_in_every_allowed_shape() -> None:
    body = '{"widgets": ["cpu_usage"], "time_range": "24h"}'
    for text in (GOOD, f"<answer>{body}</answer>", body, f"```json\n{body}\n```",
                 f"Sure.\n<reasoning>a < b and c > d, x | y</reasoning>\n<answer>\n{body}\n</answer>\n"):
        assert TASK.parse_output(text)[1] == ANSWER


@pytest.mark.parametrize("token", SPECIAL)
@pytest.mark.parametrize("where", ["reasoning", "answer", "outside"])
def test_special_tokens_anywhere_are_refused(token: str, where: str) -> None:
    if where == "reasoning":
        text = GOOD.replace("CPU first", f"CPU {token} first")
    elif where == "answer":
        text = TASK.format_output({**ANSWER, "time_range": f"24h{token}"}, "ok")
    else:
        text = GOOD + f"\n{token}"
    with pytest.raises(UnsafeText, match="special token") as info:
        TASK.parse_output(text)
    assert info.value.kind == "unsafe_text"


@pytest.mark.parametrize("text", [
    GOOD.replace("CPU first", "CPU </reasoning> first"),  # cut the stored reasoning here, before the rule
    GOOD.replace("CPU first", "CPU <answer>{}</answer> first"),
    GOOD.replace("CPU first", "CPU <REASONING> first"),  # tags are matched whatever their case
    GOOD + "\n<answer>{\"widgets\": [\"error_rate\"], \"time_range\": \"1h\"}</answer>",  # a second answer
    "<answer>{}</answer><reasoning>late</reasoning>",  # out of order
    "<reasoning>unclosed\n<answer>{}</answer>",  # without its partner
])
def test_misplaced_format_tags_are_refused(text: str) -> None:
    with pytest.raises(UnsafeText, match="tags"):
        TASK.parse_output(text)


def test_not_json_is_still_an_invalid_answer_not_unsafe() -> None:
    with pytest.raises(InvalidAnswer):
        TASK.parse_output("<reasoning>fine</reasoning><answer>{nope</answer>")


def test_trace_text_check_for_stored_traces() -> None:
    check_trace_text("plain reasoning with <b>html</b> and a|b", ANSWER)
    for bad in ("</answer>", "<|im_end|>", "<Answer>"):
        with pytest.raises(UnsafeText, match="reasoning"):
            check_trace_text(f"x {bad}", ANSWER)
        with pytest.raises(UnsafeText, match="answer"):
            check_trace_text("ok", {**ANSWER, "extra": [bad]})
