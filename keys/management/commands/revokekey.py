"""`python manage.py revokekey NAME_OR_PREFIX`: revoke one key, refused everywhere within 1 s."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db.models import Q

from keys.models import ApiKey
from keys.secrets import parse_prefix
from keys.services import revoke_key


class Command(BaseCommand):
    help = "Revoke an API key by its name, its prefix, or its whole secret."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name_or_prefix")

    def handle(self, *args: Any, name_or_prefix: str, **options: Any) -> None:
        needle = parse_prefix(name_or_prefix) or name_or_prefix
        matches = list(
            ApiKey.objects.filter(
                Q(prefix=needle) | Q(previous_prefix=needle) | Q(name=needle)
            )[:2]
        )
        if not matches:
            raise CommandError(f"no key with the name or prefix {needle!r}")
        if len(matches) > 1:
            raise CommandError(f"several keys are named {needle!r}: revoke by prefix")
        key = matches[0]
        if key.revoked_at is not None:
            self.stdout.write(f"Key {key.name!r} ({key.prefix}) was already revoked.")
            return
        revoke_key(key=key)
        self.stdout.write(f"Revoked key {key.name!r} ({key.prefix}).")
