"""Where a relay request comes from, for keys' IP allowlists.

The client is the TCP peer, ASGI `scope["client"]`. X-Forwarded-For is read only
when that peer is one of `GATEWAY_TRUSTED_PROXIES` (default: none): the header is
then walked from right to left, past addresses that are trusted proxies too, and
the first untrusted address is the client (the leftmost when every entry is
trusted). Several X-Forwarded-For headers count as one list, in their order.

A malformed entry (not an address, `unknown`, empty) ends the walk: a trusted
proxy vouches only for the entry it appended, so nothing left of an unusable one
can be believed, and the client is the last good address reached, i.e. the
trusted hop whose claim was unusable. Judging by that hop's own address keeps the
request answerable (its key's allowlist decides) without trusting anything a
client could have written.

The servers must hand over the real peer: uvicorn runs with `--no-proxy-headers`
and daphne without `--proxy-headers`, so this module is the only place a
forwarded header is believed. A server that rewrote `scope["client"]` anyway
leaves a trace: the client is then one of the X-Forwarded-For entries with that
entry's port, or port 0, which no TCP peer has. Such a request has no address the
gateway can vouch for, and an allowlisted key is refused.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
from collections.abc import Iterable, Sequence
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

logger = logging.getLogger(__name__)

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def ip_allowed(scope: dict[str, Any], allowlist: Sequence[str]) -> bool:
    """Whether the request's client is inside one of `allowlist`'s networks.

    A request whose address cannot be told, or a malformed allowlist, is refused.
    """
    address = client_ip(scope)
    if address is None:
        return False
    try:
        allowed = parse_networks(tuple(allowlist))
    except ValueError:
        return False
    return _inside(address, allowed)


def client_ip(scope: dict[str, Any]) -> Address | None:
    """The request's client address, or None when there is none to trust."""
    client = scope.get("client")
    if not client:
        return None
    peer = parse_address(str(client[0]))
    if peer is None:
        return None
    entries = forwarded_for(scope.get("headers") or ())
    if entries and _rewritten_by_server(peer, client, entries):
        return None
    proxies = trusted_proxies()
    if not proxies or not _inside(peer, proxies):
        return peer
    address = peer
    for entry in reversed(entries):
        hop = parse_hop(entry)
        if hop is None:
            break  # The trusted hop's claim is unusable: believe nothing left of it.
        address = hop[0]
        if not _inside(address, proxies):
            break
    return address


def trusted_proxies() -> tuple[Network, ...]:
    """`GATEWAY_TRUSTED_PROXIES`, parsed once per distinct value."""
    value = settings.GATEWAY_TRUSTED_PROXIES
    if isinstance(value, str):
        value = value.split(",")
    return _proxy_networks(tuple(value))


@functools.lru_cache(maxsize=8)
def _proxy_networks(entries: tuple[str, ...]) -> tuple[Network, ...]:
    try:
        return parse_networks(tuple(entry for entry in entries if entry.strip()))
    except ValueError as exc:
        raise ImproperlyConfigured(f"GATEWAY_TRUSTED_PROXIES: {exc}") from exc


@functools.lru_cache(maxsize=4096)
def parse_networks(entries: tuple[str, ...]) -> tuple[Network, ...]:
    """Addresses or CIDR ranges as networks, cached: allowlists repeat per key."""
    return tuple(ipaddress.ip_network(entry.strip(), strict=False) for entry in entries)


def forwarded_for(headers: Iterable[tuple[bytes, bytes]]) -> list[str]:
    """Every X-Forwarded-For entry, left to right, over all such headers."""
    values = [value for name, value in headers if name == b"x-forwarded-for"]
    if not values:
        return []
    joined = b",".join(values).decode("latin-1")
    return [entry.strip() for entry in joined.split(",")]


def parse_hop(entry: str) -> tuple[Address, int] | None:
    """One X-Forwarded-For entry as (address, port or 0), None when malformed.

    Accepts `192.0.2.1`, `192.0.2.1:8080`, `2001:db8::1`, `[2001:db8::1]` and
    `[2001:db8::1]:8080`.
    """
    host, port_text = entry, ""
    if entry.startswith("["):
        host, bracket, rest = entry[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            return None
        port_text = rest[1:] if rest else ""
        if rest and not port_text:
            return None
    elif entry.count(":") == 1:
        host, _, port_text = entry.partition(":")
        if not port_text:
            return None
    port = 0
    if port_text:
        if not (port_text.isascii() and port_text.isdigit()):
            return None
        port = int(port_text)
        if port > 65535:
            return None
    address = parse_address(host)
    return None if address is None else (address, port)


def parse_address(text: str) -> Address | None:
    """An IP address, IPv4-mapped IPv6 (`::ffff:192.0.2.1`) read as IPv4."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def _inside(address: Address, networks: tuple[Network, ...]) -> bool:
    return any(address in network for network in networks)


def _rewritten_by_server(
    peer: Address, client: Sequence[Any], entries: list[str]
) -> bool:
    """Whether the server replaced the peer with an X-Forwarded-For entry.

    uvicorn does by default (its `--forwarded-allow-ips` trusts 127.0.0.1), daphne
    with `--proxy-headers`; the replacement carries the entry's port, or 0.
    """
    port = client[1] if len(client) > 1 else None
    for entry in entries:
        hop = parse_hop(entry)
        if hop is not None and hop[0] == peer and port in (0, hop[1]):
            _warn_server_rewrites()
            return True
    return False


@functools.cache
def _warn_server_rewrites() -> None:
    # Cached: one warning per process, not one per request.
    logger.warning(
        "The ASGI server replaced the client address with an X-Forwarded-For "
        "entry; allowlisted keys are refused. Run uvicorn with --no-proxy-headers "
        "(daphne without --proxy-headers) and list proxies in "
        "GATEWAY_TRUSTED_PROXIES."
    )
