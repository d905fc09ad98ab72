"""What one relay request measured, and how it becomes a usage row and a log line."""

from __future__ import annotations

import logging
import random
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from django.utils import timezone

from keys.selectors import KeyInfo
from relay.catalog import Candidate, Catalog
from usage import metrics
from usage.models import UsageRow
from usage.pricing import cost_usd, price_at
from usage.recorder import recorder

access_log = logging.getLogger("gateway.access")
Source = UsageRow.Source


def _row_id() -> uuid.UUID:
    # Random, not secret: Python's generator is reseeded from the OS at start and
    # after fork, and 122 random bits keep ids unique across every process.
    return uuid.UUID(int=random.getrandbits(128), version=4)


@dataclass
class Call:
    endpoint: str
    request_id: str
    started: float = field(default_factory=time.perf_counter)
    created_at: datetime = field(default_factory=timezone.now)
    row_id: uuid.UUID = field(default_factory=_row_id)
    key: KeyInfo | None = None
    model: str = ""
    stream: bool = False
    user: str = ""
    tags: list[str] = field(default_factory=list)
    candidate: Candidate | None = None
    status: int = 200
    error_code: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    usage_source: str = Source.NONE
    upstream_wait_s: float = 0.0
    ttft_ms: int | None = None
    client_disconnected: bool = False

    def overhead_ms(self) -> float:
        return max(
            0.0, (time.perf_counter() - self.started - self.upstream_wait_s) * 1000
        )

    def mark_first_byte(self) -> None:
        if self.ttft_ms is None:
            self.ttft_ms = int((time.perf_counter() - self.started) * 1000)

    def take_usage(
        self, usage: dict[str, Any] | None, *, partial: bool = False
    ) -> bool:
        """Adopt the provider's usage numbers; False when it reported none."""
        if not isinstance(usage, dict):
            return False
        prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
        completion = usage.get("completion_tokens", usage.get("output_tokens", 0))
        if not isinstance(prompt, int):
            return False
        details = usage.get("prompt_tokens_details") or usage.get(
            "input_tokens_details"
        )
        cached = details.get("cached_tokens", 0) if isinstance(details, dict) else 0
        self.prompt_tokens = max(prompt, 0)
        self.completion_tokens = max(
            completion if isinstance(completion, int) else 0, 0
        )
        self.cached_tokens = min(
            max(cached if isinstance(cached, int) else 0, 0), prompt
        )
        self.usage_source = Source.PROVIDER_PARTIAL if partial else Source.PROVIDER
        return True


def priced(call: Call, catalog: Catalog | None) -> tuple[Decimal | None, int | None]:
    """The row's cost and price id; None cost means tokens without a known price."""
    price = None
    if call.candidate is not None and catalog is not None:
        price = price_at(catalog.prices_for(call.candidate), call.created_at)
    if price is not None:
        tokens = {
            "prompt_tokens": call.prompt_tokens,
            "completion_tokens": call.completion_tokens,
            "cached_tokens": call.cached_tokens,
        }
        return cost_usd(price, **tokens), price.id
    if call.prompt_tokens or call.completion_tokens:
        return None, None
    return Decimal(0), None


def finish(call: Call, catalog: Catalog | None) -> Decimal | None:
    """Record the row (authenticated requests only), count metrics, log the line.

    Returns the row's cost (None: unpriced).
    """
    latency_ms = int((time.perf_counter() - call.started) * 1000)
    cost, price_id = priced(call, catalog)
    if call.key is not None:
        recorder.record(
            {
                "id": call.row_id,
                "request_id": call.request_id,
                "created_at": call.created_at,
                "key_id": call.key.id,
                "key_prefix": call.key.prefix,
                "team_id": call.key.team_id,
                "user": call.user[:200],
                "endpoint": call.endpoint,
                "model": call.model[:200],
                "upstream_model": call.candidate.upstream_model
                if call.candidate
                else "",
                "provider": call.candidate.provider.name if call.candidate else "",
                "status_code": call.status,
                "error_code": call.error_code,
                "stream": call.stream,
                "prompt_tokens": call.prompt_tokens,
                "completion_tokens": call.completion_tokens,
                "cached_tokens": call.cached_tokens,
                "usage_source": call.usage_source,
                "cost_usd": cost,
                "price_id": price_id,
                "latency_ms": latency_ms,
                "ttft_ms": call.ttft_ms,
                "client_disconnected": call.client_disconnected,
                "cache_hit": False,
                "tags": call.tags,
            }
        )
    metrics.observe_request(
        # Only routed names label metrics: a client's made-up names must not
        # grow the label set without bound.
        model=call.candidate.public_name if call.candidate else "",
        status=call.status,
        prompt_tokens=call.prompt_tokens,
        completion_tokens=call.completion_tokens,
        cost=cost,
        upstream_s=call.upstream_wait_s if call.candidate else None,
        ttft_ms=call.ttft_ms,
    )
    access_log.info(
        "request",
        extra={
            "request_id": call.request_id,
            "key_prefix": call.key.prefix if call.key else None,
            "endpoint": call.endpoint,
            "model": call.model,
            "status": call.status,
            "error_code": call.error_code or None,
            "stream": call.stream,
            "prompt_tokens": call.prompt_tokens,
            "completion_tokens": call.completion_tokens,
            "cost_usd": str(cost) if cost is not None else None,
            "duration_ms": latency_ms,
            "client_disconnected": call.client_disconnected,
        },
    )
    return cost
