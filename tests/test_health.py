"""`GET /health` (the process answers) and `GET /health/ready` (its dependencies do)."""

from __future__ import annotations

import time
from unittest import mock

import pytest
from django.db import OperationalError, connection

CLOSED_REDIS = "redis://127.0.0.1:1/0"


def expected_healthy_checks(settings) -> dict[str, str]:
    return {
        "database": "ok",
        "cache": "ok" if settings.REDIS_URL else "not configured",
        "broker": "not configured" if settings.CELERY_TASK_ALWAYS_EAGER else "ok",
    }


def test_health_says_ok_without_touching_the_database(client):
    response = client.get("/health")

    assert response.status_code == 200
    assert response["content-type"] == "application/json"
    assert response.json()["status"] == "ok"
    assert "config_generation" in response.json()
    assert "no-cache" in response["cache-control"]


def test_health_answers_only_get(client):
    response = client.post("/health")

    assert response.status_code == 405


@pytest.mark.django_db
def test_ready_is_200_with_every_check_when_all_are_reachable(client, settings):
    response = client.get("/health/ready")

    assert response.status_code == 200
    assert response.json() == {
        "status": "ok",
        "checks": expected_healthy_checks(settings),
    }
    assert "no-cache" in response["cache-control"]


@pytest.mark.django_db
def test_ready_is_503_when_the_database_is_unreachable(client):
    with mock.patch.object(
        connection, "cursor", side_effect=OperationalError("could not connect")
    ):
        response = client.get("/health/ready")

    assert response.status_code == 503
    assert response.json()["status"] == "unavailable"
    assert response.json()["checks"]["database"] == "unreachable"


@pytest.mark.django_db
def test_ready_is_503_when_redis_is_configured_but_down(client, settings):
    settings.REDIS_URL = CLOSED_REDIS
    settings.CACHES = {
        "default": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": CLOSED_REDIS,
            "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 1, "SOCKET_TIMEOUT": 1},
        }
    }

    response = client.get("/health/ready")

    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["checks"]["cache"] == "unreachable"
    assert body["checks"]["database"] == "ok"


@pytest.mark.django_db
def test_ready_is_503_quickly_when_the_broker_is_configured_but_down(client, settings):
    settings.CELERY_TASK_ALWAYS_EAGER = False
    settings.CELERY_BROKER_URL = CLOSED_REDIS
    started = time.monotonic()

    response = client.get("/health/ready")

    assert response.status_code == 503
    assert response.json()["checks"]["broker"] == "unreachable"
    assert response.json()["checks"]["database"] == "ok"
    assert time.monotonic() - started < 1.5
