"""`leanlm serve --compress-context N`: a prompt longer than N tokens is compressed to about N before the
model sees it (leanlm.prompt's compression, scored by the served model itself).

In a chat, the last user message is the question and every earlier message is context: each context message
gives up tokens in proportion to its length, and the compression keeps what the question asks about. With
no earlier message, or in /v1/completions, the whole prompt is compressed with no question. A prompt within
N tokens passes untouched, byte for byte."""

from __future__ import annotations

import logging
import threading

from leanlm.serve.errors import APIError
from leanlm.serve.text import render_chat

log = logging.getLogger(__name__)

_MIN_MESSAGE = 16  # context messages shorter than this are left alone: too little to drop from


class ContextCompressor:
    def __init__(self, loaded, limit: int):
        self.loaded, self.limit = loaded, limit
        self.tokenizer = loaded.tokenizer
        # one compression at a time: each is a forward pass over the whole context, and two at once would
        # only share the cores (the engine's decode steps run beside it in their own thread)
        self._lock = threading.Lock()

    def count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def chat(self, messages: list[dict], model_name: str) -> tuple[list[dict], dict | None]:
        """(messages to render, {"before", "after"} prompt tokens or None when nothing was compressed)."""
        before = self.count(render_chat(self.tokenizer, messages, model_name))
        if before <= self.limit:
            return messages, None
        last = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=len(messages) - 1)
        context = [i for i, m in enumerate(messages) if i != last and self.count(m["content"]) >= _MIN_MESSAGE]
        question = messages[last]["content"] if context else None
        targets = context or [last]
        sizes = {i: self.count(messages[i]["content"]) for i in targets}
        fixed = before - sum(sizes.values())  # the template, the question and the short messages
        room = self.limit - fixed
        if room < len(targets):
            raise APIError(400, f"--compress-context {self.limit}: the prompt is {before} tokens and {fixed} of them "
                                "are not context that can be compressed (the question, the template, short "
                                "messages); shorten the question or raise the server's --compress-context",
                           param="messages", code="context_length_exceeded")
        out = [dict(m) for m in messages]
        total = sum(sizes.values())
        for i in targets:
            budget = max(1, int(sizes[i] * room / total))
            if budget < sizes[i]:
                out[i]["content"] = self._compress(messages[i]["content"], budget, question)
        after = self.count(render_chat(self.tokenizer, out, model_name))
        return out, {"before": before, "after": after}

    def text(self, prompt: str) -> tuple[str, dict | None]:
        before = self.count(prompt)
        if before <= self.limit:
            return prompt, None
        out = self._compress(prompt, self.limit, None)
        return out, {"before": before, "after": self.count(out)}

    def _compress(self, text: str, budget: int, question: str | None) -> str:
        from leanlm.prompt import compress

        with self._lock:
            result = compress(text, budget, question=question, model=self.loaded)
        for warning in result.warnings:
            log.warning("--compress-context: %s", warning)
        return result.text
