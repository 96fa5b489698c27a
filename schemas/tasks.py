"""Task definitions: the production system prompt, the answer's JSON Schema, and the reasoned output format.

A task is a JSON file (``schemas/tasks/*.json``, or a folder named by ``TIER3_TASKS_DIR``) with ``name``,
``system_prompt``, ``answer_schema`` and optionally ``set_fields`` (list-valued answer fields scored as sets,
e.g. the widget selector's ``widgets``), ``field_weights`` (how much each answer field counts in
:func:`task_f1`; empty: equal weights) and ``primary_metric`` (the one figure promotion and rollback judge on,
one of :data:`PRIMARY_METRICS`; default ``task_f1``).

**Why a task metric.** :func:`field_f1` is the plain mean over the answer's fields, so for the widget selector
a student that picks only wrong widgets but the right time range scores 0.5. :func:`task_f1` weighs the fields
by what matters for the task (the widget selector: ``widgets`` 0.8, ``time_range`` 0.2, so that student scores
0.2).

**The reasoned output format** is shared by the teacher (at enrichment) and the student (in training and at
inference), so a student is asked exactly what its teacher was asked::

    <reasoning>
    ...free text...
    </reasoning>
    <answer>
    {"widgets": ["cpu_usage"], "time_range": "24h"}
    </answer>

The production messages are kept unchanged; one extra user message, :data:`REASONED_INSTRUCTION`, asks for
that format (prompt parity: nothing else differs from what production sent). :data:`ANSWER_ONLY_INSTRUCTION` asks
for the ``<answer>`` block alone, :data:`RATIONALE_INSTRUCTION` (a training task only) for the ``<reasoning>``
block alone.

**Untrusted text.** A model's output is untrusted: it becomes training text, wrapped in exactly these tags and
then in the student's chat template. (Its special-token strings can never become special tokens there: the trainer
and the server tokenize message text as plain text. This rule keeps such text out of the training data at all.)
:meth:`TaskDefinition.parse_output` reads an output's markup by this grammar::

    output    := ws reasoning? ws answer ws  |  ws reasoning ws  |  json       (json: a bare answer, no tags)
    reasoning := "<reasoning>" text "</reasoning>"
    answer    := "<answer>" text "</answer>"
    text      := anything without a tag-like or a special token (below)

The tags are these exact lowercase strings. Before the markup is read, the output is seen three ways: as written,
after Unicode normalisation (NFKC, then every invisible format character removed: zero-width space and joiners,
word joiner, BOM, soft hyphen, bidi marks; Unicode category Cf) and, when it holds an ``&``, that form with HTML
entities decoded. In any of the three,

- a **tag-like** is ``<`` with optional spaces and ``/``, the name ``reasoning`` or ``answer`` in any case, then
  anything but ``<``/``>`` (up to 200 characters) and ``>``: ``</reasoning >``, ``< /reasoning>``,
  ``<answer x=1>``, ``<ANSWER>``, fullwidth ``＜answer＞``, ``<ans\u200bwer>``, ``&lt;answer&gt;``;
- a **special token** is a chat template's token: ``<|...|>`` / ``<｜...｜>`` with optional inner spaces (ChatML,
  Llama 3, Phi, harmony, DeepSeek), a name in :data:`SPECIAL_TOKENS` (any case: Llama 2, Mistral, Gemma, Qwen,
  Cohere's ``<BOS_TOKEN>``, GLM's ``[gMASK]``/``<sop>``, StarCoder's ``<file_sep>``/``<repo_name>``/
  ``<jupyter_code>``, which SmolLM2's vocabulary holds), or the shape of one: an angle-bracketed snake_case
  (``<end_of_turn>``, ``<END_OF_TURN>``) or all-capitals (``<EOS>``) name.

The output is refused with :class:`~schemas.errors.UnsafeText` (kind ``unsafe_text``) when a special token is in
it as written or the exact tags are misplaced (twice, out of order, without a partner), and with
:class:`~schemas.errors.MarkupLookalike` (kind ``tag_lookalike``) when a tag-like is not an exact tag, or a
special token or tag appears only after normalisation or entity decoding. :func:`check_trace_text` (the trainer
runs it again on stored traces) refuses reasoning or an answer that holds any tag-like or special token. Nothing is
escaped or stripped: such an output is never trained on as it is. The worker dead-letters each kind under its
own name, and ``/status`` counts dead letters by kind.
"""

from __future__ import annotations

import functools
import html
import math
import os
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fastjsonschema
import jsonschema
import orjson

from schemas.errors import InvalidAnswer, MarkupLookalike, SchemaError, UnknownTask, UnsafeText

REASONED_INSTRUCTION = (
    "Think step by step about the request above. Write your reasoning between <reasoning> and </reasoning>, "
    "then give only the final answer as one JSON object between <answer> and </answer>."
)
ANSWER_ONLY_INSTRUCTION = "Give only the final answer as one JSON object between <answer> and </answer>."
#: the rationale task of multi-task distillation (``multitask`` training phases, Distilling Step-by-Step): the
#: student writes the teacher's reasoning alone (:meth:`TaskDefinition.format_rationale`); trained, never served
RATIONALE_INSTRUCTION = (
    "Explain step by step how to answer the request above. Write only your reasoning between <reasoning> and "
    "</reasoning>; do not give the final answer."
)

_ANSWER_RE = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL)
_REASONING_RE = re.compile(r"<reasoning>\s*(.*?)\s*</reasoning>", re.DOTALL)
_FENCE_RE = re.compile(r"^```(?:json)?\s*|\s*```$")

BUILTIN_TASKS_DIR = Path(__file__).parent / "tasks"

#: the metrics a task may name as its primary one: per output, :class:`OutputScore`'s ``task_f1``, ``f1`` (field F1)
#: or ``exact`` (``exact_match`` as a rate); the offline evaluation and the online windows report each of them
PRIMARY_METRICS = ("task_f1", "f1", "exact_match")

#: the output format's own tags: in a model's output each appears at most once, in this order
FORMAT_TAGS = ("<reasoning>", "</reasoning>", "<answer>", "</answer>")
_EXACT_TAG_RE = re.compile(r"</?(?:reasoning|answer)>")
#: anything that looks like a format tag (module doc): the exact tags match it too
_TAGLIKE_RE = re.compile(r"<\s*/?\s*(?:reasoning|answer)(?![a-z0-9_])[^<>]{0,200}>", re.IGNORECASE)
#: the tag sequences an output may have (no tags: a bare JSON answer)
_ALLOWED_TAGS: tuple[tuple[str, ...], ...] = ((), FORMAT_TAGS[2:], FORMAT_TAGS[:2], FORMAT_TAGS)
#: chat-template special tokens matched by name (case-insensitively); the barred ones and the snake_case and
#: all-capitals shapes are patterns (module doc)
SPECIAL_TOKENS = (
    "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "<s>", "</s>", "<unk>", "<pad>", "<mask>",  # Llama 2, Mistral
    "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]", "[/TOOL_RESULTS]",  # Mistral v3+
    "<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>",  # Gemma
    "<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",  # Qwen, R1
    "<BOS_TOKEN>", "<EOS_TOKEN>", "<START_OF_TURN_TOKEN>", "<END_OF_TURN_TOKEN>",  # Cohere
    "[gMASK]", "[sMASK]", "[MASK]", "<sop>", "<eop>",  # GLM
    "[CLS]", "[SEP]", "[PAD]", "[UNK]",  # BERT-style vocabularies
    "<file_sep>", "<repo_name>", "<reponame>", "<filename>", "<gh_stars>", "<issue_start>", "<issue_comment>",
    "<issue_closed>", "<jupyter_start>", "<jupyter_text>", "<jupyter_code>", "<jupyter_output>",
    "<jupyter_script>", "<empty_output>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>",  # StarCoder
)
# <|im_start|>, <|im_end|>, <|endoftext|> (ChatML, Qwen), <|begin_of_text|>, <|eot_id|>, <|start_header_id|> (Llama 3),
# <|user|>, <|end|> (Phi), <|channel|>, <|message|> (harmony), and DeepSeek's full-width <｜end▁of▁sentence｜>; with
# spaces inside (<| im_end |>); snake_case and ALL-CAPITALS names in angle brackets
# (?=[<\[]): every alternative starts with "<" or "[", and the lookahead lets the engine skip every other position
# at once: 9 instead of 83 us on a 600-character teacher output (the worker's profile, bench/results/issue22-s20)
_SPECIAL_RE = re.compile(
    r"(?=[<\[])(?:"
    r"<\s*[|｜][^<>|｜\n]{1,64}[|｜]\s*>"
    r"|<\s*/?\s*[A-Za-z][A-Za-z0-9]*(?:_[A-Za-z0-9]+)+\s*>"
    r"|(?-i:<\s*/?\s*(?!(?:REASONING|ANSWER)\s*>)[A-Z]{2,}\s*>)"
    r"|" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")", re.IGNORECASE)
#: invisible format characters outside Unicode category Cf's fast check (NFKC keeps them): removed before reading
_INVISIBLE_RE = re.compile("[\u00ad\u061c\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufeff"
                           "\ufff9-\ufffb]")


def markup_views(text: str) -> list[str]:
    """The ways an output's markup is read (module doc): as written, normalised (NFKC, format characters removed),
    and that with HTML entities decoded (when it holds an ``&``)."""
    if text.isascii():
        norm = text
    else:
        norm = unicodedata.normalize("NFKC", text)
        norm = "".join(ch for ch in _INVISIBLE_RE.sub("", norm) if unicodedata.category(ch) != "Cf")
    views = [text] if norm == text else [text, norm]
    if "&" in norm:
        decoded = html.unescape(norm)
        if decoded != norm:
            views.append(decoded)
    return views


def _special_in(views: list[str]) -> tuple[str, bool] | None:
    """(the first special token found, whether it is written as such) or None."""
    for v in views:
        m = _SPECIAL_RE.search(v)
        if m:
            return m.group(0), v is views[0]
    return None


# Keywords that mean the same in draft 7 (what fastjsonschema compiles) and in 2020-12 (the task files' draft).
# A schema made only of these gets the compiled fast path for *accepting* an answer; anything else (and every
# rejection) is decided by jsonschema, so the verdict never depends on the fast path.
_PORTABLE_KEYWORDS = frozenset({
    "$schema", "title", "description", "default", "examples", "type", "properties", "required",
    "additionalProperties", "items", "enum", "const", "minItems", "maxItems", "uniqueItems", "minLength",
    "maxLength", "minimum", "maximum", "pattern", "minProperties", "maxProperties",
})


def _portable(schema: Any) -> bool:
    """True when ``schema`` uses only keywords whose meaning fastjsonschema and jsonschema share."""
    if isinstance(schema, bool):
        return True
    if not isinstance(schema, Mapping) or not set(schema) <= _PORTABLE_KEYWORDS:
        return False
    for kw in ("enum", "const"):  # Python equality makes True == 1; jsonschema does not: strings only
        if kw in schema:
            values = schema[kw] if kw == "enum" else [schema[kw]]
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                return False
    props = schema.get("properties", {})
    subs = [*props.values()] if isinstance(props, Mapping) else [None]
    for kw in ("items", "additionalProperties"):
        if kw in schema:
            subs.append(schema[kw])  # a list-valued "items" (tuple form) is not portable: _portable says no
    return all(_portable(sub) for sub in subs)


@dataclass(frozen=True)
class TaskDefinition:
    name: str
    system_prompt: str
    answer_schema: Mapping[str, Any]
    description: str = ""
    version: int = 1
    set_fields: tuple[str, ...] = ()
    catalog: Mapping[str, str] = field(default_factory=dict)
    #: answer field -> weight in :func:`task_f1` (finite, >= 0); empty: every field weighs the same
    field_weights: Mapping[str, float] = field(default_factory=dict)
    #: the metric promotion and the online rollback judge on (one of :data:`PRIMARY_METRICS`)
    primary_metric: str = "task_f1"

    def __post_init__(self) -> None:
        """Refuse (SchemaError) a primary metric not in :data:`PRIMARY_METRICS`, a weight that is not a finite
        number >= 0, weights that are all 0, and a weighted field the answer schema's ``properties`` lack."""
        if self.primary_metric not in PRIMARY_METRICS:
            raise SchemaError(f"task {self.name!r}: primary_metric {self.primary_metric!r} is not one of "
                              f"{', '.join(PRIMARY_METRICS)}", field="primary_metric")
        props = self.answer_schema.get("properties") if isinstance(self.answer_schema, Mapping) else None
        for k, w in self.field_weights.items():
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise SchemaError(f"task {self.name!r}: the weight of {k!r} must be a finite number >= 0, not "
                                  f"{w!r}", field="field_weights")
            if isinstance(props, Mapping) and k not in props:
                raise SchemaError(f"task {self.name!r}: field_weights names {k!r}, which the answer schema's "
                                  f"properties lack", field="field_weights")
        if self.field_weights and not any(w > 0 for w in self.field_weights.values()):
            raise SchemaError(f"task {self.name!r}: field_weights gives no field a weight above 0",
                              field="field_weights")

    @functools.cached_property
    def _validator(self) -> jsonschema.protocols.Validator:
        cls = jsonschema.validators.validator_for(self.answer_schema)
        cls.check_schema(self.answer_schema)
        return cls(self.answer_schema)  # type: ignore[no-any-return]

    @functools.cached_property
    def _fast_accept(self) -> Callable[[Any], Any] | None:
        """A compiled validator (fastjsonschema) when the schema is portable (see above), else None."""
        if not _portable(self.answer_schema):
            return None
        self._validator  # noqa: B018 -- check the schema itself first (a bad schema is jsonschema's error)
        return fastjsonschema.compile({k: v for k, v in self.answer_schema.items() if k != "$schema"})

    def validate_answer(self, answer: Any) -> dict[str, Any]:
        """Return ``answer`` if it matches the answer schema, else raise :class:`InvalidAnswer`.

        Fast path: a valid answer costs one call of the compiled validator (about 100 x cheaper than
        jsonschema's ``iter_errors``); only a rejected one is looked at by jsonschema, which decides and
        explains (``best_match``).
        """
        fast = self._fast_accept
        try:
            if fast is not None:
                fast(answer)
                return dict(answer)
        except Exception:  # rejected (or not understood) by the fast path: jsonschema decides
            pass
        err = jsonschema.exceptions.best_match(self._validator.iter_errors(answer))
        if err is not None:
            where = "answer" + "".join(f".{p}" if isinstance(p, str) else f"[{p}]" for p in err.absolute_path)
            raise InvalidAnswer(f"does not match the {self.name} answer schema: {err.message}", field=where)
        return dict(answer)

    def messages_for_model(self, messages: Sequence[Mapping[str, str]], *,
                           reasoning: bool = True) -> list[dict[str, str]]:
        """The production messages unchanged, plus the one output-format instruction."""
        out = [{"role": m["role"], "content": m["content"]} for m in messages]
        out.append({"role": "user", "content": REASONED_INSTRUCTION if reasoning else ANSWER_ONLY_INSTRUCTION})
        return out

    @staticmethod
    def format_output(answer: Mapping[str, Any], reasoning: str | None) -> str:
        """The assistant text a student is trained to produce (the same format the teacher answered in)."""
        body = orjson.dumps(answer, option=orjson.OPT_SORT_KEYS).decode()
        if reasoning is None:
            return f"<answer>\n{body}\n</answer>"
        return f"<reasoning>\n{reasoning.strip()}\n</reasoning>\n<answer>\n{body}\n</answer>"

    @staticmethod
    def format_rationale(reasoning: str) -> str:
        """The assistant text of the rationale task (:data:`RATIONALE_INSTRUCTION`): the reasoning block of the
        reasoned format alone, no answer."""
        return f"<reasoning>\n{reasoning.strip()}\n</reasoning>"

    def parse_output(self, text: str) -> tuple[str, dict[str, Any]]:
        """Parse a model's reasoned output into (reasoning, validated answer) under the untrusted-text rule (module
        doc); raise UnsafeText for markup, InvalidAnswer when it does not parse or validate."""
        check_output_markup(text)
        reasoning, obj = parse_json_answer(text)
        answer = self.validate_answer(obj)
        check_trace_text(reasoning, answer)
        return reasoning, answer


def unsafe_markup(text: str) -> str | None:
    """The first special token or tag-like (exact format tags included) in ``text`` or its normalised views, or
    None (module doc)."""
    views = markup_views(text)
    special = _special_in(views)
    if special is not None:
        return special[0]
    for v in views:
        m = _TAGLIKE_RE.search(v)
        if m:
            return m.group(0)
    return None


def _markup_error(text: str, bad: str, field: str) -> UnsafeText:
    if bad in text and (bad in FORMAT_TAGS or _SPECIAL_RE.fullmatch(bad)):
        return UnsafeText(f"contains {bad!r}, which must never reach training text", field=field)
    return MarkupLookalike(f"contains {bad!r}, a look-alike of a format tag or special token (after Unicode "
                           "normalisation or entity decoding), which must never reach training text", field=field)


def check_output_markup(text: str) -> None:
    """Raise UnsafeText (a special token, misplaced exact tags) or MarkupLookalike (a tag-like that is not an exact
    tag, or markup that only normalisation or entity decoding reveals) unless ``text`` (a whole model output)
    follows the output grammar (module doc)."""
    views = markup_views(text)
    special = _special_in(views)
    if special is not None:
        token, as_written = special
        if as_written:
            raise UnsafeText(f"contains the chat-template special token {token!r}", field="output")
        raise MarkupLookalike(f"contains {token!r} after Unicode normalisation or entity decoding: a look-alike of "
                              "a chat-template special token", field="output")
    tags = tuple(_EXACT_TAG_RE.findall(text))
    for v in views:
        likes = _TAGLIKE_RE.findall(v)
        odd = next((t for t in likes if t not in FORMAT_TAGS), None)
        if odd is None and len(likes) != len(tags):
            odd = next(iter(t for t in likes if likes.count(t) > tags.count(t)), likes[-1] if likes else "")
        if odd is not None:
            raise MarkupLookalike(f"contains {odd!r}, which looks like one of the format's tags but is not one "
                                  f"(the grammar accepts exactly {' '.join(FORMAT_TAGS)!r}, as written)",
                                  field="output")
    if tags not in _ALLOWED_TAGS:
        raise UnsafeText(f"the format's tags appear as {' '.join(tags)!r}; expected each at most once, in the "
                         f"order {' '.join(FORMAT_TAGS)!r}", field="output")


def check_trace_text(reasoning: str, answer: Any) -> None:
    """Raise UnsafeText (or MarkupLookalike) if the reasoning or the answer (any string in it) holds a tag-like or
    a special token (module doc)."""
    check_reasoning_text(reasoning)
    text = orjson.dumps(answer).decode()
    bad = unsafe_markup(text)
    if bad is not None:
        raise _markup_error(text, bad, "answer")


def check_reasoning_text(reasoning: str) -> None:
    """:func:`check_trace_text` for the reasoning alone (its answer was checked already)."""
    bad = unsafe_markup(reasoning)
    if bad is not None:
        raise _markup_error(reasoning, bad, "reasoning")


def parse_json_answer(text: str) -> tuple[str, Any]:
    """Extract (reasoning, JSON value) from a reasoned output without schema validation.

    The last ``<answer>`` block wins; without tags, the whole text is tried as JSON (a bare JSON answer, as a
    production model or baseline may give).
    """
    answers = _ANSWER_RE.findall(text)
    body = answers[-1] if answers else text.strip()
    body = _FENCE_RE.sub("", body.strip())
    m = _REASONING_RE.search(text)
    reasoning = m.group(1).strip() if m else ""
    try:
        return reasoning, orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        where = "answer" if answers else "output"
        raise InvalidAnswer(f"not valid JSON: {exc}", field=where) from None


def set_f1(predicted: Iterable[Any], reference: Iterable[Any]) -> float:
    """F1 of two sets (1.0 when both are empty)."""
    p, r = set(map(_hashable, predicted)), set(map(_hashable, reference))
    if not p and not r:
        return 1.0
    tp = len(p & r)
    if tp == 0:
        return 0.0
    precision, recall = tp / len(p), tp / len(r)
    return 2 * precision * recall / (precision + recall)


def _hashable(v: Any) -> Any:
    return orjson.dumps(v, option=orjson.OPT_SORT_KEYS) if isinstance(v, (dict, list)) else v


def _field_score(task: TaskDefinition, predicted: Mapping[str, Any], reference: Mapping[str, Any], k: str) -> float:
    """One field's agreement: set-F1 for a set field (both lists), else exact match (1 or 0)."""
    if k in task.set_fields and isinstance(predicted.get(k), list) and isinstance(reference[k], list):
        return set_f1(predicted[k], reference[k])
    return float(predicted.get(k) == reference[k])


def field_f1(task: TaskDefinition, predicted: Mapping[str, Any], reference: Mapping[str, Any]) -> float:
    """Field-level agreement: the mean over the reference's fields of set-F1 (``set_fields``) or exact match."""
    keys = sorted(reference)
    if not keys:
        return 1.0
    return sum(_field_score(task, predicted, reference, k) for k in keys) / len(keys)


def task_f1(task: TaskDefinition, predicted: Mapping[str, Any], reference: Mapping[str, Any]) -> float:
    """The task's own agreement figure: the weighted mean over the **reference's** fields of each field's score
    (set-F1 for ``set_fields``, else exact match, as in :func:`field_f1`), weights from ``task.field_weights``.

    - no ``field_weights``: every field of the reference weighs the same, so this equals :func:`field_f1`;
    - with ``field_weights``: a field of the reference the weights do not name weighs 0 (it does not count);
      a weighted field the reference lacks is skipped (nothing to agree with), and so are fields only the
      prediction has (as in :func:`field_f1`; the answer schema judges those);
    - when the weights of the reference's fields add up to 0 (none of its fields is weighted), equal weights
      over its fields, i.e. :func:`field_f1`; an empty reference scores 1.0.

    In [0, 1]. The widget selector (``widgets`` 0.8, ``time_range`` 0.2): the right time range with wrong widgets
    scores 0.2, the right widgets with the wrong time range 0.8.
    """
    keys = sorted(reference)
    if not keys:
        return 1.0
    weights = {k: float(task.field_weights.get(k, 0.0)) for k in keys} if task.field_weights else {}
    total_w = sum(weights.values())
    if total_w <= 0:
        return field_f1(task, predicted, reference)
    total = sum(w * _field_score(task, predicted, reference, k) for k, w in weights.items() if w > 0)
    return min(1.0, max(0.0, total / total_w))


@dataclass(frozen=True)
class OutputScore:
    """One model output scored against the reference (teacher) answer: the offline holdout evaluation
    (``trainer/close_loop/evaluate.py``) and the worker's online evaluation (``streams/online_eval.py``) use this one
    rule."""

    json_valid: bool
    schema_valid: bool
    exact: bool
    f1: float  # field F1 (:func:`field_f1`)
    set_f1: dict[str, float] = field(default_factory=dict)  # per set field, e.g. the widget-set F1
    error: str | None = None
    task_f1: float = 0.0  # the task's weighted field score (:func:`task_f1`); 0 when not a JSON object, like f1


def score_output(task: TaskDefinition, text: str, reference: Mapping[str, Any]) -> OutputScore:
    """Score one model output (reasoned or bare JSON text) against the reference (teacher) answer.

    - JSON valid: an answer parses as JSON; schema valid: it is an object matching the task's answer schema;
    - exact: the same JSON value as the reference (list order counts);
    - f1: :func:`field_f1`; ``set_f1``: :func:`set_f1` per set field of the reference (0 when not a list);
    - task_f1: :func:`task_f1` (the task's field weights); f1 and task_f1 are 0 for invalid JSON or a non-object,
      and computed (not zeroed) for an object that fails the schema, field by field.
    """
    zero_sets = {k: 0.0 for k in task.set_fields if k in reference}
    try:
        _, value = parse_json_answer(text)
    except InvalidAnswer as exc:
        return OutputScore(False, False, False, 0.0, zero_sets, error=str(exc))
    if not isinstance(value, dict):
        return OutputScore(True, False, False, 0.0, zero_sets, error=f"answer is a {type(value).__name__}, "
                           "not an object")
    error = None
    try:
        task.validate_answer(value)
        schema_valid = True
    except InvalidAnswer as exc:
        schema_valid, error = False, str(exc)
    sets = {}
    for k in task.set_fields:
        if k not in reference:
            continue
        pred, ref = value.get(k), reference[k]
        sets[k] = set_f1(pred, ref) if isinstance(pred, list) and isinstance(ref, list) else 0.0
    return OutputScore(
        json_valid=True, schema_valid=schema_valid,
        exact=_canonical(value) == _canonical(reference),
        f1=field_f1(task, value, reference), set_f1=sets, error=error,
        task_f1=task_f1(task, value, reference),
    )


def _canonical(v: Any) -> bytes:
    return orjson.dumps(v, option=orjson.OPT_SORT_KEYS)


def _load_file(path: Path) -> TaskDefinition:
    d = orjson.loads(path.read_bytes())
    try:
        return TaskDefinition(
            name=d["name"], system_prompt=d["system_prompt"], answer_schema=d["answer_schema"],
            description=d.get("description", ""), version=int(d.get("version", 1)),
            set_fields=tuple(d.get("set_fields", ())), catalog=d.get("catalog", {}),
            field_weights=dict(d.get("field_weights") or {}),
            primary_metric=str(d.get("primary_metric", "task_f1")),
        )
    except KeyError as exc:
        raise UnknownTask(f"task file {path} lacks {exc.args[0]!r}") from None


@functools.cache
def load_tasks(extra_dir: str | None = None) -> dict[str, TaskDefinition]:
    """All task definitions: the built-in ones plus those in ``extra_dir`` (or ``$TIER3_TASKS_DIR``)."""
    dirs = [BUILTIN_TASKS_DIR]
    extra = extra_dir or os.environ.get("TIER3_TASKS_DIR")
    if extra:
        dirs.append(Path(extra))
    tasks: dict[str, TaskDefinition] = {}
    for d in dirs:
        for p in sorted(d.glob("*.json")):
            t = _load_file(p)
            tasks[t.name] = t
    return tasks


def get_task(name: str) -> TaskDefinition:
    try:
        return load_tasks()[name]
    except KeyError:
        raise UnknownTask(f"no task named {name!r} (known: {', '.join(sorted(load_tasks()))})",
                          field="task") from None
