"""Speculative decoding in the server: when one sequence decodes alone (where a CPU server spends its
quiet hours, and where batching has nothing to share), a drafter guesses ahead and one forward pass over
the guesses keeps what the model would have produced anyway.

Exact for every request, greedy or sampled: at each drafted position the sequence picks its own token
from the model's logits with its own sampler and generator, exactly as a plain step would, and the draft
is followed only while it agrees, so a deterministic drafter (prompt lookup, a draft model decoding
greedily) changes how fast tokens come, never which.

Speculation pays only on some workloads (text that repeats its prompt, a drafter that guesses well), so
a gate measures: it alternates short phases of plain and speculative steps, compares their tokens per
second, and keeps the faster until it measures again.
"""

from __future__ import annotations

import time

import torch

from leanlm.serve.sampling_ops import pick_token
from leanlm.speculate.loop import DraftLength, SpecStats


class SpeedGate:
    """Measure `sample` plain then `sample` speculative steps, keep the faster for `hold` steps, repeat."""

    def __init__(self, sample: int = 8, hold: int = 256):
        self.sample, self.hold = sample, hold
        self.phase, self.left = "plain", sample
        self.rates: dict[str, float] = {}
        self._spent = {"plain": [0.0, 0], "spec": [0.0, 0]}
        self.winner: str | None = None

    def use_speculation(self) -> bool:
        return self.phase == "spec" or (self.phase == "hold" and self.winner == "spec")

    def record(self, speculative: bool, seconds: float, tokens: int) -> None:
        mode = "spec" if speculative else "plain"
        if self.phase in ("plain", "spec") and mode == self.phase:
            spent = self._spent[mode]
            spent[0] += seconds
            spent[1] += tokens
        self.left -= 1
        if self.left > 0:
            return
        if self.phase == "plain":
            self.phase, self.left = "spec", self.sample
        elif self.phase == "spec":
            self.rates = {m: n / s for m, (s, n) in self._spent.items() if s > 0}
            self.winner = "spec" if self.rates.get("spec", 0) > self.rates.get("plain", 0) else "plain"
            self.phase, self.left = "hold", self.hold
            self._spent = {"plain": [0.0, 0], "spec": [0.0, 0]}
        else:
            self.phase, self.left = "plain", self.sample


class ServeSpeculation:
    """The engine's speculative step for the one sequence in row 0, and what it has measured."""

    def __init__(self, drafter, max_draft: int = 8, gate: SpeedGate | None = None):
        self.drafter = drafter
        self.length = DraftLength(most=max_draft)
        self.gate = gate or SpeedGate()
        self.stats = SpecStats()
        self._for = None  # the sequence the drafter's state follows

    def wanted(self) -> bool:
        return self.gate.use_speculation()

    def record_plain(self, seconds: float, tokens: int) -> None:
        self.gate.record(False, seconds, tokens)

    def step(self, engine, seq) -> bool:
        """One draft-and-verify step for `seq` in row 0; True when it has ended."""
        start = time.perf_counter()
        context = seq.prompt_ids + seq.out_ids
        if self._for is not seq:
            self.drafter.start(context)
            self._for = seq
        length = engine.cache.lengths[0]
        room = min(seq.params.max_tokens - len(seq.out_ids), engine.max_len - length) - 1
        draft = self.drafter.propose(context, min(self.length.now, room))[0] if room > 0 else []
        ids = torch.tensor([[context[-1]] + draft], device=engine.cache.device)
        positions = torch.arange(length, length + ids.shape[1], device=engine.cache.device)[None]
        logits = engine.forward_all(ids, positions)
        kept, ended, emitted = 0, False, 0
        for i in range(len(draft) + 1):
            token = pick_token(logits[i], seq.params.temperature, seq.params.top_p, seq.generator)
            ended = seq.accept(token, logits[i] if seq.params.logprobs else None)
            emitted += 1
            if ended or i == len(draft) or token != draft[i]:
                break
            kept += 1
        engine.cache.lengths[0] = length + kept + 1  # the rejected drafts' keys stay behind, masked, overwritten next
        self.length.update(len(draft), kept)
        self.stats.steps += 1
        self.stats.drafted += len(draft)
        self.stats.accepted += kept
        self.stats.step_tokens += emitted
        self.gate.record(True, time.perf_counter() - start, emitted)
        return ended or engine.cache.lengths[0] >= engine.max_len and seq.finish("length", seq.text.flush())

    def summary(self) -> dict:
        return {**self.stats.as_dict(), "enabled": self.gate.use_speculation(), "phase": self.gate.phase,
                "rates": self.gate.rates}
