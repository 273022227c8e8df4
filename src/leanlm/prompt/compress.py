"""`leanlm prompt compress`: keep the words a small model finds informative, and those the question asks about.

Each token's information is its surprisal under the model (-log p(token | the question and the text before
it)), scored in windows; a word's is the mean over its tokens. Words the question names, and words in the
sentences that share most with the question, score higher (LongLLMLingua's question-aware idea, made
lexical so it costs no second pass), and the sentences sharing most with the question are kept whole,
within half the budget. Protected spans (numbers, names, quoted strings, code, URLs) are kept whole
and dropped, whole, only when nothing else is left to drop. Words go least informative first until the re-tokenized prompt fits the budget."""

from __future__ import annotations

import contextlib
import logging
import re
import time
from dataclasses import dataclass, field

from leanlm.errors import ConfigError
from leanlm.prompt import compress_ops

log = logging.getLogger(__name__)

_WINDOW = 1024        # tokens scored per forward pass; longer prompts are scored window by window
_NAMED = 6.0          # nats added to a word the question names: above nearly every unnamed word
_TOPICAL = 2.0        # nats added, scaled by its sentence's share of the question's words
_TOLERANCE = 0.02     # the budget is met within 2% of the requested tokens
_INTACT = 0.5         # share of the budget for the sentences most relevant to the question, kept whole
_REFILL = 200         # dropped units considered for putting back into the room an overshoot left
_STOP = frozenset("a an the and or but if of to in on at by for with from as is are was were be been it its "
                  "this that these those what which who how when where why do does did can could should would "
                  "will i you we they he she me my your our their there here not no".split())


@dataclass
class Compressed:
    text: str
    tokens_before: int
    tokens_after: int
    target: int
    seconds: float
    warnings: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.tokens_after / self.tokens_before


def target_tokens(budget: float, total: int) -> int:
    """A budget in (0, 1) is a share of the prompt's tokens; a whole number >= 1 is a token count."""
    if budget <= 0:
        raise ConfigError(f"the budget must be > 0 (a share like 0.5, or a token count), got {budget}")
    if budget < 1:
        return max(1, round(budget * total))
    if budget != int(budget):
        raise ConfigError(f"a budget of 1 or more is a token count and must be whole, got {budget}")
    if budget > total:
        raise ConfigError(f"the budget ({int(budget)} tokens) is larger than the prompt ({total} tokens): "
                          "nothing to compress")
    return int(budget)


def compress(prompt: str, budget: float, question: str | None = None, model=None,
             scorer_blocks: int | None = None) -> Compressed:
    """`model`: a loaded model (leanlm.load_model) or a name/path to load; default the built-in model.
    `scorer_blocks`: score with the first N decoder blocks only (then the final norm and LM head), for speed;
    default a third of them (at least 4), 0 for all."""
    from leanlm.models.load import LoadedModel, load_model

    if not prompt.strip():
        raise ConfigError("the prompt is empty")
    loaded = model if isinstance(model, LoadedModel) else load_model(model or "smollm2-135m")
    tok = loaded.tokenizer
    start = time.perf_counter()
    total = _count(tok, prompt)
    target = target_tokens(budget, total)
    us = compress_ops.units(prompt)
    scores, costs = _unit_scores(loaded, prompt, question, us, scorer_blocks)
    intact = _relevant_sentences(us, costs, _stems(question or ""), _INTACT * target)
    keep, warnings = _fit(tok, prompt, us, scores, costs, target, intact)
    text = compress_ops.render(prompt, us, keep)
    after = _count(tok, text)
    unspaced = sum(u.unspaced for u in us)
    if unspaced:
        warnings.append(f"{unspaced} stretches of text written without spaces (e.g. Chinese, Japanese, Thai) were "
                        "kept whole: there is no word boundary to drop at without garbling them")
    if after > target * (1 + _TOLERANCE):
        warnings.append(f"compressed to {after} tokens, above the requested {target}: the text without spaces "
                        "alone needs that many")
    dropped = sum(u.protected for u, k in zip(us, keep) if not k)
    if dropped:
        warnings.append(f"the budget left no room for {dropped} protected spans (numbers, names, quotes, code, "
                        "URLs): they were dropped whole, never cut")
    for w in warnings:
        log.warning(w)
    return Compressed(text, total, after, target, time.perf_counter() - start, warnings)


def _count(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"])


def _unit_scores(loaded, prompt: str, question: str | None, us, blocks) -> tuple[list[float], list[int]]:
    with _first_blocks(loaded.model, blocks):
        surprisal, offsets = _token_surprisal(loaded, prompt, question)
    sums, counts = [0.0] * len(us), [0] * len(us)
    starts = [u.start for u in us]
    import bisect

    for s, (a, _) in zip(surprisal, offsets):
        i = max(0, bisect.bisect_right(starts, a) - 1)
        sums[i] += s
        counts[i] += 1
    # a unit with no token of its own (its bytes were merged into a neighbour's token) shares that token's
    scores = [sums[i] / counts[i] if counts[i] else 0.0 for i in range(len(us))]
    named = _stems(question or "")
    if named:
        for sent in compress_ops.sentences(us):
            share = len({_stem(us[i].word) for i in sent} & named) / len(named)
            for i in sent:
                scores[i] += _TOPICAL * share + (_NAMED if _stem(us[i].word) in named else 0.0)
    return scores, counts


def _relevant_sentences(us, costs, named: set[str], room: float) -> set[int]:
    """Units of the sentences that share most with the question, kept intact while they fit in `room` tokens
    (LongLLMLingua's coarse step): a sentence that answers the question is worth more whole than any word
    elsewhere, and losing words from it breaks the very sequence a reader copies the answer from."""
    if not named:
        return set()
    ranked = []
    for sent in compress_ops.sentences(us):
        share = len({_stem(us[i].word) for i in sent} & named) / len(named)
        if share > 0:
            ranked.append((-share, sent[0], sent))
    keep: set[int] = set()
    used = 0
    for _, _, sent in sorted(ranked):
        cost = sum(costs[i] for i in sent)
        if used + cost <= room:
            keep.update(sent)
            used += cost
    return keep


def _token_surprisal(loaded, prompt: str, question: str | None) -> tuple[list[float], list[tuple[int, int]]]:
    import torch

    tok, model = loaded.tokenizer, loaded.model
    enc = tok(prompt, return_offsets_mapping=True, add_special_tokens=False)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    head = [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]
    if question:
        head += tok(f"Question: {question}\nText:", add_special_tokens=False)["input_ids"]
    device = next(model.parameters()).device
    out: list[float] = []
    with torch.inference_mode():
        for s in range(0, len(ids), _WINDOW):
            chunk = ids[s:s + _WINDOW]
            inp = torch.tensor([head + chunk], device=device)
            logits = model(input_ids=inp).logits[0, len(head) - 1:-1].float()
            logp = torch.log_softmax(logits, dim=-1)
            out += (-logp.gather(1, torch.tensor(chunk, device=device)[:, None])[:, 0]).tolist()
    return out, [tuple(o) for o in offsets]


@contextlib.contextmanager
def _first_blocks(model, count: int | None):
    """Run only the first `count` decoder blocks inside the block: the blocks' ModuleList (found from the module
    graph) is swapped for a prefix of itself and put back, whatever happens."""
    from torch import nn

    from leanlm.core.structure import find_structure

    st = find_structure(model)
    total = len(st.blocks)
    count = min(total, max(4, total // 3)) if count is None else count
    if count < 0 or count > total:
        raise ConfigError(f"scorer_blocks must be between 0 (all) and the model's {total} blocks, got {count}")
    if count in (0, total):
        yield
        return
    parent_name, _, child = st.blocks_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, nn.ModuleList(list(st.blocks)[:count]))
    try:
        yield
    finally:
        setattr(parent, child, st.blocks)


def _fit(tok, prompt, us, scores, costs, target, intact: set[int]) -> tuple[list[bool], list[str]]:
    """Drop the least informative units until the re-tokenized text fits `target`: a first guess from each
    unit's own token count, then a binary search on the real count (merges across a dropped word's
    neighbours change it by a token here and there)."""
    order = compress_ops.order_to_drop(scores, us, intact)

    def kept(m: int) -> list[bool]:
        keep = [True] * len(us)
        for i in order[:m]:
            keep[i] = False
        return keep

    def count(m: int) -> int:
        return _count(tok, compress_ops.render(prompt, us, kept(m)))
    lo, hi = 0, len(order)
    if count(hi) > target:
        return kept(hi), []
    while lo < hi:  # the fewest drops whose text fits
        mid = (lo + hi) // 2
        if count(mid) <= target:
            hi = mid
        else:
            lo = mid + 1
    keep = kept(lo)
    # the last unit dropped may be a long span that overshoots: put back smaller dropped units, the most
    # informative first, while the text still fits
    room = target - count(lo)
    for i in reversed(order[:lo][-_REFILL:]):
        if room <= 0:
            break
        if 0 < costs[i] <= room:
            keep[i] = True
            n = _count(tok, compress_ops.render(prompt, us, keep))
            if n <= target:
                room = target - n
            else:
                keep[i] = False
    return keep, []


def _stem(word: str) -> str:
    w = re.sub(r"\W+", "", word.lower())
    for suffix in ("ing", "ed", "es", "s"):
        if len(w) > len(suffix) + 3 and w.endswith(suffix):
            return w[: -len(suffix)]
    return w


def _stems(question: str) -> set[str]:
    return {_stem(w) for w in question.split() if _stem(w) and _stem(w) not in _STOP and len(_stem(w)) > 2}
