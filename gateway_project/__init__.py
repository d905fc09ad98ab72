"""The gateway's Django project. Importing the Celery app binds @shared_task to it."""

from __future__ import annotations

from gateway_project.celery import app as celery_app

__all__ = ["celery_app"]
