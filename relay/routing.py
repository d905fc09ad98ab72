"""Which consumer serves each /v1/ path.

An exact-path table, not Channels' URLRouter: the relay's paths are fixed, and the
router runs Django's URL resolver on every request for nothing.
"""

from __future__ import annotations

from typing import Any

from relay import consumers
from relay.key_usage import KeyUsageConsumer
from relay.prompt_api import InferenceCompleteConsumer, InferenceStreamConsumer

MODEL_PATH_PREFIX = "/v1/models/"

ROUTES: dict[str, Any] = {
    "/v1/chat/completions": consumers.ChatCompletionsConsumer.as_asgi(),
    "/v1/completions": consumers.CompletionsConsumer.as_asgi(),
    "/v1/embeddings": consumers.EmbeddingsConsumer.as_asgi(),
    "/v1/responses": consumers.ResponsesConsumer.as_asgi(),
    "/v1/inference/complete": InferenceCompleteConsumer.as_asgi(),
    "/v1/inference/stream": InferenceStreamConsumer.as_asgi(),
    "/v1/models": consumers.ModelsConsumer.as_asgi(),
    "/v1/usage": KeyUsageConsumer.as_asgi(),
}
_model_by_id = consumers.ModelsConsumer.as_asgi()
_not_found = consumers.NotFoundConsumer.as_asgi()


async def relay_router(scope: dict[str, Any], receive: Any, send: Any) -> None:
    path = scope["path"]
    app = ROUTES.get(path)
    if app is not None:
        scope["url_route"] = {"args": (), "kwargs": {}}
    elif path.startswith(MODEL_PATH_PREFIX) and len(path) > len(MODEL_PATH_PREFIX):
        app = _model_by_id
        scope["url_route"] = {
            "args": (),
            "kwargs": {"model_id": path[len(MODEL_PATH_PREFIX) :]},
        }
    else:
        app = _not_found
        scope["url_route"] = {"args": (), "kwargs": {}}
    await app(scope, receive, send)
