"""Train/holdout split without near-twins: near-duplicate questions are grouped, and a whole group goes to one side.

A split by a hash of the experience id alone puts near-twins on both sides: production traffic repeats its questions
with small changes ("...slow today?" / "...slow this week?", "hey, ..." / "... thanks", upper / lower case), so a
holdout item whose twin was trained on measures recall, not generalisation. The rule here (``SPLIT_RULE``):

1. **Text.** The *user content* of a trace's production messages: the ``user`` role messages of
   ``trace.experience.messages``, joined by a newline (:func:`user_text`). The system prompt, shared by every item
   of a task, and the teacher's output are not part of it.
2. **Normalise** (:func:`normalise`): Unicode NFKC, casefold, punctuation to spaces, whitespace collapsed.
3. **Content words** (:func:`features`): the set of the remaining words, less
   - English stop words and chat filler (``STOP_WORDS``: articles, pronouns, prepositions, auxiliaries, question
     words; "hey", "pls", "thanks", "asap", ...), and
   - time expressions (``TIME_PHRASES``, ``TIME_WORDS``, numbers): the time window is a parameter of a question,
     not its substance ("errors on checkout today" and "... over the last 7 days" are the same question).
   When nothing is left (a question made only of such words) the set is all its words. Word order is ignored:
   the questions are short (most have 3 to 6 content words), and word bigrams on top made one substituted word
   cost three features (measured: 10 of the 110 time-phrase twins below fell under 0.5 with bigrams, none
   without).
4. **Near-twins**: two items whose content-word sets have a Jaccard similarity ``|A & B| / |A | B|`` of at least
   ``NEAR_DUP_JACCARD`` (two empty sets: 1). All such pairs are found *exactly* (:func:`similar_pairs`: an
   all-pairs similarity join with prefix and length filtering, Bayardo et al., WWW 2007), not by MinHash/LSH: LSH
   finds a pair at the threshold only with a probability (``1 - (1 - t**r)**b`` for b bands of r rows), so a
   twin could straddle the split; on sets this small the exact join is also the cheaper one, and it needs no
   hash family at all (5,000 questions: ~0.15 s on one core).
5. **Groups**: near-twins are joined transitively (union-find); a group is one side whole. Its side is
   :func:`hash_side` of the group's smallest experience id (sha256 against the holdout fraction: the function
   ``trainer.dataset.is_holdout`` always used, so an item with no twin keeps the side it had under the id-hash
   split). One exception: when the fraction is > 0, there are two groups or more and the hash picks none, the
   group whose key hashes lowest is the holdout (small or repetitive data still gets something to evaluate on).
   Every step is a pure function of the *set* of (id, text) pairs: the split does not depend on the order the
   traces arrive in, and a replay of the same traces gives the same split.

The holdout fraction is a target: whole groups move, so the realised share varies more than with a per-item hash
(a group of k items is in or out together; on the example data 0.086 for a target of 0.10, 0.22 for 0.20); a
fraction of 0 means no holdout, as before. Groups chain through shared words: on data that saturates a small
set of templates they grow large (the example generator's 122 templates at 5,000 questions: 142 groups, the
largest 1,012 items, spanning 8 scenarios through multi-word entity names such as "k8s node pool b"; at 336
questions the largest has 10, at 1,000 29). That is the price of the guarantee: any split with no twin across it
must keep such chains whole.

``NEAR_DUP_JACCARD = 0.5``, measured on the example data (``examples/widget_selector``: 336 questions, each
recovered into scenario, template, entity, time phrase, prefix and suffix; pairs at >= 0.5 / all pairs):

- same template and entity, another time phrase: 110 / 110 (most at 1.0: with the time phrase gone they are the
  same words; the lowest, 0.5, are questions of one to three content words whose prefixes / suffixes add others:
  "what's on fire right now" / "dashboard: what's on fire in the last few minutes");
- same template, entity and time phrase, another prefix / suffix / case: 9 / 9 (lowest 0.6);
- same template, another entity: 70 / 405 (17 %; "how much revenue did we lose when checkout / login went down":
  the teacher's answer does not depend on the entity, grouped on purpose);
- two templates of one scenario: 26 / 1,815 (1.4 %: "launch dashboard for dark mode" / "how is the dark mode
  launch going");
- two scenarios: 10 / 53,941 (0.02 %, the same hosts asked about twice, mostly through a multi-word entity name:
  "is k8s node pool b running hot" / "is k8s node pool b over-provisioned").

A threshold of 0.6 would let 10 of the 110 time-phrase twins straddle the split (measured at 0.5, a split at 0.6
leaves 34 % of its holdout with a twin in training). ``LOOSE_JACCARD = 0.3`` is for information only
(``contamination_rate_loose``): the share of the holdout with a train item sharing a good part of its words (on
the example data, mostly the same template about another entity).

:func:`contamination_rate` checks a split independently of the join: the share of holdout items with a train item
at Jaccard >= the threshold, by plain pairwise comparison (or, above ``EXACT_PAIR_BUDGET`` pairs, through an inverted
index of every word: exact too, and another algorithm than the join's).
"""

from __future__ import annotations

import hashlib
import math
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

NEAR_DUP_JACCARD = 0.5
LOOSE_JACCARD = 0.3
SPLIT_RULE = f"near-dup-v1: content words, jaccard>={NEAR_DUP_JACCARD}, group side = sha256(min id)"
#: holdout x train pairs compared one by one in :func:`contamination_rate`; above, an inverted index
EXACT_PAIR_BUDGET = 1_000_000

# 2**64 buckets: the side is a pure function of the key, stable across processes, machines and Python versions
# (unlike hash(), which is salted per process).
_BUCKETS = 1 << 64

STOP_WORDS = frozenset("""
a an the this that these those it its itself i me my mine myself we our ours us you your yours he him his she her
they them their there here is are was were be been being am do does did doing done have has had having get got
in on at of for to from by with about into onto over under since until till during through throughout per vs versus
via as off out up down within without between across after before around than
and or but so if then too very just also any some all each every no not only own same such both either neither
what which who whom whose where when why how whether can could would should will shall may might must let lets
s t re ll ve d m
please pls plz thanks thank thx ty cheers hi hey hello yo ok okay quick question asap urgent urgently kindly
""".split())

# multi-word time expressions whose words are not all time words on their own ("right", "top", "started")
TIME_PHRASES = re.compile(
    r"\b(?:right now|top of the (?:hour|day|week|month)|so far|to date"
    r"|(?:start|beginning|end) of the (?:day|week|month|quarter|year)"
    r"|(?:since|when) the (?:day|week|month|quarter|year) (?:started|began|start|begun))\b")

TIME_WORDS = frozenset("""
now today tonight yesterday tomorrow currently current recent recently lately moment meanwhile
morning afternoon evening night overnight noon midnight
second seconds sec secs minute minutes min mins hour hours hourly hr hrs day days daily week weeks weekly
fortnight month months monthly quarter quarters quarterly year years yearly annual annually
ytd mtd qtd wtd last past previous prior next earlier later ago few several couple
monday tuesday wednesday thursday friday saturday sunday weekend weekends weekday weekdays
january february march april june july august september october november december
jan feb mar apr jun jul aug sep sept oct nov dec q1 q2 q3 q4 h1 h2
one two three four five six seven eight nine ten eleven twelve fifteen twenty thirty forty fifty sixty ninety
hundred
""".split())

_NUMBER = re.compile(r"^\d+(?:st|nd|rd|th|s|h|d|w|m|y|mo|min|hrs?)?$")
_PUNCTUATION = re.compile(r"[^\w\s]+|_+")


class _Message(Protocol):
    @property
    def role(self) -> str: ...
    @property
    def content(self) -> str: ...


class _HasMessages(Protocol):
    @property
    def messages(self) -> Sequence[_Message]: ...


def user_text(experience: _HasMessages) -> str:
    """The user content of an experience's production messages (the text the near-duplicate rule compares)."""
    return "\n".join(m.content for m in experience.messages if m.role == "user")


def normalise(text: str) -> str:
    """NFKC, casefold, punctuation to spaces, whitespace collapsed."""
    return " ".join(_PUNCTUATION.sub(" ", unicodedata.normalize("NFKC", text).casefold()).split())


@lru_cache(maxsize=1 << 16)
def features(text: str) -> frozenset[str]:
    """The content words of ``text`` (see the module doc): what two questions are compared on."""
    norm = normalise(text)
    words = TIME_PHRASES.sub(" ", norm).split()
    content = frozenset(w for w in words if w not in STOP_WORDS and w not in TIME_WORDS and not _NUMBER.match(w))
    return content or frozenset(norm.split())


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    """|a & b| / |a | b|; 1.0 for two empty sets."""
    if not a and not b:
        return 1.0
    inter = len(a & b)
    return inter / (len(a) + len(b) - inter)


def _bucket(key: str) -> int:
    return int.from_bytes(hashlib.sha256(b"tier3-holdout\x00" + key.encode()).digest()[:8], "big")


def hash_side(key: str, fraction: float) -> bool:
    """True when ``key`` falls in the holdout: sha256 of the key against ``fraction`` (0: never)."""
    return fraction > 0.0 and _bucket(key) < fraction * _BUCKETS


def _min_overlap(size: int, threshold: float) -> int:
    # J(x, y) >= t implies |x & y| >= t * max(|x|, |y|); rounded down a hair so that float error can only lengthen
    # a prefix (more candidates), never shorten it (a missed pair)
    return max(1, math.ceil(threshold * size - 1e-9))


def similar_pairs(sets: Sequence[frozenset[str]], threshold: float) -> list[tuple[int, int]]:
    """Every pair (i, j), i < j, of distinct non-empty ``sets`` with Jaccard >= ``threshold`` (0 < threshold <= 1),
    sorted. Exact: an all-pairs join with prefix filtering (two sets that share at least o words share one among
    the first ``len - o + 1`` of each, words ordered rarest first) and length filtering, then each candidate's
    Jaccard computed."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    df = Counter(w for s in sets for w in s)
    rank = {w: r for r, w in enumerate(sorted(df, key=lambda w: (df[w], w)))}
    ordered = [sorted(rank[w] for w in s) for s in sets]
    index: dict[int, list[int]] = defaultdict(list)
    pairs: list[tuple[int, int]] = []
    # by size, so that everything already indexed is no larger than the set being probed
    for i in sorted(range(len(sets)), key=lambda k: (len(ordered[k]), ordered[k])):
        x, size = sets[i], len(ordered[i])
        if size == 0:
            continue
        prefix = ordered[i][: size - _min_overlap(size, threshold) + 1]
        shortest = threshold * size - 1e-9
        candidates: set[int] = set()
        for r in prefix:
            candidates.update(j for j in index[r] if len(ordered[j]) >= shortest)
        for j in candidates:
            if jaccard(x, sets[j]) >= threshold:
                pairs.append((min(i, j), max(i, j)))
        for r in prefix:
            index[r].append(i)
    return sorted(pairs)


def _find(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


@dataclass(frozen=True)
class Split:
    """The outcome of :func:`split_holdout`."""

    holdout_ids: frozenset[str]
    groups: tuple[tuple[str, ...], ...]  # every group (sorted ids), singletons included, sorted by first id
    threshold: float

    @property
    def n_near_dup_groups(self) -> int:
        """Groups of more than one item."""
        return sum(1 for g in self.groups if len(g) > 1)

    def is_holdout(self, experience_id: str) -> bool:
        return experience_id in self.holdout_ids


def near_dup_groups(items: Iterable[tuple[str, str]], threshold: float = NEAR_DUP_JACCARD
                    ) -> tuple[tuple[str, ...], ...]:
    """Groups of near-twin items: ``items`` are (experience_id, user text); ids must be distinct. Each group is its
    sorted ids; groups sorted by their first id."""
    by_set: dict[frozenset[str], list[str]] = defaultdict(list)
    seen: set[str] = set()
    for experience_id, text in items:
        if experience_id in seen:
            raise ValueError(f"duplicate experience_id {experience_id!r}")
        seen.add(experience_id)
        by_set[features(text)].append(experience_id)
    # identical content-word sets are twins whatever the threshold (J = 1); the join runs on distinct sets
    sets = sorted(by_set, key=lambda s: min(by_set[s]))
    parent = list(range(len(sets)))
    for i, j in similar_pairs(sets, threshold):
        ri, rj = _find(parent, i), _find(parent, j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    members: dict[int, list[str]] = defaultdict(list)
    for k, s in enumerate(sets):
        members[_find(parent, k)].extend(by_set[s])
    return tuple(sorted(tuple(sorted(m)) for m in members.values()))


def split_holdout(items: Iterable[tuple[str, str]], fraction: float, threshold: float = NEAR_DUP_JACCARD) -> Split:
    """The holdout of ``items`` ((experience_id, user text), distinct ids) at ``fraction``: whole near-twin groups,
    each on the side :func:`hash_side` gives its smallest id. One exception, for small or repetitive data: when
    ``fraction > 0``, there are at least two groups and the hash puts none in the holdout, the group whose key
    hashes lowest (the nearest to being in) is the holdout, so that a run always has something to evaluate on."""
    groups = near_dup_groups(items, threshold)
    chosen = [g for g in groups if hash_side(g[0], fraction)]
    if fraction > 0.0 and not chosen and len(groups) > 1:
        chosen = [min(groups, key=lambda g: (_bucket(g[0]), g[0]))]
    return Split(holdout_ids=frozenset(i for g in chosen for i in g), groups=groups, threshold=threshold)


def contamination_rate(holdout_texts: Sequence[str], train_texts: Sequence[str], threshold: float) -> float:
    """Share of ``holdout_texts`` with a near-twin (content-word Jaccard >= ``threshold``) in ``train_texts``; 0.0
    for an empty holdout. Independent of :func:`similar_pairs`: every holdout x train pair is compared, or (above
    ``EXACT_PAIR_BUDGET`` pairs) every pair sharing a word, counted through an inverted index."""
    if not holdout_texts:
        return 0.0
    train = sorted(set(map(features, train_texts)), key=sorted)
    holdout = [features(t) for t in holdout_texts]
    if len(holdout) * len(train) <= EXACT_PAIR_BUDGET:
        hits = sum(1 for h in holdout if any(jaccard(h, x) >= threshold for x in train))
        return hits / len(holdout)
    train_set = set(train)
    index: dict[str, list[int]] = defaultdict(list)
    for k, x in enumerate(train):
        for w in x:
            index[w].append(k)
    hits = 0
    for h in holdout:
        if h in train_set:  # identical sets (two empty ones included): J = 1
            hits += 1
            continue
        shared = Counter(k for w in h for k in index.get(w, ()))
        if any(n / (len(h) + len(train[k]) - n) >= threshold for k, n in shared.items()):
            hits += 1
    return hits / len(holdout)
