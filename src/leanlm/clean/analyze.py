"""The per-record work of the read and write passes, in batches a worker process can take (`--workers N`).

Everything here depends only on the batch and the config, never on other batches: exact keys, quality and
contamination verdicts and LSH band hashes in the read pass, PII redaction in the write pass. What needs all
records at once (which key came first, which candidate pairs hold) stays in the parent, in input order, so the
result is the same for any number of workers."""

from __future__ import annotations

import multiprocessing
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from leanlm.clean import near_ops, pii_ops, quality_ops, text_ops
from leanlm.clean.records import map_strings, to_record
from leanlm.errors import ConfigError

BATCH = 2048
_STATE: dict = {}  # a worker's config, set once by `_init` rather than pickled with every batch


@dataclass
class Analysis:
    """One batch of the read pass. Rows of `text_bands` belong to the records at `text_rows` (texts long
    enough for near-duplicate detection); rows of `prompt_bands` to those at `prompt_rows` (chat and
    prompt/completion records, whose prompts the conflict stage groups)."""
    keys: np.ndarray              # (n, 2) uint64: each record's normalized-text digest
    reasons: dict[int, str]       # position -> why quality or contamination removes it
    text_rows: np.ndarray
    text_bands: np.ndarray
    prompt_rows: np.ndarray
    prompt_keys: np.ndarray       # (len(prompt_rows), 2) uint64: digests of the normalized prompts
    prompt_bands: np.ndarray


def analyze(suffix: str, source: str, items: list[tuple[int, str, Any]], cfg=None, eval_grams=None) -> Analysis:
    cfg = cfg if cfg is not None else _STATE["cfg"]
    eval_grams = eval_grams if eval_grams is not None else _STATE["eval_grams"]
    near = cfg.near_duplicates
    keys, reasons, text_rows, text_sets, prompt_keys, prompt_rows, prompt_sets = [], {}, [], [], [], [], []
    for pos, (index, where, payload) in enumerate(items):
        rec = to_record(suffix, source, index, where, payload)
        norm = text_ops.normalize(rec.text)
        keys.append(text_ops.key(norm))
        reason = quality_ops.failed_rule(rec.text, cfg.quality) if cfg.quality.enabled else None
        reason = f"quality:{reason}" if reason else None
        tokens = text_ops.words(norm, normalized=True)
        if reason is None and eval_grams and not eval_grams.isdisjoint(
                text_ops.shingles(tokens, cfg.contamination.ngram)):
            reason = "contamination"
        if reason:
            reasons[pos] = reason
        if near.enabled and reason is None and len(tokens) >= near.min_words:
            text_rows.append(pos)
            text_sets.append(text_ops.shingles(tokens, near.ngram, near.drop_stopwords))
        if cfg.conflicts.enabled and reason is None and rec.answer is not None:
            ptokens = text_ops.words(rec.prompt)
            prompt_keys.append(text_ops.key(" ".join(ptokens)))
            prompt_rows.append(pos)
            prompt_sets.append(text_ops.shingles(ptokens, 2))
    return Analysis(_digests(keys), reasons,
                    np.asarray(text_rows, dtype=np.int64),
                    near_ops.band_hashes(text_sets, near.num_perm, near.bands, near.seed),
                    np.asarray(prompt_rows, dtype=np.int64), _digests(prompt_keys),
                    near_ops.band_hashes(prompt_sets, near.num_perm, near.bands, near.seed))


def _digests(keys: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(keys), dtype=np.uint64).reshape(-1, 2)


def redact(suffix: str, source: str, items: list[tuple[int, str, Any]], removed: set[int], kinds=None):
    """For each item: (the parsed record when it is removed or was changed, else None; the redacted record or
    None when nothing was found; PII counts). Kept records without PII come back as None and are written from
    their original line."""
    kinds = kinds if kinds is not None else _STATE["cfg"].pii.kinds
    out = []
    for index, where, payload in items:
        if index in removed:
            out.append((to_record(suffix, source, index, where, payload).raw, None, {}))
            continue
        rec = to_record(suffix, source, index, where, payload)
        found: dict[str, int] = {}

        def one(text: str) -> str:
            new, counts = pii_ops.redact(text, kinds)
            for kind, n in counts.items():
                found[kind] = found.get(kind, 0) + n
            return new
        changed = map_strings(rec.raw, one)
        out.append((rec.raw, changed, found) if found else (None, None, {}))
    return out


def _init(cfg, eval_grams) -> None:
    _STATE.update(cfg=cfg, eval_grams=eval_grams)


class Workers:
    """`map` runs a batch function in input order: in this process, or in a pool of spawned processes with a
    bounded number of batches in flight, so reading never runs ahead of the work by more than that."""

    def __init__(self, workers: int, cfg, eval_grams: set[str]):
        self.cfg, self.eval_grams = cfg, eval_grams
        self.pool = None
        if workers > 1:
            # spawn, not fork: the parent may hold threads (tqdm's monitor, a caller's) that a fork would copy
            # mid-lock
            ctx = multiprocessing.get_context("spawn")
            self.pool = ctx.Pool(workers, initializer=_init, initargs=(cfg, eval_grams))
        self.window = 2 * workers

    def map(self, fn: Callable, calls: Iterable[tuple[Any, tuple]]) -> Iterator[tuple[Any, Any]]:
        """(tag, fn(*args)) for each (tag, args) of `calls`, in order."""
        if self.pool is None:
            _init(self.cfg, self.eval_grams)
            for tag, args in calls:
                yield tag, fn(*args)
            return
        pending: deque = deque()
        for tag, args in calls:
            pending.append((tag, self.pool.apply_async(fn, args)))
            if len(pending) >= self.window:
                tag, result = pending.popleft()
                yield tag, result.get()
        while pending:
            tag, result = pending.popleft()
            yield tag, result.get()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


def _ray_call(cfg, eval_grams, fn: Callable, args: tuple):
    """One batch in a Ray worker: the config arrives as an object stored once in the cluster, not per batch."""
    if _STATE.get("cfg") is not cfg:
        _init(cfg, eval_grams)
    return fn(*args)


class RayWorkers(Workers):
    """`Workers.map` as Ray tasks on a cluster (`address`: `local` starts one in this process, `auto` or
    `ray://host:10001` joins one). The driver frames the records, so every record keeps its file and
    position (removed.jsonl needs them, and Ray Data's readers do not keep them); the cluster parses, hashes,
    scores and redacts. At most two batches per cluster CPU are in flight, so memory stays bounded."""

    def __init__(self, address: str, cfg, eval_grams: set[str]):
        try:
            import ray
        except ImportError as err:
            raise ConfigError("--engine ray needs Ray: pip install 'leanlm[ray]'") from err
        self.cfg, self.eval_grams, self.pool, self.ray = cfg, eval_grams, None, ray
        if not ray.is_initialized():
            if address == "local":
                ray.init(include_dashboard=False, log_to_driver=False)
            else:
                try:
                    ray.init(address=address, log_to_driver=False)
                except ConnectionError as err:
                    raise ConfigError(f"--ray-address {address}: no Ray cluster answers there ({err}); start one "
                                      "with `ray start --head` or use --ray-address local") from None
        self.window = 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.refs = ray.put(cfg), ray.put(eval_grams)
        self.task = ray.remote(num_cpus=1)(_ray_call)

    def map(self, fn: Callable, calls: Iterable[tuple[Any, tuple]]) -> Iterator[tuple[Any, Any]]:
        pending: deque = deque()
        for tag, args in calls:
            pending.append((tag, self.task.remote(*self.refs, fn, args)))
            if len(pending) >= self.window:
                tag, ref = pending.popleft()
                yield tag, self.ray.get(ref)
        while pending:
            tag, ref = pending.popleft()
            yield tag, self.ray.get(ref)

    def close(self) -> None:
        """The cluster stays up: it may be the caller's, and starting a local one again costs seconds."""
