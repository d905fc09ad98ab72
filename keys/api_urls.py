"""REST routes of keys/ under /api/v1/: keys/, teams/, and auth/ (JWT tokens, me)."""

from __future__ import annotations

from django.urls import URLPattern, URLResolver, path
from rest_framework.routers import SimpleRouter

from keys.api import (
    ApiKeyViewSet,
    MeView,
    TeamViewSet,
    TokenObtainPairView,
    TokenRefreshView,
)

router = SimpleRouter()
router.register("keys", ApiKeyViewSet, basename="apikey")
router.register("teams", TeamViewSet, basename="team")

urlpatterns: list[URLPattern | URLResolver] = [
    path("auth/token/", TokenObtainPairView.as_view(), name="token-obtain"),
    path("auth/token/refresh/", TokenRefreshView.as_view(), name="token-refresh"),
    path("auth/me/", MeView.as_view(), name="auth-me"),
    *router.urls,
]
