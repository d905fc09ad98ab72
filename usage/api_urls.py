"""REST routes of usage/: usage/, reports/daily/ (filled in by the finance work)."""

from __future__ import annotations

from django.urls import URLPattern, URLResolver

urlpatterns: list[URLPattern | URLResolver] = []
