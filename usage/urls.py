"""/reports/: the finance page, its CSV/FOCUS export, and a sign-in for non-staff."""

from __future__ import annotations

from django.urls import URLPattern, URLResolver, path

from usage import views

app_name = "reports"
urlpatterns: list[URLPattern | URLResolver] = [
    path("", views.reports_page, name="index"),
    path("export.csv", views.reports_export, name="export"),
    path("login/", views.login, name="login"),
    path("logout/", views.logout, name="logout"),
]
