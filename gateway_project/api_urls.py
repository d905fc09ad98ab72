"""/api/v1/: the REST API. Each app adds its own routes in `<app>/api_urls.py`."""

from __future__ import annotations

from django.urls import include, path
from rest_framework_simplejwt.views import TokenObtainPairView, TokenRefreshView

urlpatterns = [
    path("auth/token/", TokenObtainPairView.as_view(), name="token-obtain"),
    path("auth/token/refresh/", TokenRefreshView.as_view(), name="token-refresh"),
    path("", include("keys.api_urls")),
    path("", include("usage.api_urls")),
]
