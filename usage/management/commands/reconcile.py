"""`python manage.py reconcile --month YYYY-MM`: prove the rollups equal the rows."""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from usage.retention import retention_horizon
from usage.rollups import reconcile

SHOWN_MISMATCHES = 50


def _month(text: str) -> date:
    try:
        year, month = (int(part) for part in text.split("-"))
        return date(year, month, 1)
    except ValueError as exc:
        raise CommandError(f"{text!r}: use YYYY-MM") from exc


class Command(BaseCommand):
    help = (
        "Recompute a billing month's totals from the usage rows and compare them, "
        "line by line (day × key × team × model), with the daily rollups. Exits "
        "non-zero when any number differs."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--month", required=True, type=_month, help="YYYY-MM")

    def handle(self, *args: Any, **options: Any) -> None:
        first: date = options["month"]
        last = (first + timedelta(days=32)).replace(day=1) - timedelta(days=1)
        horizon = retention_horizon()
        if horizon is not None and first < horizon:
            # The rows of pruned days are gone; their rollups are the record.
            self.stdout.write(
                f"Days before {horizon} are past the retention age: their rows "
                "were pruned and only the rollups remain; they are not checked."
            )
            first = horizon
            if first > last:
                self.stdout.write("Nothing left to check in this month.")
                return
        result = reconcile(first, last)
        self.stdout.write(
            f"{first} to {last}: {result.requests} requests on {result.lines} lines, "
            f"cost {result.cost_usd:f} USD, {result.unpriced_requests} unpriced"
        )
        if result.ok:
            self.stdout.write(self.style.SUCCESS("OK: the rollups equal the rows."))
            return
        for m in result.mismatches[:SHOWN_MISMATCHES]:
            day, key_id, team_id, model = m.line
            self.stdout.write(
                f"  {day} key={key_id} team={team_id} model={model!r}: {m.field} "
                f"rows={m.rows} rollups={m.rollups}"
            )
        hidden = len(result.mismatches) - SHOWN_MISMATCHES
        if hidden > 0:
            self.stdout.write(f"  ... and {hidden} more")
        raise CommandError(
            f"{len(result.mismatches)} differences between rollups and rows; "
            f"`manage.py rollup --since {first} --until {last}` rebuilds them"
        )
