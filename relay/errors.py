"""Relay errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

Each subclass carries the status and code of SPEC.md's table; raising one anywhere
in the relay ends the request with that answer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson

if TYPE_CHECKING:
    from relay.catalog import Candidate


class RelayError(Exception):
    status = 500
    code = "internal_error"
    type = "api_error"
    # The upstream candidate last tried, when the error came from forwarding.
    candidate: Candidate | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.extra_headers = headers or {}

    def body(self) -> bytes:
        return error_body(
            self.message, type=self.type, code=self.code, param=self.param
        )


def error_body(
    message: str, *, type: str, code: str | None, param: str | None
) -> bytes:
    payload = {
        "error": {"message": message, "type": type, "param": param, "code": code}
    }
    return orjson.dumps(payload)


class InvalidRequest(RelayError):
    status, code, type = 400, "invalid_request_error", "invalid_request_error"


class InvalidApiKey(RelayError):
    status, code, type = 401, "invalid_api_key", "invalid_request_error"


class PermissionDenied(RelayError):
    status, code, type = 403, "permission_denied", "invalid_request_error"


class ModelNotPriced(RelayError):
    status, code, type = 403, "model_not_priced", "invalid_request_error"


class ModelNotFound(RelayError):
    status, code, type = 404, "model_not_found", "invalid_request_error"


class NotFound(RelayError):
    status, code, type = 404, "not_found", "invalid_request_error"


class MethodNotAllowed(RelayError):
    status, code, type = 405, "method_not_allowed", "invalid_request_error"


class PayloadTooLarge(RelayError):
    status, code, type = 413, "request_too_large", "invalid_request_error"


class RateLimitExceeded(RelayError):
    status, code, type = 429, "rate_limit_exceeded", "requests"


class InsufficientQuota(RelayError):
    status, code, type = 429, "insufficient_quota", "insufficient_quota"


class QuotaUnavailable(RelayError):
    status, code, type = 503, "quota_unavailable", "api_error"


class UpstreamError(RelayError):
    status, code, type = 502, "upstream_error", "api_error"


class UpstreamTimeout(RelayError):
    status, code, type = 504, "upstream_timeout", "api_error"
