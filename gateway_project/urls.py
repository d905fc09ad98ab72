"""Django's URLs: everything but the relay (/v1/), which asgi.py routes first."""

from __future__ import annotations

from django.contrib import admin
from django.urls import include, path

from gateway_project import health

urlpatterns = [
    path("admin/", admin.site.urls),
    path("health", health.alive, name="health"),
    path("health/ready", health.ready, name="health-ready"),
    path("", include("django_prometheus.urls")),
]
