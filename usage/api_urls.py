"""REST routes of usage/: usage/ (the ledger) and reports/daily/ (the rollups)."""

from __future__ import annotations

from django.urls import URLPattern, URLResolver, path
from rest_framework.routers import SimpleRouter

from usage.api import DailyReportView, UsageViewSet

router = SimpleRouter()
router.register("usage", UsageViewSet, basename="usage")

urlpatterns: list[URLPattern | URLResolver] = [
    *router.urls,
    path("reports/daily/", DailyReportView.as_view(), name="reports-daily"),
]
