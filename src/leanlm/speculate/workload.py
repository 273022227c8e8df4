"""Prompts for measuring speculation, built from a corpus's held-out split (the default corpus unless given).

`grounded`: summarize, extract from or quote a passage, the input-grounded work prompt lookup is for
(the article's example: summaries of patient notes and articles). `chat`: open-ended questions about
the passages' subjects, where nothing is there to copy and only a draft model can guess ahead.
A JSONL file of {"messages": [...]} or {"prompt": "..."} records is the team's own workload.
"""

from __future__ import annotations

import json
from pathlib import Path

from leanlm.errors import DataError

TASKS = (
    "Summarize the following passage in three sentences.",
    "List every keyword, function and method name the following passage mentions, one per line, "
    "each with the sentence that mentions it.",
    "Quote the first three sentences of the following passage exactly as written.",
)
QUESTIONS = (
    "Explain to a beginner what {subject} means in Python, with a short example.",
    "What are common mistakes people make with {subject} in Python, and how do they avoid them?",
    "Write a short tutorial paragraph about {subject} for a Python course.",
)
WORKLOADS = ("grounded", "chat")


def passages(text: str, count: int, chars: int = 1200) -> list[str]:
    """`count` passages of about `chars` characters, cut at paragraph breaks, spread over `text`."""
    paragraphs = [p.strip() for p in text.split("\n\n") if len(p.strip()) > 80]
    out, current = [], ""
    for paragraph in paragraphs:
        current = f"{current}\n\n{paragraph}" if current else paragraph
        if len(current) >= chars:
            out.append(current[: chars * 2])
            current = ""
    if len(out) < count:
        raise DataError(f"the text gives {len(out)} passages of {chars} characters, fewer than the {count} asked for; "
                        "use a larger corpus or fewer prompts")
    step = len(out) / count
    return [out[int(i * step)] for i in range(count)]


def _subject(passage: str) -> str:
    words = [w.strip('"*`().,:') for w in passage.split()[:40]]
    quoted = [w for w in words if w.isidentifier() and w.lower() not in {"the", "a", "an", "and", "of", "in"}]
    return " ".join(quoted[:3]) or "this feature"


def build_prompts(kind: str, tokenizer, text: str, count: int) -> list[str]:
    """Chat-template-rendered prompts of a built-in workload kind."""
    return [_render(tokenizer, [{"role": "user", "content": c}]) for c in prompt_contents(kind, text, count)]


def prompt_contents(kind: str, text: str, count: int) -> list[str]:
    """The user messages of a built-in workload kind (what a client sends a server)."""
    if kind not in WORKLOADS:
        raise DataError(f"unknown workload {kind!r}; use one of {', '.join(WORKLOADS)} or a .jsonl file of prompts")
    chunks = passages(text, count)
    if kind == "grounded":
        return [f"{TASKS[i % len(TASKS)]}\n\n{p}" for i, p in enumerate(chunks)]
    return [QUESTIONS[i % len(QUESTIONS)].format(subject=_subject(p)) for i, p in enumerate(chunks)]


def read_prompts(path: str | Path, tokenizer) -> list[str]:
    """A JSONL file's prompts: chat `messages` rendered with the model's template, or raw `prompt` text."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such prompts file (JSONL, one {{\"messages\": [...]}} or {{\"prompt\": ...}} a line)")
    prompts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not JSON ({e.msg})") from None
        if isinstance(record, dict) and isinstance(record.get("messages"), list):
            prompts.append(_render(tokenizer, record["messages"]))
        elif isinstance(record, dict) and isinstance(record.get("prompt"), str):
            prompts.append(record["prompt"])
        else:
            raise DataError(f"{path}:{n}: a record needs \"messages\" (a list) or \"prompt\" (a string)")
    if not prompts:
        raise DataError(f"{path}: no prompts in the file")
    return prompts


def _render(tokenizer, messages: list[dict]) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n\n".join(str(m.get("content", "")) for m in messages) + "\n\n"
