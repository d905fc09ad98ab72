"""URL patterns of the relay's consumers (everything under /v1/)."""

from __future__ import annotations

from channels.routing import URLRouter
from django.urls import path, re_path

from relay import consumers

relay_router = URLRouter(
    [
        path("v1/chat/completions", consumers.ChatCompletionsConsumer.as_asgi()),
        path("v1/completions", consumers.CompletionsConsumer.as_asgi()),
        path("v1/embeddings", consumers.EmbeddingsConsumer.as_asgi()),
        path("v1/responses", consumers.ResponsesConsumer.as_asgi()),
        path("v1/models", consumers.ModelsConsumer.as_asgi()),
        re_path(r"^v1/models/(?P<model_id>.+)$", consumers.ModelsConsumer.as_asgi()),
        re_path(r"", consumers.NotFoundConsumer.as_asgi()),
    ]
)
