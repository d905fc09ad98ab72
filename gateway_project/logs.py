"""JSON-lines logging, and the filter that keeps secrets out of it.

The filter is the last line of defence, not the first: code never passes a secret
to a logger. It masks gateway keys (`sk-gw-…`), other bearer tokens and
provider-style keys wherever they appear in a message or an extra field.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime
from typing import Any

SECRET_PATTERNS = [
    re.compile(r"sk-gw-([A-Za-z0-9]{8})-[A-Za-z0-9_\-]+"),
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/\-]+=*"),
    re.compile(r"\bsk-(?!gw-)[A-Za-z0-9_\-]{16,}"),
    re.compile(
        r"(?i)((?:api[_-]?key|authorization|token|secret)[\"']?\s*[=:]\s*[\"']?)[^\s\"'&,}]+"
    ),
]
RESERVED = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def redact(text: str) -> str:
    text = SECRET_PATTERNS[0].sub(r"sk-gw-\1-[redacted]", text)
    text = SECRET_PATTERNS[1].sub(r"\1[redacted]", text)
    text = SECRET_PATTERNS[2].sub("sk-[redacted]", text)
    return SECRET_PATTERNS[3].sub(r"\1[redacted]", text)


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_value(v) for v in value]
    return value


class RedactSecretsFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.args:
            record.msg = record.getMessage()
            record.args = None
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        for name, value in list(vars(record).items()):
            if name not in RESERVED:
                setattr(record, name, _redact_value(value))
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, tz=UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in vars(record).items():
            if name not in RESERVED and not name.startswith("_"):
                entry[name] = value
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, default=str)
