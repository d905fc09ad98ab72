"""`python manage.py loadconfig FILE.yaml`: providers, models and prices, idempotently."""

from __future__ import annotations

from datetime import date, datetime, time
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import yaml
from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction

from relay.services import upsert_model, upsert_price, upsert_provider


class Command(BaseCommand):
    help = "Create or update providers, models and prices from a YAML file."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("file", type=Path)

    def handle(self, *args: Any, file: Path, **options: Any) -> None:
        try:
            config = yaml.safe_load(file.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise CommandError(f"cannot read {file}: {exc}") from exc
        if not isinstance(config, dict):
            raise CommandError(
                f"{file}: expected a mapping with providers, models, prices"
            )
        changed = 0
        try:
            with transaction.atomic():
                for item in _items(config, "providers"):
                    _, did = upsert_provider(
                        name=_required(item, "name", "providers"),
                        base_url=_required(item, "base_url", "providers"),
                        api_key_env=item.get("api_key_env", ""),
                        timeout_s=float(item.get("timeout_s", 60)),
                    )
                    changed += did
                for item in _items(config, "models"):
                    _, did = upsert_model(
                        name=_required(item, "name", "models"),
                        provider=_required(item, "provider", "models"),
                        upstream_model=item.get("upstream_model", ""),
                        fallbacks=item.get("fallbacks") or [],
                        max_output_tokens=item.get("max_output_tokens"),
                    )
                    changed += did
                for item in _items(config, "prices"):
                    _, did = upsert_price(
                        model=_required(item, "model", "prices"),
                        input=_money(item, "input"),
                        output=_money(item, "output"),
                        cached_input=_money(item, "cached_input", required=False),
                        effective_from=_moment(item.get("effective_from")),
                    )
                    changed += did
        except ValidationError as exc:
            raise CommandError("; ".join(exc.messages)) from exc
        self.stdout.write(f"{changed} rows created or changed from {file}")


def _items(config: dict[str, Any], section: str) -> list[dict[str, Any]]:
    items = config.get(section) or []
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise CommandError(f"{section}: expected a list of mappings")
    return items


def _required(item: dict[str, Any], field: str, section: str) -> Any:
    if item.get(field) in (None, ""):
        raise CommandError(f"{section}: every entry needs {field!r}")
    return item[field]


def _money(
    item: dict[str, Any], field: str, *, required: bool = True
) -> Decimal | None:
    value = item.get(field)
    if value is None and not required:
        return None
    if isinstance(value, float):
        # YAML read it as a float: its exact decimal text is lost. Insist on quotes.
        raise CommandError(
            f"prices: quote {field} of {item.get('model')!r} as a string"
        )
    try:
        return Decimal(str(value))
    except (InvalidOperation, TypeError) as exc:
        raise CommandError(
            f"prices: {field} of {item.get('model')!r} is not a number"
        ) from exc


def _moment(value: Any) -> datetime:
    """A date is the start of that billing day; a datetime must carry its zone."""
    zone = ZoneInfo(settings.GATEWAY_BILLING_TZ)
    if value is None:
        raise CommandError("prices: every entry needs 'effective_from'")
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise CommandError("prices: effective_from needs a time zone offset")
        return value
    if isinstance(value, date):
        return datetime.combine(value, time.min, tzinfo=zone)
    try:
        return _moment(date.fromisoformat(str(value)))
    except ValueError:
        pass
    try:
        return _moment(datetime.fromisoformat(str(value)))
    except ValueError as exc:
        raise CommandError(f"prices: effective_from {value!r} is not a date") from exc
