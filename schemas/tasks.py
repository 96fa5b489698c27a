"""Task definitions: the production system prompt, the answer's JSON Schema, and the reasoned output format.

A task is a JSON file (``schemas/tasks/*.json``, or a folder named by ``TIER3_TASKS_DIR``) with ``name``,
``system_prompt``, ``answer_schema`` and optionally ``set_fields`` (list-valued answer fields scored as sets,
e.g. the widget selector's ``widgets``).

**The reasoned output format** is shared by the teacher (at enrichment) and the student (in training and at
inference), so a student is asked exactly what its teacher was asked::

    <reasoning>
    ...free text...
    </reasoning>
    <answer>
    {"widgets": ["cpu_usage"], "time_range": "24h"}
    </answer>

The production messages are kept unchanged; one extra user message, :data:`REASONED_INSTRUCTION`, asks for
that format (prompt parity: nothing else differs from what production sent).
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fastjsonschema
import jsonschema
import orjson

from schemas.errors import InvalidAnswer, UnknownTask

REASONED_INSTRUCTION = (
    "Think step by step about the request above. Write your reasoning between <reasoning> and </reasoning>, "
    "then give only the final answer as one JSON object between <answer> and </answer>."
)
ANSWER_ONLY_INSTRUCTION = "Give only the final answer as one JSON object between <answer> and </answer>."

_ANSWER_RE = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL)
_REASONING_RE = re.compile(r"<reasoning>\s*(.*?)\s*</reasoning>", re.DOTALL)
_FENCE_RE = re.compile(r"^```(?:json)?\s*|\s*```$")

BUILTIN_TASKS_DIR = Path(__file__).parent / "tasks"

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

    def parse_output(self, text: str) -> tuple[str, dict[str, Any]]:
        """Parse a model's reasoned output into (reasoning, validated answer); raise InvalidAnswer if it can't."""
        reasoning, obj = parse_json_answer(text)
        return reasoning, self.validate_answer(obj)


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


def field_f1(task: TaskDefinition, predicted: Mapping[str, Any], reference: Mapping[str, Any]) -> float:
    """Field-level agreement: the mean over the reference's fields of set-F1 (``set_fields``) or exact match."""
    keys = sorted(reference)
    if not keys:
        return 1.0
    total = 0.0
    for k in keys:
        if k in task.set_fields and isinstance(predicted.get(k), list) and isinstance(reference[k], list):
            total += set_f1(predicted[k], reference[k])
        else:
            total += float(predicted.get(k) == reference[k])
    return total / len(keys)


def _load_file(path: Path) -> TaskDefinition:
    d = orjson.loads(path.read_bytes())
    try:
        return TaskDefinition(
            name=d["name"], system_prompt=d["system_prompt"], answer_schema=d["answer_schema"],
            description=d.get("description", ""), version=int(d.get("version", 1)),
            set_fields=tuple(d.get("set_fields", ())), catalog=d.get("catalog", {}),
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
