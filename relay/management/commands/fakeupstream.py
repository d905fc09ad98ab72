"""Serve the fake OpenAI-compatible upstream (relay/fake_upstream.py)."""

from __future__ import annotations

from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand

from relay.fake_upstream import add_arguments, serve


class Command(BaseCommand):
    help = (
        "Serve a fake OpenAI-compatible upstream for the demo and benchmarks. "
        "Steer it with directives in the model name, e.g. fake-gpt;chunks=20."
    )
    # The fake touches neither the database nor the models; skip the checks so
    # it starts even before migrations run.
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: ArgumentParser) -> None:
        add_arguments(parser)

    def handle(self, *args: Any, **options: Any) -> None:
        self.stdout.write(
            f"Fake upstream on http://{options['host']}:{options['port']}/v1"
        )
        serve(host=options["host"], port=options["port"], api_key=options["api_key"])
