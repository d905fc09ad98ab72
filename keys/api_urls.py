"""REST routes of keys/: keys/, teams/, auth/me/ (filled in by the key-management work)."""

from __future__ import annotations

from django.urls import URLPattern, URLResolver

urlpatterns: list[URLPattern | URLResolver] = []
