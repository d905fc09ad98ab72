"""ASGI lifespan: flush usage and close the upstream pool when the server stops.

uvicorn sends lifespan events; daphne does not, and there the spool's periodic
flush and the adoption of a dead process's segment cover the same ground.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)


async def lifespan(scope: dict[str, Any], receive: Any, send: Any) -> None:
    from relay import upstream
    from relay.snapshot import snapshot
    from usage.recorder import recorder

    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            recorder.start()
            snapshot.ensure_polling()
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await snapshot.close()
            await recorder.close()
            await upstream.close_sessions()
            await send({"type": "lifespan.shutdown.complete"})
            return
