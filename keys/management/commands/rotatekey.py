"""`python manage.py rotatekey NAME_OR_PREFIX [--grace-seconds N]`: a new secret, printed
alone as the last line; the old one keeps working for the grace period."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db.models import Q

from keys.models import ApiKey
from keys.secrets import parse_prefix
from keys.services import rotate_key


class Command(BaseCommand):
    help = "Rotate an API key's secret. Prints the new secret, alone, as the last line."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name_or_prefix")
        parser.add_argument("--grace-seconds", type=int, default=0)

    def handle(
        self, *args: Any, name_or_prefix: str, grace_seconds: int, **options: Any
    ) -> None:
        needle = parse_prefix(name_or_prefix) or name_or_prefix
        matches = list(ApiKey.objects.filter(Q(prefix=needle) | Q(name=needle))[:2])
        if not matches:
            raise CommandError(f"no key with the name or prefix {needle!r}")
        if len(matches) > 1:
            raise CommandError(f"several keys are named {needle!r}: rotate by prefix")
        try:
            issued = rotate_key(key=matches[0], grace_seconds=grace_seconds)
        except ValidationError as exc:
            raise CommandError("; ".join(exc.messages)) from exc
        self.stdout.write(
            f"Rotated key {issued.key.name!r}: new prefix {issued.key.prefix}."
        )
        if grace_seconds:
            self.stdout.write(f"The old secret works for {grace_seconds} more seconds.")
        self.stdout.write("The new secret is shown once, below; store it now.")
        self.stdout.write(issued.secret)
