"""Errors as OpenAI's API returns them: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

from __future__ import annotations

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         408: "timeout_error", 413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
         503: "service_unavailable_error", 504: "timeout_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}
