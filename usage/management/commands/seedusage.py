"""`python manage.py seedusage`: synthetic usage for demos and the reports benchmark.

Creates teams, keys and priced models named `seed-…` (reused when they exist),
then writes usage rows through the ledger's own bulk writer, costed with the
price in force at each row's time. Deterministic for a given `--seed`. Never
run it on a production database: the rows are indistinguishable from real ones
except by their keys' names.
"""

# Synthetic data: `random` is what it needs, not a secrets generator.
# ruff: noqa: S311

from __future__ import annotations

import random
import time
import uuid
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from keys.models import ApiKey, Team
from keys.services import issue_key, upsert_team
from relay.services import upsert_price
from usage.models import Price
from usage.pricing import PriceInfo, cost_usd, price_at
from usage.recorder import insert_lines
from usage.rollups import billing_day, day_bounds, days_between, rebuild_days

BATCH = 5000
MODELS_PER_KEY = 3


class Command(BaseCommand):
    help = "Write synthetic usage rows (seed-… keys, teams and models) for demos and benchmarks."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--keys", type=int, default=50)
        parser.add_argument("--teams", type=int, default=10)
        parser.add_argument("--models", type=int, default=5)
        parser.add_argument("--days", type=int, default=30, help="ending today")
        parser.add_argument(
            "--requests", type=float, default=4, help="mean requests per key per day"
        )
        parser.add_argument("--seed", type=int, default=1)
        parser.add_argument(
            "--rollup", action="store_true", help="roll the days up afterwards"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if (
            min(options["keys"], options["teams"], options["models"], options["days"])
            < 1
        ):
            raise CommandError("--keys, --teams, --models and --days must be >= 1")
        rng = random.Random(options["seed"])
        last = billing_day(timezone.now())
        first = last - timedelta(days=options["days"] - 1)
        teams = [
            upsert_team(name=f"seed-team-{n:02d}") for n in range(options["teams"])
        ]
        keys = _keys(options["keys"], teams)
        models = [f"seed-model-{n:02d}" for n in range(options["models"])]
        prices = _prices(models, first, last)

        started = time.monotonic()
        written = 0
        batch: list[bytes] = []
        # Each key calls a few models of its own, the same ones every day.
        used_by = {
            key.pk: random.Random(key.pk).sample(
                models, min(MODELS_PER_KEY, len(models))
            )
            for key in keys
        }
        for day in days_between(first, last):
            for key in keys:
                used = used_by[key.pk]
                count = rng.randint(0, int(2 * options["requests"]))
                for _ in range(count):
                    model = rng.choice(used)
                    batch.append(_row(rng, day, key, model, prices.get(model, ())))
            if len(batch) >= BATCH:
                insert_lines(batch, "seedusage")
                written += len(batch)
                batch = []
            if day.day == 1 or day == last:
                self.stdout.write(f"  {day}: {written + len(batch)} rows")
        if batch:
            insert_lines(batch, "seedusage")
            written += len(batch)
        self.stdout.write(
            f"{written} usage rows for {len(keys)} keys, {len(teams)} teams and "
            f"{len(models)} models from {first} to {last} in "
            f"{time.monotonic() - started:.1f}s"
        )
        if options["rollup"]:
            started = time.monotonic()
            rollups = rebuild_days(days_between(first, last))
            self.stdout.write(
                f"{rollups} rollup rows in {time.monotonic() - started:.1f}s"
            )


def _keys(count: int, teams: list[Team]) -> list[ApiKey]:
    existing = {k.name: k for k in ApiKey.objects.filter(name__startswith="seed-key-")}
    keys = []
    for n in range(count):
        name = f"seed-key-{n:04d}"
        key = existing.get(name)
        if key is None:
            key = issue_key(name=name, team=teams[n % len(teams)]).key
        keys.append(key)
    return keys


def _prices(
    models: list[str], first: date, last: date
) -> dict[str, tuple[PriceInfo, ...]]:
    """Two prices per model (a change mid-range); the last model stays unpriced,
    so reports show what an unpriced model looks like."""
    middle = first + (last - first) / 2
    for n, model in enumerate(models[:-1] if len(models) > 1 else models):
        base = Decimal(n + 1) / 2
        for since, factor in ((first, Decimal(1)), (middle, Decimal("0.8"))):
            upsert_price(
                model=model,
                input=base * factor,
                output=base * 4 * factor,
                cached_input=base * factor / 2,
                effective_from=day_bounds(since)[0],
            )
    prices: dict[str, list[PriceInfo]] = {}
    for p in Price.objects.filter(model__in=models).order_by("-effective_from"):
        prices.setdefault(p.model, []).append(
            PriceInfo(
                p.pk, p.model, p.input, p.output, p.cached_input, p.effective_from
            )
        )
    return {model: tuple(found) for model, found in prices.items()}


def _row(
    rng: random.Random,
    day: date,
    key: ApiKey,
    model: str,
    prices: tuple[PriceInfo, ...],
) -> bytes:
    start, end = day_bounds(day)
    created_at: datetime = start + (end - start) * rng.random()
    status = rng.choices((200, 429, 502), weights=(96, 3, 1))[0]
    prompt = rng.randint(20, 4000) if status == 200 else 0
    completion = rng.randint(1, 1500) if status == 200 else 0
    cached = rng.randint(0, prompt) if rng.random() < 0.3 else 0
    price = price_at(prices, created_at)
    cost: Decimal | None
    if price is not None:
        cost = cost_usd(
            price,
            prompt_tokens=prompt,
            completion_tokens=completion,
            cached_tokens=cached,
        )
    else:
        cost = None if prompt or completion else Decimal(0)
    return orjson.dumps(
        {
            "id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            "request_id": f"seed-{rng.getrandbits(64):016x}",
            "created_at": created_at.isoformat(),
            "key_id": key.pk,
            "key_prefix": key.prefix,
            "team_id": key.team_id,
            "user": "",
            "endpoint": "chat.completions",
            "model": model,
            "upstream_model": model,
            "provider": "seed",
            "status_code": status,
            "error_code": "" if status == 200 else "upstream_error",
            "stream": rng.random() < 0.5,
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "cached_tokens": cached,
            "usage_source": "provider" if status == 200 else "none",
            "cost_usd": None if cost is None else str(cost),
            "price_id": price.id if price is not None else None,
            "latency_ms": rng.randint(50, 5000),
            "ttft_ms": rng.randint(20, 800),
            "client_disconnected": False,
            "cache_hit": False,
            "tags": ["seed"],
        }
    )
