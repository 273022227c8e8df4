"""One generation as the engines see it: its prompt, its sampling settings, and the events it sends back
(text deltas with their tokens and log-probabilities, then one `done` with the finish reason)."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from leanlm.serve.sampling_ops import pick_token, token_logprobs
from leanlm.serve.text import TextStream


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0


class Sequence:
    """Filled by an engine's thread; `sink(event)` must be safe to call from that thread."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, tokenizer, eos_ids: set[int],
                 sink: Callable[[dict], None], index: int = 0):
        self.prompt_ids, self.params, self.index, self.sink = prompt_ids, params, index, sink
        self.eos_ids = eos_ids
        self.tokenizer = tokenizer
        seed = params.seed + index if params.seed is not None else random.getrandbits(62)
        self.generator = torch.Generator().manual_seed(seed)
        self.text = TextStream(tokenizer, params.stop)
        self.out_ids: list[int] = []
        self.finish_reason: str | None = None
        self.cancelled = False
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def next_token(self, logits: torch.Tensor) -> bool:
        """Sample from this row's logits and pass the result on; True when the sequence has ended."""
        p = self.params
        token = pick_token(logits, p.temperature, p.top_p, self.generator)
        return self.accept(token, logits if p.logprobs else None)

    def accept(self, token: int, logits: torch.Tensor | None = None) -> bool:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if token in self.eos_ids:
            return self.finish("stop", self.text.flush())
        self.out_ids.append(token)
        delta = self.text.push(token)
        event = {"type": "delta", "text": delta, "token": token}
        if logits is not None:
            event["logprob"], event["top"] = token_logprobs(logits, token, self.params.top_logprobs)
        if self.text.stopped:
            return self.finish("stop", delta, event)
        if len(self.out_ids) >= self.params.max_tokens:
            return self.finish("length", delta + self.text.flush(), event)
        self.sink(event)
        return False

    def finish(self, reason: str, text: str = "", last: dict | None = None) -> bool:
        if self.finish_reason is None:
            self.finish_reason = reason
            if last is not None:
                last["text"] = text
                self.sink(last)
            elif text:
                self.sink({"type": "delta", "text": text, "token": None})
            self.sink({"type": "done", "finish_reason": reason, "completion_tokens": len(self.out_ids),
                       "prompt_tokens": len(self.prompt_ids)})
        return True

    def fail(self, message: str) -> None:
        if self.finish_reason is None:
            self.finish_reason = "error"
            self.sink({"type": "error", "message": message})


def eos_ids_of(model, tokenizer) -> set[int]:
    """Every id that ends a turn: the tokenizer's EOS and the generation config's (often a list)."""
    ids = set()
    for source in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(int(i) for i in source)
    return ids
