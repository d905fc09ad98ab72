"""Cost of a request: integers of tokens times Decimal prices, rounded once.

Prices are USD per million tokens. `cached_tokens` are a part of `prompt_tokens`
(as OpenAI reports them) and cost the cached-input price; the rest of the prompt
costs the input price. The result keeps 10 decimal places, rounded half-even once.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_HALF_EVEN, Decimal

MILLION = Decimal(1_000_000)
COST_QUANTUM = Decimal("0.0000000001")


@dataclass(frozen=True, slots=True)
class PriceInfo:
    id: int
    model: str
    input: Decimal
    output: Decimal
    cached_input: Decimal | None
    effective_from: datetime

    @property
    def is_free(self) -> bool:
        return self.input == 0 and self.output == 0 and not self.cached_input


def cost_usd(
    price: PriceInfo,
    *,
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int = 0,
) -> Decimal:
    cached = min(max(cached_tokens, 0), prompt_tokens)
    cached_rate = price.input if price.cached_input is None else price.cached_input
    micro = (
        (prompt_tokens - cached) * price.input
        + cached * cached_rate
        + completion_tokens * price.output
    )
    return (micro / MILLION).quantize(COST_QUANTUM, rounding=ROUND_HALF_EVEN)


def price_at(prices: tuple[PriceInfo, ...], when: datetime) -> PriceInfo | None:
    """The price in force at `when`, from one model's prices sorted newest first."""
    for price in prices:
        if price.effective_from <= when:
            return price
    return None
