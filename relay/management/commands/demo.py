"""`python manage.py demo`: load the demo config, issue a demo key, print how to call it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandParser

from keys.models import ApiKey
from keys.services import issue_key, quota_specs, revoke_key

SNIPPET = """
The gateway is starting on {url}. Stream a completion through it:

  curl -N {url}/v1/chat/completions \\
    -H "Authorization: Bearer {secret}" \\
    -H "Content-Type: application/json" \\
    -d '{{"model": "demo-mini", "stream": true, "messages": [{{"role": "user", "content": "Hello!"}}]}}'

or with the official openai SDK (pip install openai):

  from openai import OpenAI
  client = OpenAI(base_url="{url}/v1", api_key="{secret}")
  stream = client.chat.completions.create(
      model="demo-mini", stream=True, messages=[{{"role": "user", "content": "Hello!"}}]
  )
  for chunk in stream:
      print(chunk.choices[0].delta.content or "", end="", flush=True)

Admin: {url}/admin/ (create a login with: .venv/bin/python manage.py createsuperuser)
"""


class Command(BaseCommand):
    help = "Set up the demo provider and a demo key on the fake upstream, and print snippets."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--url", default="http://127.0.0.1:8000")

    def handle(self, *args: Any, url: str, **options: Any) -> None:
        call_command("loadconfig", Path(settings.BASE_DIR) / "config" / "demo.yaml")
        for old in ApiKey.objects.filter(name="demo", revoked_at__isnull=True):
            revoke_key(key=old)
        issued = issue_key(
            name="demo",
            models=["demo-mini", "demo-backup", "demo/*"],
            quotas=quota_specs(rpm=600),
        )
        self.stdout.write(SNIPPET.format(url=url, secret=issued.secret))
