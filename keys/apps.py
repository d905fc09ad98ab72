from __future__ import annotations

from django.apps import AppConfig


class KeysConfig(AppConfig):
    name = "keys"
    verbose_name = "Keys and quotas"

    def ready(self) -> None:
        from keys import checks  # noqa: F401  (registers the deploy checks)
