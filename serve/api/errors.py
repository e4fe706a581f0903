"""OpenAI-style errors: every bad request gets a 4xx with ``{"error": {"message", "type", "param", "code"}}``."""
from __future__ import annotations

from fastapi.responses import JSONResponse

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
         409: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
         503: "service_unavailable"}


class ApiError(Exception):
    """An HTTP error with an OpenAI-style body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, param=self.param, code=self.code, headers=self.headers)


def error_response(status: int, message: str, *, param=None, code=None, headers=None) -> JSONResponse:
    body = {"error": {"message": message, "type": TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code if code is not None else status}}
    return JSONResponse(body, status_code=status, headers=headers)
