"""From tokens to what a client reads: chat messages rendered with the model's own template, text decoded
incrementally (never splitting a UTF-8 character), and stop strings found across token boundaries."""

from __future__ import annotations

from leanlm.serve.errors import APIError


def render_chat(tokenizer, messages: list[dict], model_name: str) -> str:
    """The prompt the model was trained to see for `messages`, ending where the assistant's turn starts."""
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, f"model {model_name!r} has no chat template, so chat messages cannot be rendered for it; "
                            "send the prompt as text to /v1/completions", param="messages")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as err:  # the template's own raise_exception (an unknown role, say) or a jinja error
        raise APIError(400, f"the model's chat template cannot render these messages: {err}", param="messages") from None


def message_text(content, index: int) -> str:
    """A message's content as text: a string, or a list of text parts (the only kind a text model reads)."""
    if isinstance(content, str):
        return content
    parts = []
    for j, part in enumerate(content):
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise APIError(400, f"messages[{index}].content[{j}] is of type {part.get('type')!r}; this model reads "
                                "only text parts ({\"type\": \"text\", \"text\": ...})", param=f"messages[{index}].content")
        parts.append(part["text"])
    return "".join(parts)


class TextStream:
    """Token ids in, text deltas out. Decoding only a short window of recent tokens keeps each step O(1);
    text that could be the start of a stop string is held back until it is known not to be one."""

    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.longest = max((len(s) for s in self.stop), default=0)
        self.ids: list[int] = []
        self.prefix = self.read = 0
        self.text = ""  # everything decoded so far
        self.sent = 0  # characters of self.text given out
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one generated token; the text it makes safe to send (possibly empty). Sets `stopped` when
        a stop string appears; the text is then cut before it."""
        if self.stopped:
            return ""
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        after = self.tokenizer.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):  # "\ufffd": a character still incomplete
            self.text += after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
        if not self.stop:
            return self._release(len(self.text))
        hit = self._find_stop()
        if hit is not None:
            self.stopped = True
            self.text = self.text[:hit]
            return self._release(hit)
        return self._release(len(self.text) - self._held_back())

    def flush(self) -> str:
        """At the end of generation: whatever was held back."""
        return self._release(len(self.text))

    def _find_stop(self) -> int | None:
        start = max(0, self.sent - self.longest)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _held_back(self) -> int:
        """Length of the longest tail of the text that begins some stop string."""
        tail = self.text[-self.longest:] if self.longest else ""
        for k in range(min(len(tail), self.longest), 0, -1):
            end = tail[-k:]
            if any(s.startswith(end) for s in self.stop):
                return k
        return 0

    def _release(self, upto: int) -> str:
        upto = max(upto, self.sent)
        delta, self.sent = self.text[self.sent:upto], upto
        return delta
