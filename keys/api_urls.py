"""REST routes of keys/: keys/, teams/ and auth/me/ under /api/v1/."""

from __future__ import annotations

from django.urls import URLPattern, URLResolver, path
from rest_framework.routers import SimpleRouter

from keys.api import ApiKeyViewSet, MeView, TeamViewSet

router = SimpleRouter()
router.register("keys", ApiKeyViewSet, basename="apikey")
router.register("teams", TeamViewSet, basename="team")

urlpatterns: list[URLPattern | URLResolver] = [
    path("auth/me/", MeView.as_view(), name="auth-me"),
    *router.urls,
]
