"""`python manage.py createkey --name NAME ...`: issue a key; the secret is the last line."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction

from keys.services import QuotaSpec, issue_key, quota_specs, upsert_team


class Command(BaseCommand):
    help = "Issue an API key. Prints the secret, alone, as the last line: it is shown once."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--name", required=True)
        parser.add_argument("--owner", help="username of the key's owner")
        parser.add_argument("--team", help="team name (created if new)")
        parser.add_argument(
            "--models", default="", help="comma-separated allowed models"
        )
        parser.add_argument("--rpm", type=int, help="requests per minute")
        parser.add_argument("--tpm", type=int, help="tokens per minute")
        parser.add_argument("--budget-usd", help="spend limit in USD")
        parser.add_argument(
            "--budget-period", choices=["day", "month", "total"], default="month"
        )
        parser.add_argument(
            "--quota",
            action="append",
            default=[],
            metavar="METRIC:PERIOD:LIMIT",
            help="any other quota, repeatable: metric requests, tokens or cost_usd; "
            "period minute, hour, day, month or total (e.g. requests:hour:5000, "
            "cost_usd:day:20)",
        )
        parser.add_argument(
            "--ip-allowlist",
            default="",
            help="comma-separated addresses or CIDR ranges the key may be used from",
        )
        parser.add_argument(
            "--allow-unpriced",
            action="store_true",
            help="admit models with no price despite a cost budget (rows are flagged)",
        )
        parser.add_argument("--expires", help="ISO 8601 date-time with offset")

    def handle(self, *args: Any, **options: Any) -> None:
        # Every option is checked before anything is written.
        owner = None
        if options["owner"]:
            try:
                owner = get_user_model().objects.get(username=options["owner"])
            except get_user_model().DoesNotExist:
                raise CommandError(f"no user named {options['owner']!r}") from None
        budget = None
        if options["budget_usd"] is not None:
            try:
                budget = Decimal(options["budget_usd"])
            except InvalidOperation:
                raise CommandError("--budget-usd must be a number") from None
            if not budget.is_finite() or budget < 0:
                raise CommandError("--budget-usd must be a number, not negative")
        for flag in ("rpm", "tpm"):
            if options[flag] is not None and options[flag] < 0:
                raise CommandError(f"--{flag} must not be negative")
        expires_at = _expiry(options["expires"]) if options["expires"] else None
        models = _items(options["models"])
        extra_quotas = [_quota(text) for text in options["quota"]]
        try:
            quotas = [
                *quota_specs(
                    rpm=options["rpm"],
                    tpm=options["tpm"],
                    budget_usd=budget,
                    budget_period=options["budget_period"],
                ),
                *extra_quotas,
            ]
            with transaction.atomic():
                team = upsert_team(name=options["team"]) if options["team"] else None
                issued = issue_key(
                    name=options["name"],
                    owner=owner,
                    team=team,
                    models=models,
                    ip_allowlist=_items(options["ip_allowlist"]),
                    expires_at=expires_at,
                    quotas=quotas,
                    allow_unpriced=options["allow_unpriced"],
                )
        except ValidationError as exc:
            raise CommandError("; ".join(exc.messages)) from exc
        key = issued.key
        self.stdout.write(
            f"Issued key {key.name!r} (id {key.pk}, prefix {key.prefix})."
        )
        self.stdout.write("The secret is shown once, below; store it now.")
        self.stdout.write(issued.secret)


def _items(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _quota(text: str) -> QuotaSpec:
    """`requests:hour:5000` as a quota; the metric and period are checked on issue."""
    parts = text.split(":")
    if len(parts) != 3:
        raise CommandError(
            f"--quota {text!r}: give METRIC:PERIOD:LIMIT, e.g. requests:hour:5000"
        )
    metric, period, limit = (part.strip() for part in parts)
    try:
        return QuotaSpec(metric, period, Decimal(limit))
    except InvalidOperation:
        raise CommandError(f"--quota {text!r}: the limit must be a number") from None


def _expiry(value: str) -> datetime:
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise CommandError(
            "--expires must be ISO 8601, e.g. 2026-12-31T23:59:59+00:00"
        ) from None
    if moment.tzinfo is None:
        raise CommandError("--expires needs a time zone offset, e.g. +00:00")
    return moment
