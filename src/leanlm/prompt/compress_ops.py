"""Pure text math of prompt compression: the units a prompt may lose (whole words, never part of one), the spans
it must keep, and which units to keep for a budget.

Protected spans (numbers, names, quoted strings, code, URLs) are single units: kept whole, or, only when the
budget cannot be met otherwise, dropped whole, never cut. Dropping whole words by their character offsets means a compressed prompt is always a subsequence of the
original's words: no token is cut in half, no multi-byte character split, nothing garbled. Text in scripts
written without spaces (Chinese, Japanese, Thai...) has no word boundary to drop at, so it is kept whole, and
the caller says that it compressed less."""

from __future__ import annotations

import re
from dataclasses import dataclass

_UNIT = re.compile(r"\s*\S+")
# one protected span: code fences, inline code, URLs, emails, quoted strings, numbers (with units, versions,
# dates, times), identifiers with dots/underscores/parentheses (os.path.join, max_tokens, len()), names
_PROTECTED = re.compile(
    r"```.*?```|`[^`\n]+`"
    r"|https?://\S+|www\.\S+|[\w.+-]+@[\w-]+(?:\.[\w-]+)+"
    r"|\"[^\"\n]{1,200}\"|“[^”\n]{1,200}”|'[^'\n]{1,200}'(?!\w)"
    r"|[$€£]?\d[\d,._:/-]*%?"
    r"|\b\w+(?:\.\w+)+(?:\(\))?|\b\w*_\w+\b|\b\w+\(\)"
    r"|\b[A-Z][a-z]*[A-Z]\w*\b|\b[A-Z]{2,}\b",
    re.DOTALL)
_CAPITAL = re.compile(r"[A-Z][\w'-]*")
_SENTENCE_END = re.compile(r"[.!?:;]\s*$|\n\s*$")
# scripts written without spaces between words: a run of them is one unit, kept whole
_UNSPACED = re.compile(r"[\u0e00-\u0e7f\u0e80-\u0eff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u3400-\u4dbf"
                       r"\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")


@dataclass
class Unit:
    start: int        # character offsets of the unit, its leading whitespace included
    end: int
    word: str         # the unit without its leading whitespace
    protected: bool   # a whole protected span (a quoted string is one unit): dropped only after every other word
    unspaced: bool    # in a script without word spacing: kept whole


def units(text: str) -> list[Unit]:
    spans = [(m.start(), m.end()) for m in _PROTECTED.finditer(text)]
    lower = {w for w in re.findall(r"\b[a-z][\w'-]*", text)}
    out, prev_end_sentence, span_of_prev = [], True, None
    for m in _UNIT.finditer(text):
        word = m.group().lstrip()
        start = m.end() - len(word)
        span = next((k for k, (s, e) in enumerate(spans) if s < m.end() and start < e), None)
        if span is not None and span == span_of_prev:  # the same span goes on: one unit, never split
            last = out[-1]
            out[-1] = Unit(last.start, m.end(), text[last.end - len(last.word):m.end()], True, last.unspaced)
            continue
        span_of_prev = span
        # a capitalized word is a name (Python, Guido, January) unless it starts a sentence and the text also
        # has it in lower case ("The", "Call")
        cap = _CAPITAL.match(word)
        prot = span is not None or bool(cap and (not prev_end_sentence or cap.group().lower() not in lower))
        out.append(Unit(m.start(), m.end(), word, prot, bool(_UNSPACED.search(word))))
        prev_end_sentence = bool(_SENTENCE_END.search(m.group())) or "\n" in text[m.end():m.end() + 1]
    return out


def sentences(us: list[Unit]) -> list[list[int]]:
    """Unit positions grouped into sentences (ending at . ! ? or a line break)."""
    groups, cur = [], []
    for i, u in enumerate(us):
        cur.append(i)
        if _SENTENCE_END.search(u.word):
            groups.append(cur)
            cur = []
    if cur:
        groups.append(cur)
    return groups


def order_to_drop(scores: list[float], us: list[Unit], intact: set[int] = frozenset()) -> list[int]:
    """Positions of droppable units: ordinary words least informative first (ties: later first), then whole
    protected spans, then the same two for the sentences to keep `intact` (the sentence that answers the
    question outranks a number elsewhere); text without spaces is never dropped."""
    droppable = [i for i, u in enumerate(us) if not u.unspaced]
    return sorted(droppable, key=lambda i: (i in intact, us[i].protected, scores[i], -i))


def render(text: str, us: list[Unit], keep: list[bool]) -> str:
    """The kept units in order, each with its own leading whitespace (a line break stays a line break)."""
    parts = [text[u.start:u.end] for u, k in zip(us, keep) if k]
    return "".join(parts).strip()
