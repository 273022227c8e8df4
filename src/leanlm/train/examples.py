"""Training examples: plain domain text cut into fixed-length sequences (loss on every token), or
chat JSONL (`messages` rendered with the model's chat template, loss on the assistant's tokens only).

Every example is `seq_len` tokens (padded, attention-masked, labels -100 where no loss is taken), so
micro-batches stack without collation and the global batch is the same whatever the process count.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from leanlm.data.corpus import make_windows, read_text, render_chat, tokenize
from leanlm.errors import ConfigError, DataError

log = logging.getLogger(__name__)
IGNORE = -100


@dataclass
class Examples:
    input_ids: torch.Tensor  # [n, seq_len]
    labels: torch.Tensor  # [n, seq_len], IGNORE where no loss is taken
    attention_mask: torch.Tensor  # [n, seq_len]
    example_id: torch.Tensor | None = None  # [n], position in the full set, kept through split (cache keys)

    def __post_init__(self) -> None:
        if self.example_id is None:
            self.example_id = torch.arange(len(self))

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def take(self, index) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[index], "labels": self.labels[index],
                "attention_mask": self.attention_mask[index], "example_id": self.example_id[index]}

    def split(self, fraction: float) -> tuple["Examples", "Examples"]:
        """(train, validation): the last `fraction` of examples held out, at least one."""
        cut = len(self) - max(1, int(len(self) * fraction))
        if cut < 1:
            raise DataError(f"{len(self)} examples are too few to hold some out for validation; give more data")
        head, tail = slice(0, cut), slice(cut, None)
        return (Examples(**{k: v[head] for k, v in vars(self).items()}),
                Examples(**{k: v[tail] for k, v in vars(self).items()}))


def text_examples(tokenizer: Any, text: str, seq_len: int) -> Examples:
    windows = make_windows(tokenize(tokenizer, text), seq_len)
    return Examples(windows, windows.clone(), torch.ones_like(windows))


def is_chat_file(path: str | Path) -> bool:
    """A .jsonl file whose first record has `messages`."""
    path = Path(path)
    if path.suffix != ".jsonl" or not path.is_file():
        return False
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                try:
                    return "messages" in json.loads(line)
                except json.JSONDecodeError:
                    return False
    return False


def chat_examples(tokenizer: Any, path: str | Path, seq_len: int,
                  too_long: Literal["truncate", "refuse"] = "truncate") -> Examples:
    path = Path(path)
    rows, truncated = [], 0
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: malformed JSON ({err.msg} at column {err.colno})") from err
            ids, labels = chat_tokens(tokenizer, record.get("messages") if isinstance(record, dict) else None, where)
            if len(ids) > seq_len:
                if too_long == "refuse":
                    raise DataError(f"{where}: {len(ids)} tokens, longer than seq_len {seq_len}; raise seq_len or "
                                    "set too_long: truncate")
                ids, labels, truncated = ids[:seq_len], labels[:seq_len], truncated + 1
            rows.append((ids, labels))
    if not rows:
        raise DataError(f"{path}: no chat records")
    if truncated:
        log.warning("%s: %d of %d conversations were longer than %d tokens and were truncated",
                    path, truncated, len(rows), seq_len)
    return _pad(rows, seq_len, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)


def chat_tokens(tokenizer: Any, messages: Any, where: str) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and labels that keep only the assistant turns."""
    text = render_chat(messages, tokenizer, where)
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: conversation has no assistant turn, so there is nothing to learn from")
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        end = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not text.startswith(end) or not end.startswith(start):
            raise DataError(f"{where}: the chat template does not render turns as prefixes of the conversation; "
                            "assistant tokens cannot be located")
        spans.append((len(start), len(end)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [tok if any(a <= s < b for a, b in spans) else IGNORE
              for tok, (s, _) in zip(enc["input_ids"], enc["offset_mapping"])]
    return enc["input_ids"], labels


def _pad(rows: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int) -> Examples:
    n = len(rows)
    ids = torch.full((n, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((n, seq_len), IGNORE, dtype=torch.long)
    mask = torch.zeros((n, seq_len), dtype=torch.long)
    for i, (tok, lab) in enumerate(rows):
        ids[i, : len(tok)] = torch.tensor(tok)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(tok)] = 1
    return Examples(ids, labels, mask)


def training_examples(tokenizer: Any, data: str | None, seq_len: int, default_text: str | None,
                      too_long: Literal["truncate", "refuse"] = "truncate") -> Examples:
    """Examples from `data` (a chat JSONL trains on assistant turns; other files as plain text), or else
    from `default_text` (the run's training split)."""
    if data and is_chat_file(data):
        return chat_examples(tokenizer, data, seq_len, too_long)
    text = read_text(data, tokenizer) if data else default_text
    if text is None:
        raise ConfigError("training needs data: set the config's 'data' (a file), pass text=..., or run the step "
                          "inside `leanlm optimize`")
    if not isinstance(text, str):
        raise ConfigError(f"the training text must be a str, got {type(text).__name__}")
    return text_examples(tokenizer, text, seq_len)
