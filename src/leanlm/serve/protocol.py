"""The requests leanlm serve accepts, as strict types: a field it does not implement is refused by name,
never ignored, and every bound (n, stop strings, temperature, max_tokens) is checked with a message
that says what is allowed."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from leanlm.serve.errors import APIError

MAX_STOP = 4  # as OpenAI's API
MAX_STOP_CHARS = 256
MAX_TOP_LOGPROBS = 20

# fields clients send that change nothing when left at these values; any other value is refused
NEUTRAL = {"frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {}, "response_format": {"type": "text"},
           "parallel_tool_calls": None, "tool_choice": "none", "store": False, "service_tier": "auto",
           "metadata": None}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class Message(_Strict):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class _Sampling(_Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None

    def stop_list(self) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > MAX_STOP:
            raise APIError(400, f"stop has {len(stop)} strings; at most {MAX_STOP} are allowed", param="stop")
        if any(len(s) > MAX_STOP_CHARS for s in stop):
            raise APIError(400, f"a stop string is longer than {MAX_STOP_CHARS} characters", param="stop")
        return stop


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: Literal[False] = False

    def token_limit(self) -> int | None:
        return self.max_tokens


def parse_request(kind: type[_Sampling], raw: bytes) -> _Sampling:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise APIError(400, f"the request body is not valid UTF-8 (byte {err.start})") from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError as err:
        raise APIError(400, f"the request body is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, not {type(body).__name__}")
    for key, neutral in NEUTRAL.items():
        if key in body and body[key] == neutral:
            body.pop(key)
    try:
        return kind.model_validate(body)
    except ValidationError as err:
        raise APIError(400, describe(err, kind), param=_loc(err.errors()[0])) from None


def describe(err: ValidationError, kind: type[BaseModel]) -> str:
    problems = []
    for e in err.errors()[:5]:
        where = _loc(e)
        if e["type"] == "extra_forbidden":
            top = e["loc"][0] if e["loc"] else where
            if len(e["loc"]) == 1:
                problems.append(f"{where}: leanlm serve does not implement this field; the fields it takes are "
                                + ", ".join(sorted(kind.model_fields)))
            else:
                problems.append(f"{where}: unknown field (in {top})")
        elif e["type"] == "missing":
            problems.append(f"{where}: required")
        else:
            problems.append(f"{where}: {e['msg']} (got {json.dumps(e.get('input'), default=str)[:80]})")
    return "; ".join(problems)


def _loc(e: dict) -> str:
    parts = []
    for p in e["loc"]:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        elif p in ("str", "list[str]", "list[int]", "list[dict[str,any]]", "function-after[...]"):
            continue  # the union member pydantic tried, not a field
        else:
            parts.append(("." if parts else "") + str(p))
    return "".join(parts) or "body"
