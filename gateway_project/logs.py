"""JSON-lines logging, and the filter that keeps secrets out of it.

The filter is the last line of defence, not the first: code never passes a secret
to a logger. It masks gateway keys (`sk-gw-…`, keeping the public prefix), bearer
tokens, `Authorization` values, provider-style keys (`sk-…`), credentials in URLs
and keys put in query strings, wherever they appear: the message, its arguments,
extra fields (nested dicts, lists, header tuples, bytes) and exception text.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson

REDACTED = "[redacted]"


# Replacements are functions, not `\1` templates: `re` compiles a template in Python,
# which fails while the interpreter shuts down, and a filter must never raise.
def _gateway_key(match: re.Match[str]) -> str:
    return f"sk-gw-{match.group(1)}-{REDACTED}"


def _keep_label(match: re.Match[str]) -> str:
    return match.group(1) + REDACTED


def _keep_label_at(match: re.Match[str]) -> str:
    return f"{match.group(1)}{REDACTED}@"


Replacement = Callable[[re.Match[str]], str] | str

# (pattern, replacement), applied in this order.
SECRET_PATTERNS: list[tuple[re.Pattern[str], Replacement]] = [
    # A gateway key keeps its public prefix, which is what operators look keys up by.
    (re.compile(r"sk-gw-([A-Za-z0-9]{8})-[A-Za-z0-9_\-]+"), _gateway_key),
    # Any other `sk-…` token: provider keys, and gateway keys a client mangled.
    (
        re.compile(r"\bsk-(?!gw-[A-Za-z0-9]{8}-\[redacted\])[A-Za-z0-9_\-]{12,}"),
        "sk-[redacted]",
    ),
    (
        re.compile(
            r"(?i)(\bbearer\s+)(?!sk-gw-[A-Za-z0-9]{8}-\[redacted\])[A-Za-z0-9._~+/\-]+=*"
        ),
        _keep_label,
    ),
    # An Authorization header's whole value, whatever its scheme (Basic, Bearer, …).
    (
        re.compile(
            r"(?i)((?:proxy-)?authorization[\"']?\s*[=:]\s*[\"']?)(?!\s*\[redacted\])[^\"'\r\n,;}]+"
        ),
        _keep_label,
    ),
    # Keys wrongly sent in a query string: ?key=…, &api_key=…, ?access_token=….
    (
        re.compile(
            r"(?i)([?&;](?:key|api[_-]?key|access[_-]?token|token|secret|password)=)[^&#\s\"']+"
        ),
        _keep_label,
    ),
    # `api_key: …`, `secret=…`, `"password": "…"` in free text.
    (
        re.compile(
            r"(?i)(\b(?:api[_-]?key|token|secret|password|passwd)[\"']?\s*[=:]\s*[\"']?)[^\s\"'&,;}]+"
        ),
        _keep_label,
    ),
    # user:password@ in URLs (database, Redis and broker URLs in error messages).
    (
        re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://[^:/?#\s@]*:)[^@/?#\s]+@"),
        _keep_label_at,
    ),
]

# Field and header names whose whole value is a secret, compared after
# lower-casing and turning `_` into `-`.
SECRET_FIELDS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "x-api-key",
        "api-key",
        "apikey",
        "cookie",
        "set-cookie",
        "password",
        "secret",
        "token",
        "access-token",
        "refresh-token",
    }
)
RESERVED = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
_exception_formatter = logging.Formatter()


# Every pattern above needs one of these words; text without any (most access-log
# values: ids, model names, endpoints) skips the seven substitutions.
_TRIGGER = re.compile(r"(?i)sk-|bearer|authorization|key|token|secret|passw|://")


def redact(text: str) -> str:
    """`text` with every secret it contains masked; idempotent."""
    if not _TRIGGER.search(text):
        return text
    for pattern, replacement in SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _is_secret_field(name: object) -> bool:
    if isinstance(name, bytes):
        name = name.decode("latin-1")
    return isinstance(name, str) and name.lower().replace("_", "-") in SECRET_FIELDS


def _redact_value(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, bytes | bytearray):
        return redact(bytes(value).decode("latin-1"))
    if isinstance(value, dict):
        return {
            (redact(k) if isinstance(k, str) else k): (
                REDACTED if _is_secret_field(k) else _redact_value(v)
            )
            for k, v in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        # A (name, value) pair is a header: ASGI scopes and httpx carry them so.
        if len(value) == 2 and isinstance(value, tuple) and _is_secret_field(value[0]):
            return [_redact_value(value[0]), REDACTED]
        return [_redact_value(v) for v in value]
    # Anything else is logged as its str(): keep the object unless that shows a secret.
    text = str(value)
    masked = redact(text)
    return masked if masked != text else value


class RedactSecretsFilter(logging.Filter):
    """Masks secrets in a record in place, before any formatter sees it."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            self._redact(record)
        except Exception as exc:  # Never raise from logging, and never leak instead.
            _withhold(record, exc)
        return True

    def _redact(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # Bad %-args: log what we have rather than nothing.
            message = f"{record.msg} {record.args!r}"
        record.msg, record.args = redact(message), None
        for name, value in list(vars(record).items()):
            if name not in RESERVED:
                masked = REDACTED if _is_secret_field(name) else _redact_value(value)
                setattr(record, name, masked)
        if record.exc_info and not record.exc_text:
            record.exc_text = _exception_formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)


def _withhold(record: logging.LogRecord, exc: Exception) -> None:
    """What a record says when it could not be redacted: where it came from, no more."""
    for name in [n for n in vars(record) if n not in RESERVED]:
        delattr(record, name)
    record.msg = f"log record withheld: redaction failed ({type(exc).__name__})"
    record.args = record.exc_info = record.exc_text = record.stack_info = None


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, then the extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, tz=UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in vars(record).items():
            if name not in RESERVED and not name.startswith("_"):
                entry.setdefault(name, value)  # An extra never hides a core field.
        if record.exc_info or record.exc_text:
            text = record.exc_text or self.formatException(record.exc_info)
            entry["exception"] = redact(text)
        if record.stack_info:
            entry["stack"] = redact(record.stack_info)
        return orjson.dumps(entry, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
