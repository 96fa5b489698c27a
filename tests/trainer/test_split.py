"""The near-duplicate holdout split (trainer/split.py): near-twins never straddle it, unrelated questions are not
grouped, the split is order-independent and replay-stable, and the example data's holdout is uncontaminated."""

from __future__ import annotations

import importlib.util
import itertools
import random
from collections import Counter
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from schemas.messages import ChatMessage, Experience
from trainer import split as split_mod
from trainer.dataset import build_dataset, is_holdout, read_jsonl
from trainer.sft_config import SFTConfig
from trainer.split import (
    LOOSE_JACCARD,
    NEAR_DUP_JACCARD,
    contamination_rate,
    features,
    jaccard,
    near_dup_groups,
    similar_pairs,
    split_holdout,
    user_text,
)

ROOT = Path(__file__).resolve().parents[2]
FRACTIONS = (0.05, 0.1, 0.2, 0.3, 0.5)


@cache
def _generator() -> ModuleType:
    from tests.test_examples import _generator as load

    return load()


@cache
def _example_traces() -> tuple[Any, ...]:
    """The 336 example experiences with the recorded teacher's answers, as enriched traces (bench/quality.py's
    loader: the same join the quality benchmark uses)."""
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "bench" / "quality.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return tuple(mod.load_traces())


def _items(traces: Any) -> list[tuple[str, str]]:
    return [(t.experience_id, user_text(t.experience)) for t in traces]


def _side_of_group(group: list[str], holdout: frozenset[str]) -> set[bool]:
    return {i in holdout for i in group}


def _variants(template: str, entity: str) -> list[str]:
    """One base question of a generator template and every single change the generator makes to it: another time
    phrase, a prefix, a suffix, lower / upper / sentence case."""
    gen = _generator()
    phrases = [p for ps in gen.TIME_PHRASES.values() for p in ps]
    base = template.format(e=entity, t=phrases[0]).replace("  ", " ").strip()
    out = [base]
    if "{t}" in template:
        out += [template.format(e=entity, t=p).replace("  ", " ").strip() for p in phrases[1:]]
    out += [(p + base).rstrip() for p in gen.PREFIXES if p]
    out += [(base + s).replace("??", "?") for s in gen.SUFFIXES if s]
    out += [base.lower(), base.upper(), base[0].upper() + base[1:]]
    return list(dict.fromkeys(out))


def test_every_single_change_the_generator_makes_keeps_a_near_twin() -> None:
    for sc in _generator().SCENARIOS:
        for template in sc.templates:
            base, *others = _variants(template, sc.entities[0])
            for v in others:
                assert jaccard(features(base), features(v)) >= NEAR_DUP_JACCARD, (base, v)


def test_near_twins_never_straddle_the_split() -> None:
    # every template's variants (time phrase swapped, prefix / suffix added, case changed), several ids each
    items: list[tuple[str, str]] = []
    families: list[list[str]] = []
    for sc in _generator().SCENARIOS:
        for k, template in enumerate(sc.templates):
            family = [f"{sc.name}-{k}-{j}" for j in range(len(_variants(template, sc.entities[0])))]
            items += zip(family, _variants(template, sc.entities[0]), strict=True)
            families.append(family)
    groups = near_dup_groups(items)
    group_of = {i: g for g in groups for i in g}
    for family in families:
        assert len({group_of[i] for i in family}) == 1, family
    for fraction in FRACTIONS:
        holdout = split_holdout(items, fraction).holdout_ids
        assert 0 < len(holdout) < len(items)
        for family in families:
            assert len(_side_of_group(family, holdout)) == 1, (fraction, family)


def test_unrelated_questions_are_not_grouped() -> None:
    unrelated = ["Why is the checkout API so slow today?", "how is revenue trending this quarter?",
                 "consumer lag on orders right now", "what are we spending on AWS this month?",
                 "churn for enterprise over the last 90 days", "disk IO on db-primary in the last hour",
                 "who are our biggest customers in EMEA?", "give me the on-call overview for production"]
    items = [(f"q{k}", q) for k, q in enumerate(unrelated)]
    assert all(len(g) == 1 for g in near_dup_groups(items))
    assert all(jaccard(features(a), features(b)) < LOOSE_JACCARD for a, b in itertools.combinations(unrelated, 2))
    # on the example data: questions of two different scenarios are twins in well under 0.1 % of pairs, and the
    # groups stay small (no chain through the whole data set)
    traces = _example_traces()
    scenario = {t.experience_id: t.experience.metadata["scenario"] for t in traces}
    sets = {t.experience_id: features(user_text(t.experience)) for t in traces}
    cross = [(a, b) for a, b in itertools.combinations(sets, 2) if scenario[a] != scenario[b]]
    twins = sum(1 for a, b in cross if jaccard(sets[a], sets[b]) >= NEAR_DUP_JACCARD)
    assert len(cross) > 50_000 and twins / len(cross) < 0.001
    assert max(len(g) for g in near_dup_groups(_items(traces))) <= 12


def test_the_split_is_the_same_in_any_order_and_when_recomputed() -> None:
    items = _items(_example_traces())
    first = split_holdout(items, 0.1)
    assert split_holdout(items, 0.1) == first  # replay
    rng = random.Random(11)
    for _ in range(5):
        shuffled = items[:]
        rng.shuffle(shuffled)
        assert split_holdout(shuffled, 0.1) == first
        assert near_dup_groups(shuffled) == first.groups


def test_build_dataset_bytes_do_not_depend_on_the_order(tmp_path: Path) -> None:
    traces = list(_example_traces())
    cfg = SFTConfig(tier3_base_model="unused", tier3_phases="answer:1", tier3_holdout_fraction=0.1)  # type: ignore[call-arg]
    a = build_dataset(traces, cfg, tmp_path / "a")
    shuffled = traces[:]
    random.Random(3).shuffle(shuffled)
    b = build_dataset(shuffled, cfg, tmp_path / "b")
    assert a.sha256 == b.sha256 and a.holdout_ids == b.holdout_ids
    assert a.summary() | {"sha256": 0} == b.summary() | {"sha256": 0}


def test_no_holdout_item_has_a_twin_in_training_on_the_example_data(tmp_path: Path) -> None:
    traces = list(_example_traces())
    assert len(traces) == 336
    cfg = SFTConfig(tier3_base_model="unused", tier3_phases="answer:1", tier3_holdout_fraction=0.1)  # type: ignore[call-arg]
    built = build_dataset(traces, cfg, tmp_path)
    assert built.n_train + built.n_holdout == 336 and built.n_holdout > 0
    assert built.contamination_rate == 0.0
    assert built.split_rule.startswith("near-dup-v1") and built.n_near_dup_groups > 0
    summary = built.summary()
    assert {"split_rule", "n_near_dup_groups", "contamination_rate", "contamination_rate_loose"} <= set(summary)
    assert {r["experience_id"] for r in read_jsonl(built.holdout_path)} == set(built.holdout_ids)

    text = dict(_items(traces))
    # the id-hash split it replaces, on the same data
    old_holdout = [text[i] for i in text if is_holdout(i, 0.1)]
    old_train = [text[i] for i in text if not is_holdout(i, 0.1)]
    old = contamination_rate(old_holdout, old_train, NEAR_DUP_JACCARD)
    old_loose = contamination_rate(old_holdout, old_train, LOOSE_JACCARD)
    print(f"\nexample data (336), fraction 0.10: id-hash split: holdout {len(old_holdout)}, contamination {old:.3f} "
          f"(loose {old_loose:.3f}); near-dup split: holdout {built.n_holdout} "
          f"({built.n_holdout / 336:.3f}), contamination {built.contamination_rate:.3f} "
          f"(loose {built.contamination_rate_loose:.3f}), {built.n_near_dup_groups} near-twin groups")
    assert old > 0.0
    # the check is independent of the split's join: the same numbers by brute force, here
    new_holdout = [text[i] for i in built.holdout_ids]
    new_train = [text[i] for i in built.train_ids]
    assert not any(jaccard(features(h), features(x)) >= NEAR_DUP_JACCARD for h in new_holdout for x in new_train)


def test_contamination_rate_gives_the_same_answer_through_the_index(monkeypatch: pytest.MonkeyPatch) -> None:
    text = dict(_items(_example_traces()))
    holdout = [text[i] for i in text if is_holdout(i, 0.2)]
    train = [text[i] for i in text if not is_holdout(i, 0.2)]
    pairwise = [contamination_rate(holdout, train, t) for t in (NEAR_DUP_JACCARD, LOOSE_JACCARD, 0.7)]
    monkeypatch.setattr(split_mod, "EXACT_PAIR_BUDGET", 0)
    assert [contamination_rate(holdout, train, t) for t in (NEAR_DUP_JACCARD, LOOSE_JACCARD, 0.7)] == pairwise
    assert pairwise[0] > 0.0
    assert contamination_rate([], train, NEAR_DUP_JACCARD) == 0.0
    assert contamination_rate(["", "x y"], ["", "z"], NEAR_DUP_JACCARD) == 0.5  # two empty texts are twins


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.6, 2 / 3, 0.7, 0.8, 1.0])
def test_similar_pairs_finds_exactly_the_pairs_over_the_threshold(threshold: float) -> None:
    rng = random.Random(int(threshold * 1000))
    vocab = [f"w{k}" for k in range(14)]
    sets = [frozenset(rng.sample(vocab, rng.randint(1, 6))) for _ in range(300)]
    sets = list(dict.fromkeys(sets))  # the join runs on distinct sets
    expected = [(i, j) for i, j in itertools.combinations(range(len(sets)), 2)
                if jaccard(sets[i], sets[j]) >= threshold]
    assert similar_pairs(sets, threshold) == expected
    assert expected or threshold == 1.0  # the test means something (distinct sets are never at 1.0)


def test_features_normalise_and_ignore_time_and_filler() -> None:
    assert features("Why is ＣＨＥＣＫＯＵＴ slow today?!") == features("why is checkout slow")  # NFKC, case
    assert features("hey, why is checkout slow over the last 7 days? thanks") == {"checkout", "slow"}
    assert features("checkout latency since the quarter started — urgent") == {"checkout", "latency"}
    assert features("right now") == {"right", "now"}  # nothing but time words: all of them
    assert features("") == frozenset()


def test_user_text_is_the_user_turns_only() -> None:
    def exp(system: str, *users: str) -> Experience:
        msgs = [ChatMessage(role="system", content=system), *(ChatMessage(role="user", content=u) for u in users)]
        return Experience(experience_id="e", task="widget_selector", created_at_ms=1, messages=msgs, response="{}",
                          confidence=0.5)

    assert user_text(exp("prompt A", "hello there")) == user_text(exp("prompt B", "hello there")) == "hello there"
    assert user_text(exp("s", "one", "two")) == "one\ntwo"


def test_fraction_zero_tiny_and_all() -> None:
    items = _items(_example_traces())
    assert split_holdout(items, 0.0).holdout_ids == frozenset()  # as before: no holdout
    for fraction in (*FRACTIONS, 0.999):  # a group's side: the id-hash of its smallest id
        s = split_holdout(items, fraction)
        assert s.holdout_ids == {i for g in s.groups if is_holdout(g[0], fraction) for i in g}
    assert len(split_holdout(items, 0.999).holdout_ids) > 0.9 * len(items)
    # an item without a near-twin keeps the side the id-hash split gave it
    s = split_holdout(items, 0.1)
    singles = [g[0] for g in s.groups if len(g) == 1]
    assert singles and all((i in s.holdout_ids) == is_holdout(i, 0.1) for i in singles)
    # a few groups none of which the hash picks: the nearest one is the holdout, so there is something to evaluate
    few = [("a", "checkout latency"), ("b", "checkout latency today"), ("c", "revenue by region")]
    assert not any(is_holdout(i, 0.01) for i in ("a", "c"))
    picked = split_holdout(few, 0.01).holdout_ids
    assert picked in ({"a", "b"}, {"c"})
    assert split_holdout(few[:2], 0.01).holdout_ids == frozenset()  # one group: all of it trains


def test_realised_holdout_share_on_the_example_data() -> None:
    items = _items(_example_traces())
    shares = {f: len(split_holdout(items, f).holdout_ids) / len(items) for f in FRACTIONS}
    print("\nrealised holdout share by target:", {f: round(v, 3) for f, v in shares.items()})
    for f, v in shares.items():
        assert abs(v - f) < max(0.1, f / 2), (f, v)
    sizes = Counter(len(g) for g in near_dup_groups(items))
    assert sizes[1] > 0 and sum(n for size, n in sizes.items() if size > 1) > 20
