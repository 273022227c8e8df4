"""The llama.cpp backend: GGUF files (leanlm's exports among them) run by llama-cpp-python in this process.

llama-cpp-python's Python API drives one sequence per context (its server serializes requests the same
way); llama.cpp's multi-sequence batches are reachable only through its raw C bindings, with the KV
bookkeeping this module would have to redo. So this backend runs one request at a time, first come
first served, each to its end, and says so in /stats (`slots: 1`); when the previous prompt is a prefix
of the next one, its KV is kept and only the new tokens are evaluated. The leanlm backend is the one that
batches.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from leanlm.runtime.llamacpp import LlamaCppLM
from leanlm.serve.errors import APIError
from leanlm.serve.sequence import Sequence, eos_ids_of

log = logging.getLogger(__name__)


class LlamaCppEngine:
    backend = "llama.cpp"

    def __init__(self, path: str | Path, tokenizer, max_len: int = 2048, max_queue: int = 64,
                 threads: int | None = None, on_step: Callable[[int], None] | None = None):
        self.lm = LlamaCppLM(path, n_ctx=max_len, threads=threads, logits_all=False)
        self.llm = self.lm.llm
        self.tokenizer = tokenizer
        self.max_len = min(max_len, self.llm.n_ctx())
        self.max_queue = max_queue
        self.eos_ids = eos_ids_of(None, tokenizer) | {int(self.llm.token_eos())}
        self.on_step = on_step or (lambda batch: None)
        self.waiting: deque[Sequence] = deque()
        self.current: Sequence | None = None
        self._cond = threading.Condition()
        self._accepting, self._stop = True, False
        self._thread = threading.Thread(target=self._loop, name="leanlm-llamacpp", daemon=True)
        self._thread.start()

    def submit(self, seqs: list[Sequence]) -> None:
        with self._cond:
            if not self._accepting:
                raise APIError(503, "the server is shutting down", headers={"Retry-After": "5"})
            if len(self.waiting) + len(seqs) > self.max_queue:
                raise APIError(429, f"the queue is full ({len(self.waiting)} waiting, at most {self.max_queue}); "
                                    "retry shortly", headers={"Retry-After": "1"})
            self.waiting.extend(seqs)
            self._cond.notify()

    def cancel(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            seq.cancelled = True

    def load(self) -> dict:
        return {"waiting": len(self.waiting), "running": int(self.current is not None), "slots": 1}

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        with self._cond:
            self._accepting = False
            if not drain:
                for seq in list(self.waiting) + ([self.current] if self.current else []):
                    seq.cancelled = True
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout)

    def warmup(self) -> None:
        self.llm.reset()
        self.llm.eval([int(self.llm.token_bos()) if self.llm.token_bos() >= 0 else 0])

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self.waiting or self._stop):
                    self._cond.wait()
                if not self.waiting:
                    return
                self.current = self.waiting.popleft()
            try:
                self._run(self.current)
            except Exception as err:
                log.exception("llama.cpp generation failed")
                self.current.fail(f"generation failed: {type(err).__name__}: {err}")
            self.current = None

    def _run(self, seq: Sequence) -> None:
        if seq.cancelled:
            seq.finish("cancelled")
            return
        self._feed(seq.prompt_ids)
        while True:
            if seq.cancelled:
                seq.finish("cancelled")
                return
            logits = torch.from_numpy(np.array(self.lm.last_logits(), dtype=np.float32))
            self.on_step(1)
            if seq.next_token(logits):
                return
            if self.llm.n_tokens + 1 >= self.max_len:
                seq.finish("length", seq.text.flush())
                return
            self.llm.eval([seq.out_ids[-1]])

    def _feed(self, prompt: list[int]) -> None:
        """Evaluate `prompt`, keeping the KV of the longest prefix it shares with what was evaluated last
        (llama-cpp-python's eval drops the KV past n_tokens before it evaluates)."""
        held = self.llm.input_ids[: self.llm.n_tokens].tolist()
        same = 0
        for a, b in zip(held, prompt[:-1]):  # the last prompt token is always evaluated, for its logits
            if a != b:
                break
            same += 1
        self.llm.n_tokens = same
        self.llm.eval(prompt[same:])
