"""ASGI entry point: /v1/* goes to the relay's consumers, the rest to Django.

The relay never enters Django's request cycle (which costs a thread hop and about a
millisecond per request); admin, REST API, reports, health and metrics do.
"""

from __future__ import annotations

import os
from typing import Any

from channels.routing import ProtocolTypeRouter
from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "gateway_project.settings")
django_asgi_app = get_asgi_application()  # Sets Django up before the consumers import.

from gateway_project.lifespan import lifespan  # noqa: E402
from relay.routing import relay_router  # noqa: E402


async def http(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["path"].startswith("/v1/"):
        await relay_router(scope, receive, send)
    else:
        await django_asgi_app(scope, receive, send)


application = ProtocolTypeRouter({"http": http, "lifespan": lifespan})
