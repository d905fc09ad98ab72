"""`python manage.py flushusage`: write spooled usage rows now (e.g. after a crash)."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from usage.recorder import recorder


class Command(BaseCommand):
    help = "Write every spooled usage row, including those of dead processes, to the database."

    def handle(self, *args: Any, **options: Any) -> None:
        written = recorder.flush_sync()
        self.stdout.write(f"{written} usage rows written")
