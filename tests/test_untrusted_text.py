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


LOOKALIKES = ["</reasoning >", "< /reasoning>", "<answer x=1>", "<Answer>", "\uff1canswer\uff1e", "<ans\u200bwer>",
              "<rea\u2060soning>", "&lt;answer&gt;", "&#60;/reasoning&#62;", "\uff1c|im_end|\uff1e", "&lt;|im_end|&gt;",
              "<\u200b|im_end|>"]
#: real special tokens of vocabularies the old string list missed (Cohere, GLM, StarCoder / SmolLM2) and spaced bars
MORE_SPECIAL = ["<| im_end |>", "<END_OF_TURN>", "<BOS_TOKEN>", "<END_OF_TURN_TOKEN>", "[gMASK]", "<sop>",
                "<file_sep>", "<repo_name>", "<jupyter_code>", "<fim_prefix>"]


@pytest.mark.parametrize("token", LOOKALIKES)
@pytest.mark.parametrize("where", ["reasoning", "outside"])
def test_look_alikes_of_tags_and_tokens_are_refused_with_their_own_kind(token: str, where: str) -> None:
    text = GOOD.replace("CPU first", f"CPU {token} first") if where == "reasoning" else GOOD + f"\n{token}"
    with pytest.raises(UnsafeText, match="look") as info:
        TASK.parse_output(text)
    assert info.value.kind == "tag_lookalike"
    with pytest.raises(UnsafeText):  # stored traces: the trainer's check refuses the same text
        check_trace_text(f"x {token}", ANSWER)


@pytest.mark.parametrize("token", MORE_SPECIAL)
def test_special_tokens_of_other_vocabularies_are_refused(token: str) -> None:
    with pytest.raises(UnsafeText, match="special token") as info:
        TASK.parse_output(GOOD.replace("CPU first", f"CPU {token} first"))
    assert info.value.kind == "unsafe_text"


def test_ordinary_angle_brackets_and_unicode_pass() -> None:
    reasoning = ("p95 < 300 ms and errors > 2 %; x<y>z, List<T>, <b>bold</b>, <div>, a -> b, café, 日本語, "
                 "caf\u00e9 vs cafe\u0301, &amp; &lt; 5")
    assert TASK.parse_output(TASK.format_output(ANSWER, reasoning)) == (reasoning, ANSWER)


def test_every_special_token_starts_where_the_fast_lookahead_looks() -> None:
    """_SPECIAL_RE starts with a lookahead for "<" or "[" (the worker's profile: 9 instead of 83 us an output); a
    token added to SPECIAL_TOKENS that starts otherwise would never match."""
    from schemas.tasks import _SPECIAL_RE, SPECIAL_TOKENS

    assert all(t[0] in "<[" for t in SPECIAL_TOKENS)
    for t in SPECIAL_TOKENS:
        assert _SPECIAL_RE.search(f"text {t} text"), t
        assert _SPECIAL_RE.search(f"text {t.upper()} text"), t  # case-insensitive as before
