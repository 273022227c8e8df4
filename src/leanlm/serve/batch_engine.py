"""The leanlm backend: continuous batching over any model leanlm loads (float, packed int8/int4, W8A8,
activation-sparse, MoE-fied), on one thread that owns the model.

Each loop: admit a waiting request into a free cache row, then one forward pass (a mixed step, as vLLM
and transformers' continuous batching run them) that holds the next token of every running sequence and
one chunk of the prompt being prefilled (long prompts are cut into `prefill_chunk`-token pieces so they
never stall the running batch for long): the weights are read once for both. A sequence joins the batch
the step after its prompt's last chunk and leaves it the step it ends, is cancelled or its client goes away.

The mixed step needs the model's attention to go through transformers' attention interface (slot_attention.py).
The engine checks that at start against the model's own forward, and where it fails it says so and runs
the padded steps instead: a prefill chunk, then a decode step, each its own pass.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Callable

import torch

from leanlm.runtime.compiled_decode import native_gqa
from leanlm.runtime.generate import _cache_kwarg
from leanlm.serve.errors import APIError
from leanlm.serve.kv_slots import SlotCache
from leanlm.serve.prefix_cache import PrefixCache
from leanlm.serve.sequence import Sequence, eos_ids_of
from leanlm.serve.slot_attention import SlotLayout, register, slot_attention_on

log = logging.getLogger(__name__)


class BatchEngine:
    backend = "leanlm"

    def __init__(self, loaded, max_batch: int = 16, max_queue: int = 64, max_len: int = 2048,
                 prefill_chunk: int = 256, on_step: Callable[[int], None] | None = None,
                 prefix_cache: PrefixCache | None = None, speculative: str | None = None, max_draft: int = 8,
                 mixed: bool = True):
        """`loaded`: a LoadedModel, or a function that loads one. Given a function, the model is loaded on the
        engine's own thread: torch then runs on that one thread only. Run from two threads (loaded on the
        main one, decoded on another), libgomp keeps two OpenMP teams on 2 cores and a decode step measured
        55 ms instead of 32 ms here."""
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.on_step = on_step or (lambda batch: None)
        self.prefix = prefix_cache
        self._speculative, self._max_draft = speculative, max_draft
        self.mixed = mixed  # kept only if the model passes the check at start (_check_mixed)
        self.spec = None  # serve.speculative.ServeSpeculation, built with the model on the engine's thread
        self.waiting: deque[Sequence] = deque()
        self.rows: list[Sequence] = []  # rows[:decoding] decode; rows[decoding:] (at most one) is being prefilled
        self.decoding = 0
        self._prefilled = 0  # prompt tokens of rows[decoding] already in the cache
        self._cond = threading.Condition()
        self._accepting, self._stop = True, False
        self._ready = threading.Event()
        self._failed: BaseException | None = None
        loader = loaded if callable(loaded) else (lambda: loaded)
        self._thread = threading.Thread(target=self._run, args=(loader, max_len), name="leanlm-engine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._failed is not None:
            raise self._failed

    def _run(self, loader, max_len: int) -> None:
        try:
            self._setup(loader(), max_len)
        except BaseException as err:  # raised again in the constructor, on the caller's thread
            self._failed = err
            self._ready.set()
            return
        self._ready.set()
        self._loop()

    def _setup(self, loaded, max_len: int) -> None:
        self.loaded = loaded
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        cfg = self.model.config.get_text_config() if hasattr(self.model.config, "get_text_config") else self.model.config
        context = getattr(cfg, "max_position_embeddings", None) or max_len
        self.max_len = min(max_len, context)
        self.eos_ids = eos_ids_of(self.model, self.tokenizer)
        self._check_attention(cfg)
        self.window = getattr(cfg, "sliding_window", None) if "sliding_attention" in (getattr(cfg, "layer_types", None) or []) else None
        self.cache = SlotCache.for_model(self.model, self.max_batch, self.max_len)
        self.dtype = self.cache.dtype
        self._kwarg = _cache_kwarg(self.model)
        self._gqa = self.cache.device.type == "cpu"
        self.mixed = self.mixed and self._check_mixed(cfg.num_hidden_layers)
        if self._speculative:
            self.spec = _speculation(self._speculative, loaded, self._max_draft)

    def _check_attention(self, cfg) -> None:
        impl = getattr(cfg, "_attn_implementation", None) or "sdpa"
        if impl not in ("sdpa", "eager"):
            raise APIError(500, f"the leanlm backend batches through attention masks, which the {impl!r} attention "
                                "implementation does not take; load the model with attn_implementation='sdpa'")

    # called from the server's threads
    def submit(self, seqs: list[Sequence]) -> None:
        with self._cond:
            if not self._accepting:
                raise APIError(503, "the server is shutting down", headers={"Retry-After": "5"})
            # the rows are taken one prefill at a time, so a burst waits here first: the bound is on both
            queued = len(self.waiting) + len(self.rows) - self.max_batch
            if queued + len(seqs) > self.max_queue:
                raise APIError(429, f"the queue is full ({max(0, queued)} waiting beyond the {self.max_batch} running, "
                                    f"at most {self.max_queue}); retry shortly", headers={"Retry-After": "1"})
            self.waiting.extend(seqs)
            self._cond.notify()

    def cancel(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            seq.cancelled = True
        with self._cond:
            self._cond.notify()

    def load(self) -> dict:
        return {"waiting": len(self.waiting), "running": len(self.rows), "slots": self.max_batch}

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests; with `drain`, finish those already taken first."""
        with self._cond:
            self._accepting = False
            if not drain:
                for seq in list(self.waiting) + self.rows:
                    seq.cancelled = True
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout)

    def warmup(self) -> None:
        """One short generation, so the first request does not pay for lazily built kernel layouts."""
        done = threading.Event()

        def sink(event: dict) -> None:
            if event["type"] in ("done", "error"):
                done.set()
        self.submit([Sequence([0, 1, 2, 3], _greedy(2), self.tokenizer, set(), sink)])
        done.wait(600)

    # the engine thread
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self.waiting or self.rows or self._stop):
                    self._cond.wait()
                if self._stop and not (self.waiting or self.rows):
                    return
                self._admit()
            try:
                self._drop_cancelled()
                if self.mixed:
                    self._step()
                    continue
                if len(self.rows) > self.decoding:
                    self._prefill_step()
                if self.decoding:
                    self._decode_step()
            except Exception as err:  # a failed step fails its requests, not the server
                log.exception("engine step failed")
                for seq in self.rows:
                    seq.fail(f"generation failed: {type(err).__name__}: {err}")
                self.rows, self.decoding = [], 0
                for r in range(self.max_batch):
                    self.cache.clear(r)

    def _admit(self) -> None:
        while self.waiting and self.waiting[0].cancelled:
            self.waiting.popleft().finish("cancelled")
        if self.waiting and len(self.rows) == self.decoding and len(self.rows) < self.max_batch:
            seq = self.waiting.popleft()
            self.rows.append(seq)
            self._prefilled = 0
            if self.prefix is not None:  # a cached prefix is copied in, not run again
                self._prefilled = self.prefix.load(self.prefix.match(seq.prompt_ids), self.cache, len(self.rows) - 1)

    def _drop_cancelled(self) -> None:
        for r in range(len(self.rows) - 1, -1, -1):
            if self.rows[r].cancelled:
                self.rows[r].finish("cancelled")
                self._remove(r)

    def _remove(self, r: int) -> None:
        """Free row r, keeping rows contiguous: the last decoding row fills it, the prefilling one moves down."""
        if r >= self.decoding:  # the row being prefilled
            self.cache.clear(r)
            self.rows.pop(r)
            return
        last = self.decoding - 1
        self.cache.move(last, r)
        self.rows[r] = self.rows[last]
        self.decoding -= 1
        if len(self.rows) > last + 1:  # a prefilling row sits after the decoding ones
            self.cache.move(last + 1, last)
            self.rows[last] = self.rows[last + 1]
        self.rows.pop()

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, rows: slice, keep: int = 1) -> torch.Tensor:
        self.cache.begin(rows, positions)
        mask = self.cache.mask(self.dtype)
        if self.window is not None:
            mask = {"full_attention": mask, "sliding_attention": self.cache.mask(self.dtype, self.window)}
        try:
            with torch.inference_mode(), native_gqa(self._gqa):
                out = self.model(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=True,
                                 logits_to_keep=keep, **{self._kwarg: self.cache})
        finally:
            self.cache.finish()
        return out.logits[:, -1, :] if keep == 1 else out.logits

    def forward_all(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Row 0's logits after each of its tokens [tokens, vocab] (a speculative step's verification)."""
        if self.mixed:
            start = int(positions[0, 0])
            layout = SlotLayout([], start, start + ids.shape[1], self.cache.device)
            return self._forward_mixed(ids[0].tolist(), layout, list(range(ids.shape[1])))
        return self._forward(ids, positions, slice(0, 1), keep=0)[0]

    def _forward_mixed(self, ids: list[int], layout: SlotLayout, keep: list[int]) -> torch.Tensor:
        """Logits [len(keep), vocab] after the tokens at `keep` of one mixed pass."""
        device = self.cache.device
        self.cache.begin_mixed(layout)
        try:
            with torch.inference_mode(), slot_attention_on(self.model):
                out = self.model(input_ids=torch.tensor([ids], device=device), position_ids=layout.positions(),
                                 attention_mask=None, use_cache=True, slot_layout=layout,
                                 logits_to_keep=torch.tensor(keep, dtype=torch.long, device=device),
                                 **{self._kwarg: self.cache})
        finally:
            self.cache.finish()
        return out.logits[0]

    def _step(self) -> None:
        """One mixed pass: the next token of each decoding row, and the next chunk of the prompt being prefilled."""
        if not self.rows:  # every waiting request was cancelled before it got a row
            return
        n = self.decoding
        batch = self.rows[:n]
        if n:
            self.on_step(n)
        alone = n == 1 and len(self.rows) == 1 and not self.waiting
        if alone and self._speculated(batch[0]):
            return
        started = time.perf_counter()
        ids = self._last_tokens(batch)
        start = stop = 0
        prompt: list[int] = []
        if len(self.rows) > n:
            prompt = self.rows[n].prompt_ids
            start, stop = self._prefilled, min(len(prompt), self._prefilled + self.prefill_chunk)
            ids += prompt[start:stop]
        last = bool(prompt) and stop == len(prompt)  # the chunk ends the prompt: its last token's logits are wanted
        layout = SlotLayout(list(self.cache.lengths[:n]), start, stop, self.cache.device)
        logits = self._forward_mixed(ids, layout, list(range(n)) + ([len(ids) - 1] if last else []))
        ended = self._next_tokens(batch, logits, started if alone else None)
        if prompt:
            self._prefilled = stop
            if last:
                self._prompt_done(n, logits[n])
        for r in reversed(ended):
            self._remove(r)

    def _speculated(self, seq: Sequence) -> bool:
        """A speculative step for the one sequence decoding alone, where speculation is on and paying."""
        if self.spec is None or not self.spec.wanted():
            return False
        if self.spec.step(self, seq):
            self._remove(0)
        return True

    @staticmethod
    def _last_tokens(batch: list[Sequence]) -> list[int]:
        return [seq.out_ids[-1] if seq.out_ids else seq.prompt_ids[-1] for seq in batch]

    def _next_tokens(self, batch: list[Sequence], logits: torch.Tensor, started: float | None) -> list[int]:
        """Each decoding row takes its token from logits[row]; the rows that ended. `started`: a plain step of a
        sequence alone began then, and its time is what speculation is measured against."""
        ended = [r for r, seq in enumerate(batch) if seq.next_token(logits[r])
                 or self.cache.lengths[r] >= self.max_len and seq.finish("length", seq.text.flush())]
        if started is not None and self.spec is not None:
            self.spec.record_plain(time.perf_counter() - started, 1)
        return ended

    def _prompt_done(self, r: int, logits: torch.Tensor) -> None:
        """Row r's prompt is in the cache: keep its prefix, take its first token, and decode it from now on."""
        seq = self.rows[r]
        if self.prefix is not None:
            self.prefix.store(seq.prompt_ids, self.cache, r)
        if seq.next_token(logits):
            self._remove(r)
        else:
            self.decoding += 1

    def _check_mixed(self, layers: int) -> bool:
        """Run two rows through mixed passes (a chunk from 0, then decode + a chunk from mid-prompt) and compare
        with the model's own forward; a model whose attention bypasses the interface fails here, not in service."""
        register()
        vocab = self.model.get_input_embeddings().num_embeddings
        ids = [(7 * i + 3) % vocab for i in range(8)]
        dev = self.cache.device
        try:
            with torch.inference_mode():
                want = self.model(input_ids=torch.tensor([ids], device=dev), use_cache=False).logits[0].float()
            first = SlotLayout([], 0, 5, dev)
            got = [self._forward_mixed(ids[:5], first, [4])[0]]
            second = SlotLayout([5], 0, 3, dev)
            got.append(self._forward_mixed([ids[5]] + ids[:3], second, [0, 3])[0])
            third = SlotLayout([6], 3, 6, dev)
            out = self._forward_mixed([ids[6]] + ids[3:6], third, [0, 1, 2, 3])
            got += [out[0], *out[1:]]
            got = torch.stack(got).float()
            expect = torch.stack([want[4], want[5], want[6], want[3], want[4], want[5]])
            calls = first.calls, second.calls, third.calls
            err = float((got - expect).abs().max() / expect.abs().max().clamp_min(1e-6))
        except Exception as exc:  # noqa: BLE001 - the reason is logged, and the padded steps serve instead
            calls, err, reason = None, None, f"{type(exc).__name__}: {exc}"
        finally:
            for r in range(self.max_batch):
                self.cache.clear(r)
        if err is not None and err <= 1e-2 and calls == (layers,) * 3:
            return True
        if err is not None:
            reason = f"its logits differ from the model's own by {err:.2g} (relative), {calls} attention calls for {layers} layers"
        log.warning("the mixed prefill+decode step does not fit this model (%s); serving with a prefill pass and a "
                    "decode pass per step instead, which reads the weights twice", reason)
        return False

    def _prefill_step(self) -> None:
        r = self.decoding
        seq = self.rows[r]
        prompt = seq.prompt_ids
        stop = min(len(prompt), self._prefilled + self.prefill_chunk)
        ids = torch.tensor([prompt[self._prefilled:stop]], device=self.cache.device)
        positions = torch.arange(self._prefilled, stop, device=self.cache.device)[None]
        logits = self._forward(ids, positions, slice(r, r + 1))
        self._prefilled = stop
        if stop == len(prompt):
            self._prompt_done(r, logits[0])

    def _decode_step(self) -> None:
        batch = self.rows[: self.decoding]
        self.on_step(len(batch))
        alone = len(batch) == 1 and len(self.rows) == 1 and not self.waiting
        if alone and self._speculated(batch[0]):
            return
        started = time.perf_counter()
        ids = torch.tensor(self._last_tokens(batch), device=self.cache.device)[:, None]
        positions = torch.tensor(self.cache.lengths[: len(batch)], device=self.cache.device)[:, None]
        logits = self._forward(ids, positions, slice(0, len(batch)))
        ended = self._next_tokens(batch, logits, started if alone else None)
        for r in reversed(ended):
            self._remove(r)


def _speculation(mode: str, loaded, max_draft: int):
    from leanlm.errors import ConfigError
    from leanlm.serve.speculative import ServeSpeculation
    from leanlm.speculate.spec import make_drafter

    if mode.partition(":")[0] == "self":
        raise ConfigError("serve --speculative takes lookup[:N] or draft:MODEL; self-speculation splits the model's "
                          "blocks over transformers' own cache, which the server's batched cache is not (measure it "
                          "with `leanlm bench --speculative self:DIR`)")
    return ServeSpeculation(make_drafter(mode, loaded, str(loaded.device)), max_draft)


def _greedy(tokens: int):
    from leanlm.serve.sequence import SamplingParams

    return SamplingParams(max_tokens=tokens, temperature=0.0)
