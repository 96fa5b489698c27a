"""schemas.fastcodec against the canonical path (schemas.codec.decode): never looser, same values, same errors.

A differential fuzz: every field of a valid trace replaced by values of every kind and size, removed, duplicated,
joined by an unknown field; raw byte edits. For each document, either both paths refuse it with the same error,
or both accept it with the same values (and the same dataset bytes).
"""

from __future__ import annotations

import copy
import json
import random
from typing import Any

import msgspec
import orjson
import pytest
from pydantic import BaseModel

from schemas import EnrichedTrace, SchemaError, decode, encode
from schemas import messages as m
from schemas.fastcodec import (
    ChatMessageView,
    EnrichedTraceView,
    ExperienceView,
    ServedByView,
    SourceOffsetView,
    TeacherInfoView,
    _beyond_64_bits,
    decode_trace,
)
from tests.synthetic import synthetic_traces
from trainer.dataset import build_dataset
from trainer.sft_config import SFTConfig

PAIRS: list[tuple[type[msgspec.Struct], type[BaseModel]]] = [
    (ChatMessageView, m.ChatMessage), (ServedByView, m.ServedBy), (ExperienceView, m.Experience),
    (TeacherInfoView, m.TeacherInfo), (SourceOffsetView, m.SourceOffset), (EnrichedTraceView, m.EnrichedTrace),
]

CANDIDATES: list[Any] = [
    None, True, False, 0, -1, 1, 2, 1.5, -0.0, 0.5, 1e308, 2**63 - 1, 2**63, 2**64, 10**30, -(2**63) - 1,
    "", "x", "x" * 200, "x" * 201, "é" * 200, "é" * 201, "\U0001f600" * 200, "\U0001f600" * 201,
    "system", "user", "assistant", "teacher", "student", "baseline", "random", "shadow", "high_confidence",
    [], [1], ["x"], {}, {"a": 1}, {"a": "b"}, {"role": "user", "content": "hi"}, [{"role": "user", "content": "x"}],
]


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


def _get(obj: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        obj = obj[p]
    return obj


def _with(doc: dict[str, Any], path: tuple[Any, ...], value: Any, delete: bool = False) -> dict[str, Any]:
    new = copy.deepcopy(doc)
    parent = _get(new, path[:-1])
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return new


def _dumps(obj: Any) -> bytes:
    # the standard library writes integers of any size (orjson refuses beyond 64 bits)
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def _outcome(fn: Any, data: bytes) -> tuple[str, Any]:
    try:
        value = fn(data)
    except SchemaError as exc:
        return "error", (type(exc).__name__, str(exc), exc.field)
    if isinstance(value, msgspec.Struct):
        return "ok", msgspec.to_builtins(value)
    return "ok", value.model_dump(mode="json")


def _canonical(data: bytes) -> EnrichedTrace:
    return decode(data, EnrichedTrace)


def _documents() -> list[bytes]:
    traces = synthetic_traces(2)
    shadow = traces[1].model_copy(update={"shadow": True, "student_answer": {"widgets": ["x"], "n": 1}})
    base = [orjson.loads(encode(t)) for t in (traces[0], shadow)]
    docs: list[bytes] = [orjson.dumps(d) for d in base]
    for d in base:
        for path in _paths(d):
            docs.append(_dumps(_with(d, path, None, delete=True)))
            for v in CANDIDATES:
                docs.append(_dumps(_with(d, path, v)))
        for path in [p for p in _paths(d) if isinstance(_get(d, p), dict)] + [()]:
            target = _get(d, path) if path else d
            if isinstance(target, dict):
                extra = copy.deepcopy(d)
                (_get(extra, path) if path else extra)["unexpected"] = 1
                docs.append(_dumps(extra))
    raw = docs[0]
    docs += [
        raw.replace(b'{"schema_version":1,', b'{"task":"x","schema_version":1,', 1),  # a duplicated key
        raw.replace(b'"schema_version":1,', b'"schema_version":1,"schema_version":2,', 1),
        raw.replace(b'"enriched_at_ms":', b'"enriched_at_ms":1,"enriched_at_ms":', 1),
        raw.replace(b'"answer":{', b'"answer":{"big":123456789012345678901234567890,', 1),  # orjson: a float
        raw.replace(b'"answer":{', b'"answer":{"f":1E2,"g":-0,"h":1.0000000000000002,', 1),
        raw.replace(b'"reasoning":"', b'"reasoning":"\\ud800', 1),  # a lone surrogate
        raw.replace(b'"reasoning":"', b'"reasoning":"\\u00e9\\n\\"', 1),
        raw + b" ", raw + b"x", b" " + raw, b"\xef\xbb\xbf" + raw, raw[:-1], raw[: len(raw) // 2],
        b"", b"null", b"[]", b"1", b'"x"', b"{}", raw.replace(b"1700", b"NaN", 1), b"\xff" + raw[1:],
    ]
    return docs


def test_views_mirror_the_models() -> None:
    """Same field names and defaults as the pydantic models: a schema change that misses the views fails here."""
    for view, model in PAIRS:
        fields = model.model_fields
        infos = {f.name: f for f in msgspec.structs.fields(view)}
        assert set(infos) == set(fields), view
        # the codec requires the top-level schema_version on the wire, whatever the model's default
        top = {"schema_version"} if view is EnrichedTraceView else set()
        assert {n for n, f in infos.items() if f.required} == {n for n, f in fields.items() if f.is_required()} | top
        for name, info in infos.items():
            if info.required:
                continue
            default = info.default if info.default_factory is msgspec.NODEFAULT else info.default_factory()
            want = fields[name].get_default(call_default_factory=True)
            want = want.model_dump(mode="json") if isinstance(want, BaseModel) else want
            assert msgspec.to_builtins(default) == want, (view, name)


def test_fast_decode_is_never_looser_and_reads_the_same_values() -> None:
    docs = _documents()
    accepted = refused = fast_views = long_digits = 0

    def _has_big_answer_int(data: bytes) -> bool:
        doc = json.loads(data)
        return any(_beyond_64_bits(doc.get(k)) for k in ("answer", "student_answer"))

    for data in docs:
        want = _outcome(_canonical, data)
        got = _outcome(decode_trace, data)
        assert got == want, data[:300]
        if want[0] == "ok":
            accepted += 1
            fast_views += isinstance(decode_trace(data), EnrichedTraceView)
            long_digits += _has_big_answer_int(data)  # left to the canonical path on purpose
        else:
            refused += 1
    # the fuzz exercises both sides, and the fast path carries the valid documents
    assert accepted > 50 and refused > 500, (accepted, refused)
    # besides those, integers in (2**63, 2**64) (msgspec's bounds fit int64 only) and a nested schema_version
    # `true` (pydantic's Literal[1] takes it) are left to the canonical path
    assert fast_views >= 0.9 * (accepted - long_digits), (fast_views, accepted, long_digits)


def test_datasets_from_views_and_models_are_byte_identical(tmp_path: Any) -> None:
    rng = random.Random(7)
    traces = synthetic_traces(60)
    traces[3] = traces[3].model_copy(update={"answer": {"widgets": ["cpu_usage"], "time_range": "7d", "x": 1.5}})
    rng.shuffle(traces)
    views = [decode_trace(encode(t)) for t in traces]
    assert all(isinstance(v, EnrichedTraceView) for v in views)
    cfg = SFTConfig(tier3_phases="answer:1,reasoning:1", tier3_holdout_fraction=0.2)
    a = build_dataset(traces, cfg, tmp_path / "models")
    b = build_dataset(views, cfg, tmp_path / "views")
    mixed = build_dataset([*views[:30], *traces[30:]], cfg, tmp_path / "mixed")
    assert a.sha256 == b.sha256 == mixed.sha256
    assert a.n_holdout > 0 and a.skipped == b.skipped
    assert (tmp_path / "models" / "holdout.jsonl").read_bytes() == (tmp_path / "views" / "holdout.jsonl").read_bytes()


@pytest.mark.parametrize("size", [10, 1000])
def test_oversize_is_refused_before_parsing(size: int) -> None:
    data = encode(synthetic_traces(1)[0])
    with pytest.raises(SchemaError) as fast:
        decode_trace(data, max_bytes=len(data) - size)
    with pytest.raises(SchemaError) as canonical:
        decode(data, EnrichedTrace, max_bytes=len(data) - size)
    assert str(fast.value) == str(canonical.value) and fast.value.kind == "oversize"
