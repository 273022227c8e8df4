"""Text data: the embedded default corpus, user files, splits, eval windows and calibration samples.

Supported inputs: `.txt` (the whole file is one text), `.jsonl` (one JSON object per line with a
`text` field, or chat `messages` rendered with the model's chat template), `.parquet` (a `text`
or `messages` column) and directories holding such files. Errors name the file and line.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from leanlm.errors import DataError

log = logging.getLogger(__name__)

SUFFIXES = (".txt", ".jsonl", ".parquet")
TRAIN_FRACTION = 0.9
DEFAULT_CORPUS = "pydoc"


@dataclass
class Corpus:
    name: str
    train: str
    eval: str


def default_corpus() -> Corpus:
    """Python's own documentation, shipped with the standard library: always there."""
    from pydoc_data import topics

    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    return split_text(text, "pydoc_data.topics")


def split_text(text: str, name: str) -> Corpus:
    cut = int(len(text) * TRAIN_FRACTION)
    return Corpus(name=name, train=text[:cut], eval=text[cut:])


def load_corpus(source: str | Path | None, tokenizer: Any = None) -> Corpus:
    """The default corpus for None, else the user's data split 90% train / 10% eval by characters."""
    if source is None or str(source) == DEFAULT_CORPUS:
        return default_corpus()
    return split_text(read_text(source, tokenizer), str(source))


def read_text(source: str | Path, tokenizer: Any = None) -> str:
    """All texts of a file or directory joined by blank lines."""
    return "\n\n".join(load_texts(source, tokenizer))


def data_files(source: str | Path) -> list[Path]:
    """The files a data path stands for, refused (before anything is read) when missing or of an unknown type."""
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"data path {path} does not exist (use {DEFAULT_CORPUS!r} for the built-in corpus)")
    files = sorted(f for f in path.rglob("*") if f.suffix in SUFFIXES) if path.is_dir() else [path]
    if not files:
        raise DataError(f"directory {path} holds no {', '.join(SUFFIXES)} files")
    for f in files:
        if f.suffix not in _LOADERS:
            raise DataError(f"{f}: unsupported data file type {f.suffix!r}; use one of {', '.join(SUFFIXES)}")
    return files


def load_texts(source: str | Path, tokenizer: Any = None) -> list[str]:
    texts = []
    for f in data_files(source):
        got = _LOADERS[f.suffix](f, tokenizer)
        if not got or not any(t.strip() for t in got):
            raise DataError(f"{f}: file holds no text")
        texts.extend(got)
    return texts


def _load_txt(path: Path, tokenizer: Any) -> list[str]:
    try:
        return [path.read_text(encoding="utf-8")]
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 text ({err.reason})") from err


def _load_jsonl(path: Path, tokenizer: Any) -> list[str]:
    texts = []
    with open(path, encoding="utf-8", errors="strict") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: malformed JSON ({err.msg} at column {err.colno})") from err
            texts.append(record_text(record, tokenizer, f"{path}:{lineno}"))
    return texts


def _load_parquet(path: Path, tokenizer: Any) -> list[str]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several unrelated types for corrupt files
        raise DataError(f"{path}: not a readable parquet file ({err})") from err
    rows = table.to_pylist()
    return [record_text(r, tokenizer, f"{path}: row {i + 1}") for i, r in enumerate(rows)]


_LOADERS = {".txt": _load_txt, ".jsonl": _load_jsonl, ".parquet": _load_parquet}


def record_text(record: Any, tokenizer: Any, where: str) -> str:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with a 'text' or 'messages' field, got {type(record).__name__}")
    if isinstance(record.get("text"), str):
        return record["text"]
    if "messages" in record:
        return render_chat(record["messages"], tokenizer, where)
    raise DataError(f"{where}: record has neither a 'text' string nor 'messages' (fields: {sorted(record)})")


def render_chat(messages: Any, tokenizer: Any, where: str) -> str:
    ok = isinstance(messages, list) and messages and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    )
    if not ok:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role': str, 'content': str}} objects")
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: chat 'messages' need a tokenizer with a chat template, and this model has none")
    return tokenizer.apply_chat_template(messages, tokenize=False)


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """The whole text as one token sequence, without special tokens (as the eval windows need)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def make_windows(ids: torch.Tensor, length: int) -> torch.Tensor:
    """Non-overlapping windows of `length` tokens; the tail shorter than a window is dropped."""
    if length < 2:
        raise DataError(f"window length must be at least 2 tokens, got {length}")
    count = len(ids) // length
    if count == 0:
        raise DataError(f"the text has {len(ids)} tokens, fewer than one {length}-token window; give more text or a shorter window")
    return ids[: count * length].view(count, length)


def calibration_samples(tokenizer: Any, text: str, samples: int, length: int, seed: int = 0) -> torch.Tensor:
    """`samples` windows of `length` tokens at random offsets of the text, reproducible by `seed`."""
    if samples < 1 or length < 2:
        raise DataError(f"calibration needs samples >= 1 and length >= 2, got {samples} x {length}")
    ids = tokenize(tokenizer, text)
    if len(ids) < length:
        raise DataError(f"calibration text has {len(ids)} tokens, shorter than the requested sample length {length}")
    if samples * length > len(ids):
        # random offsets then overlap: the statistics come from fewer distinct tokens than the recipe says
        log.warning("calibration text has %d tokens but %d x %d were asked for: the samples overlap (each token "
                    "is seen about %.1f times); give more data or fewer calibration samples",
                    len(ids), samples, length, samples * length / len(ids))
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - length + 1, (samples,), generator=gen)
    return torch.stack([ids[s : s + length] for s in starts.tolist()])
