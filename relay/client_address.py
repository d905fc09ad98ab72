"""Where a relay request comes from, for keys' IP allowlists."""

from __future__ import annotations

import contextlib
import ipaddress
from typing import Any


def ip_allowed(scope: dict[str, Any], allowlist: tuple[str, ...]) -> bool:
    client = scope.get("client")
    if not client:
        return False
    with contextlib.suppress(ValueError):
        address = ipaddress.ip_address(client[0])
        return any(
            address in ipaddress.ip_network(net, strict=False) for net in allowlist
        )
    return False
