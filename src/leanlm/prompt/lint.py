"""`leanlm prompt lint`: what makes a prompt slower and less clear than it needs to be.

Findings, each with the line it is on: an instruction said twice; two instructions that contradict (one
negates the other: "Use markdown." / "Do not use markdown."); an instruction buried in the middle of a long
context, where models attend least (Liu et al., "Lost in the Middle"); and the prompt's token count and what
it costs at a price per million input tokens."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

_SENTENCE = re.compile(r"[^.!?\n]+[.!?]?")
_WORD = re.compile(r"[a-z0-9']+")
_NEGATION = re.compile(r"\b(?:not|never|no|don't|do not|avoid|without|cannot|can't|must not|mustn't)\b", re.I)
# the first word of an instruction, or a modal that makes a sentence one
_INSTRUCTION = re.compile(
    r"^\s*(?:please\s+)?(?:always|never|do|don't|use|avoid|answer|respond|reply|write|return|give|keep|make|"
    r"include|list|explain|summarize|translate|output|format|be|act|ignore|only|remember|note|ensure|"
    r"cite|quote|show|state|limit|stop|start|begin|end|add|remove|refuse|ask)\b"
    r"|\b(?:you must|you should|you will|make sure|must always|should always)\b", re.I)
_STOP = frozenset("a an the and or of to in on at by for with from as is are be it this that your you "
                  "please always only".split())
_BURIED_CONTEXT = 500  # tokens of context on both sides of an instruction before it counts as buried
_SIMILAR = 0.8


@dataclass
class Finding:
    kind: str       # duplicate | contradiction | buried | tokens
    line: int
    message: str
    other_line: int | None = None


def lint(prompt: str, tokenizer, price_per_million: float | None = None) -> list[Finding]:
    sents = _sentences(prompt)
    instructions = [s for s in sents if _INSTRUCTION.search(s["text"])]
    findings: list[Finding] = []
    for i, a in enumerate(instructions):
        for b in instructions[i + 1:]:
            sim = _jaccard(a["words"], b["words"])
            neg_a, neg_b = bool(_NEGATION.search(a["text"])), bool(_NEGATION.search(b["text"]))
            if sim >= _SIMILAR and neg_a == neg_b:
                findings.append(Finding("duplicate", b["line"], f"repeats the instruction on line {a['line']}: "
                                        f"{b['text'].strip()!r}", a["line"]))
            elif neg_a != neg_b and sim >= 0.6:
                findings.append(Finding("contradiction", b["line"], f"contradicts line {a['line']}: "
                                        f"{a['text'].strip()!r} / {b['text'].strip()!r}", a["line"]))
    total = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    for s in instructions:
        before = len(tokenizer(prompt[:s["start"]], add_special_tokens=False)["input_ids"])
        after = total - before - len(tokenizer(s["text"], add_special_tokens=False)["input_ids"])
        if before >= _BURIED_CONTEXT and after >= _BURIED_CONTEXT:
            findings.append(Finding("buried", s["line"], f"instruction after {before} tokens of context, with {after} "
                                    f"more after it: move it to the start (or repeat it at the end): "
                                    f"{s['text'].strip()!r}"))
    cost = f", ${total * price_per_million / 1e6:.6f} at ${price_per_million}/M input tokens" \
        if price_per_million is not None else ""
    findings.append(Finding("tokens", 1, f"{total} tokens{cost}"))
    return findings


def as_dicts(findings: list[Finding]) -> list[dict]:
    return [asdict(f) for f in findings]


def _sentences(prompt: str) -> list[dict]:
    out = []
    for m in _SENTENCE.finditer(prompt):
        text = m.group()
        if not text.strip():
            continue
        words = {w for w in _WORD.findall(text.lower()) if w not in _STOP} - {"not", "never", "no", "don't", "do",
                                                                               "avoid", "without"}
        out.append({"text": text, "start": m.start(), "line": prompt.count("\n", 0, m.start()) + 1, "words": words})
    return out


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0
