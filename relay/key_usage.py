"""GET /v1/usage: the calling key's own quotas, their current use, and its spend
this billing month, so an app can show its budget without admin rights.

Not the hot path: it reads the database (a few indexed aggregates through
`keys.selectors`), off the event loop via `database_sync_to_async`. Like every
authenticated request, the call itself is metered as a usage row.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from channels.db import database_sync_to_async
from django.utils import timezone

from keys.selectors import (
    KeyInfo,
    QuotaUse,
    billing_month_start,
    key_spend,
    quota_usage,
    quota_window,
)
from relay import errors
from relay.consumers import RelayConsumer


class KeyUsageConsumer(RelayConsumer):
    endpoint = "usage"

    async def handle(self, body: bytes) -> None:
        if self.scope["method"] not in {"GET", "HEAD"}:
            raise errors.MethodNotAllowed("Use GET.", headers={"allow": "GET"})
        assert self.call.key is not None
        report = await database_sync_to_async(usage_report)(
            self.call.key, timezone.now()
        )
        await self.send_json(200, report)


def usage_report(key: KeyInfo, now: datetime) -> dict[str, Any]:
    """The JSON answer of /v1/usage for one key at `now`."""
    month_start = billing_month_start(now)
    month_end = quota_window("month", now)[1]
    spent = key_spend(key_id=key.id, since=month_start)
    return {
        "object": "key.usage",
        "key": {
            "id": key.id,
            "name": key.name,
            "prefix": key.prefix,
            "team": key.team_id,
            "expires_at": _moment(key.expires_at),
            # Set while an old secret is inside its rotation grace period.
            "valid_until": _moment(key.valid_until),
        },
        "period": {
            "name": "month",
            "start": _moment(month_start),
            "end": _moment(month_end),
        },
        "spend_usd": _money(spent.cost_usd),
        "requests": spent.requests,
        "tokens": spent.tokens,
        "quotas": [
            _quota(use)
            for use in quota_usage(key_id=key.id, team_id=key.team_id, now=now)
        ],
    }


def _quota(use: QuotaUse) -> dict[str, Any]:
    return {
        "scope": use.scope,
        "metric": use.metric,
        "period": use.period,
        "limit": _number(use.limit),
        "used": _number(use.used),
        "remaining": _number(use.remaining),
        "window_start": _moment(use.window_start),
        "resets_at": _moment(use.resets_at),
    }


def _money(value: Decimal) -> str:
    """USD as a Decimal string with the ledger's 10 places."""
    return f"{value.quantize(Decimal('1e-10')):f}"


def _number(value: Decimal) -> str:
    """Limits and use as Decimal strings without trailing zeros (`60`, `0.25`)."""
    return format(value.normalize(), "f") if value else "0"


def _moment(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None
