"""When two answers to one prompt disagree.

An answer that only adds words (elaborates, prefixes "Sure:") or drops them (is cut short) agrees with the
other. One that substitutes a word for another contradicts it: the two word sequences, aligned, hold a
replacement in which either side has a content word or a number ("module" / "scopes", "1" / "7",
"implies" / "should"), while a replaced article ("a" / "the") is a rewording. A negation
contradicts when it negates a word the other answer states plainly ("should be integers" / "should not be
integers"); a negation in added text about something the other answer never mentions is elaboration. A bare
negation ("No.") with nothing to attach to counts on its own."""

from __future__ import annotations

from dataclasses import dataclass
from difflib import SequenceMatcher

from leanlm.clean.text_ops import NEGATIONS, STOPWORDS, words

_REACH = 4  # a negation governs the first content word within this many tokens after it
_ALIGN_MAX = 3000  # longer answers are compared by their counted words alone (alignment is quadratic)


@dataclass(frozen=True)
class Answer:
    tokens: tuple        # every word, negations and stopwords included, for alignment
    counted: frozenset   # (content word, its k-th occurrence): set algebra on these is multiset algebra
    plain: frozenset     # content words stated without a negation before them
    negated: frozenset   # content words a negation governs
    bare: int            # negations with no content word to govern


def answer_signature(answer: str) -> Answer:
    tokens = words(answer)
    seen: dict[str, int] = {}
    counted, plain, negated, bare, governed = [], set(), set(), 0, set()
    for i, t in enumerate(tokens):
        if t in NEGATIONS:
            target = next((j for j in range(i + 1, min(len(tokens), i + 1 + _REACH))
                           if tokens[j] not in STOPWORDS and tokens[j] not in NEGATIONS), None)
            if target is None:
                bare += 1
            else:
                governed.add(target)
                negated.add(tokens[target])
            continue
        if t in STOPWORDS:
            continue
        seen[t] = seen.get(t, 0) + 1
        counted.append((t, seen[t]))
        if i not in governed:
            plain.add(t)
    return Answer(tuple(tokens), frozenset(counted), frozenset(plain), frozenset(negated), bare)


def agree(a: Answer, b: Answer) -> bool:
    if a.bare != b.bare:
        return False
    if (a.negated - b.negated) & b.plain or (b.negated - a.negated) & a.plain:
        return False
    if max(len(a.tokens), len(b.tokens)) > _ALIGN_MAX:
        return not (a.counted - b.counted) or not (b.counted - a.counted)
    return not _substitutes(a.tokens, b.tokens)


def _substitutes(a: tuple, b: tuple) -> bool:
    matcher = SequenceMatcher(None, a, b, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "replace" and any(t not in STOPWORDS and t not in NEGATIONS for t in (*a[i1:i2], *b[j1:j2])):
            return True
    return False


def answer_clusters(signatures: list[Answer]) -> list[list[int]]:
    """Positions grouped so that every answer agrees with every other in its cluster (a cut-short answer agrees
    with both sides of a contradiction, so it must not stand for a cluster); clusters in order of first
    appearance, an answer joining the first cluster it fits."""
    clusters: list[list[int]] = []
    for i, sig in enumerate(signatures):
        home = next((c for c in clusters if all(agree(signatures[j], sig) for j in c)), None)
        if home is None:
            clusters.append([i])
        else:
            home.append(i)
    return clusters
