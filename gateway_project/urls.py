"""Django's URLs: everything but the relay (/v1/), which asgi.py routes first."""

from __future__ import annotations

from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from gateway_project import health

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/v1/", include("gateway_project.api_urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path(
        "api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"
    ),
    path("reports/", include("usage.urls")),
    path("health", health.alive, name="health"),
    path("health/ready", health.ready, name="health-ready"),
    path("", include("django_prometheus.urls")),
]
