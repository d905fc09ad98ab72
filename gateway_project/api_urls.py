"""/api/v1/: the REST API. Each app adds its own routes in `<app>/api_urls.py`."""

from __future__ import annotations

from django.urls import include, path

urlpatterns = [
    path("", include("keys.api_urls")),
    path("", include("usage.api_urls")),
]
