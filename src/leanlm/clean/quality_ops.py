"""Gopher-style quality heuristics (Rae et al. 2021, appendix A): each rule returns its name when a text
fails it, so the report can say which rule removed what."""

from __future__ import annotations

from collections import Counter

_SYMBOLS = ("#", "...", "…")


def failed_rule(text: str, cfg) -> str | None:
    tokens = text.split()
    n = len(tokens)
    if n < cfg.min_words:
        return "min_words"
    if n > cfg.max_words:
        return "max_words"
    mean = sum(map(len, tokens)) / n
    if mean < cfg.min_mean_word_length:
        return "min_mean_word_length"
    if mean > cfg.max_mean_word_length:
        return "max_mean_word_length"
    if sum(text.count(s) for s in _SYMBOLS) / n > cfg.max_symbol_ratio:
        return "max_symbol_ratio"
    if sum(any(c.isalpha() for c in t) for t in tokens) / n < cfg.min_alpha_word_ratio:
        return "min_alpha_word_ratio"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 2 and 1 - len(set(lines)) / len(lines) > cfg.max_duplicate_line_ratio:
        return "max_duplicate_line_ratio"
    if n >= 10:
        grams = Counter(zip(tokens, tokens[1:]))
        (a, b), count = grams.most_common(1)[0]
        if count > 2 and count * (len(a) + len(b)) / sum(map(len, tokens)) > cfg.max_top_ngram_ratio:
            return "max_top_ngram_ratio"
    return None
