"""Pure text math the cleaning stages share: normalized keys, word shingles, stable hashes, content words.

Keys must agree across processes and runs (workers hash in parallel, a rerun must find the same
duplicates), so hashes are blake2b, never Python's per-process-salted `hash()`."""

from __future__ import annotations

import hashlib
import re
import unicodedata

_WORD = re.compile(r"\w+", re.UNICODE)

# Words that carry no fact: a pair of answers that differ only in these (or in punctuation, case and
# spacing) say the same thing. Negations are deliberately absent: "is" vs "is not" is a contradiction.
STOPWORDS = frozenset("""a an the and or but if then so of to in on at by for with from as into onto about over
under is are was were be been being am do does did has have had this that these those it its it's he she they
them their his her we you your our i me my us there here which who whom whose what when where why how can could
shall should will would may might must also just very really quite any some such than too each both either
""".split())
NEGATIONS = frozenset("not no never none nothing neither nor cannot can't won't don't doesn't isn't aren't "
                      "wasn't weren't shouldn't couldn't wouldn't without".split())


def normalize(text: str) -> str:
    """The text as duplicates are compared: NFKC (full-width and ligature forms fold), case-folded,
    runs of whitespace collapsed to one space."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def words(text: str, normalized: bool = False) -> list[str]:
    """Word tokens of normalized text (punctuation dropped, so "list." and "list" are one word)."""
    return _WORD.findall(text if normalized else normalize(text))


def shingles(tokens: list[str], n: int, drop_stopwords: bool = False) -> set[str]:
    """The set of word n-grams; a text shorter than n words is one shingle (so it still has a signature).
    Stopwords are dropped only from single words: every text shares "the" and "of", which makes unrelated
    texts look alike, while in n-grams they carry the word order."""
    if drop_stopwords and n == 1:
        return {t for t in tokens if t not in STOPWORDS} or set(tokens)
    if len(tokens) < n:
        return {" ".join(tokens)} if tokens else set()
    if n == 1:
        return set(tokens)
    return {" ".join(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def key(text: str) -> bytes:
    """16-byte digest of a normalized text: equal keys are exact duplicates (a collision is ~2^-64 per pair)."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def jaccard(a: set, b: set) -> float:
    if not a and not b:
        return 1.0
    inter = len(a & b) if len(a) < len(b) else len(b & a)
    return inter / (len(a) + len(b) - inter)


def content_words(tokens: list[str]) -> set[str]:
    return {t for t in tokens if t not in STOPWORDS and t not in NEGATIONS}


def negation_count(tokens: list[str]) -> int:
    return sum(t in NEGATIONS for t in tokens)
