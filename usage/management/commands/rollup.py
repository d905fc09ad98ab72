"""`python manage.py rollup --since DATE [--until DATE]`: rebuild daily rollups."""

from __future__ import annotations

import time
from datetime import date
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from usage.rollups import billing_day, days_between, rebuild_days


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError as exc:
        raise CommandError(f"{text!r}: use YYYY-MM-DD") from exc


class Command(BaseCommand):
    help = (
        "Recompute the daily rollups of every billing day from --since to --until "
        "(default: today) from the usage rows. Idempotent: safe to run again, late, "
        "or while the scheduler runs."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--since", required=True, type=_day, help="YYYY-MM-DD")
        parser.add_argument("--until", type=_day, help="YYYY-MM-DD, included")
        parser.add_argument(
            "--no-progress", action="store_true", help="no progress bar"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        first: date = options["since"]
        last: date = options["until"] or billing_day(timezone.now())
        if first > last:
            raise CommandError("--since comes after --until")
        days = days_between(first, last)
        bar = _ProgressBar(self.stdout, len(days), enabled=not options["no_progress"])
        started = time.monotonic()
        written = rebuild_days(days, progress=lambda day, _: bar.advance(str(day)))
        bar.close()
        self.stdout.write(
            f"{len(days)} days rolled up ({first} to {last}): {written} rollup rows "
            f"in {time.monotonic() - started:.1f}s"
        )


class _ProgressBar:
    """`[#####.....]  12/365 2024-01-12`, redrawn in place on a terminal; on a
    pipe or file, a line every 10%, so logs stay short."""

    width = 30

    def __init__(self, out: Any, total: int, *, enabled: bool) -> None:
        self.out, self.total, self.done = out, total, 0
        self.enabled = enabled and total > 0
        self.tty = out.isatty()
        self._last_tenth = -1

    def advance(self, label: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        filled = self.width * self.done // self.total
        line = (
            f"[{'#' * filled}{'.' * (self.width - filled)}] "
            f"{self.done:>{len(str(self.total))}}/{self.total} {label}"
        )
        if self.tty:
            self.out.write("\r" + line, ending="")
            self.out.flush()
            return
        tenth = 10 * self.done // self.total
        if tenth != self._last_tenth:
            self._last_tenth = tenth
            self.out.write(line)

    def close(self) -> None:
        if self.enabled and self.tty:
            self.out.write("")
