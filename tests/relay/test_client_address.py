"""`relay.client_address`: the client is the TCP peer, and X-Forwarded-For counts only
as far as trusted proxies vouch for it."""

from __future__ import annotations

import ipaddress
from typing import Any
from unittest import mock

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings
from hypothesis import assume, given
from hypothesis import strategies as st

from relay import client_address
from relay.client_address import client_ip, ip_allowed, parse_hop

TRUSTED = ["10.0.0.0/8", "fd00::/8"]
TRUSTED_NETWORKS = [ipaddress.ip_network(net) for net in TRUSTED]
PEER_PORT = 51234


def request_scope(
    peer: Any, *forwarded_for: str, port: int = PEER_PORT
) -> dict[str, Any]:
    headers = [(b"host", b"gateway"), (b"user-agent", b"test")]
    headers += [
        (b"x-forwarded-for", value.encode("latin-1")) for value in forwarded_for
    ]
    return {"type": "http", "client": (str(peer), port), "headers": headers}


def is_trusted(address: Any) -> bool:
    return any(address in network for network in TRUSTED_NETWORKS)


def hop_text(address: Any, port: int | None) -> str:
    """`address` as a proxy writes it into X-Forwarded-For."""
    if port is None:
        return str(address)
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


plain_addresses = st.ip_addresses().filter(
    lambda a: not (a.version == 6 and a.ipv4_mapped)
)
trusted_addresses = st.one_of(
    st.ip_addresses(network="10.0.0.0/8"), st.ip_addresses(network="fd00::/8")
)
untrusted_addresses = plain_addresses.filter(lambda a: not is_trusted(a))
# Ports in forwarded entries stay below the peer's, which is ephemeral (>= 1024).
entry_ports = st.none() | st.integers(min_value=0, max_value=1023)
peer_ports = st.integers(min_value=1024, max_value=65535)
# Whatever a client may write: addresses, with or without ports, and junk.
any_entry = st.one_of(
    st.builds(hop_text, plain_addresses, entry_ports),
    st.sampled_from(["", "unknown", "_hidden", "[::1", "1.2.3.4:", "999.1.1.1"]),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=255)).filter(
        lambda text: "," not in text
    ),
)


def as_headers(entries: list[str], splits: int) -> list[str]:
    """The entries as one or more X-Forwarded-For headers, in order."""
    if not entries:
        return []
    cut = max(1, min(splits, len(entries)))
    size = -(-len(entries) // cut)
    return [", ".join(entries[i : i + size]) for i in range(0, len(entries), size)]


@given(
    peer=untrusted_addresses,
    port=peer_ports,
    entries=st.lists(any_entry, max_size=8),
    splits=st.integers(min_value=1, max_value=3),
)
@override_settings(GATEWAY_TRUSTED_PROXIES=TRUSTED)
def test_a_request_from_an_untrusted_peer_is_judged_by_the_peer_whatever_it_forwards(
    peer, port, entries, splits
):
    headers = as_headers(entries, splits)
    # The one trace a server rewrite leaves (the peer's own port in an entry) aside.
    assume(all(f":{port}" not in header for header in headers))

    address = client_ip(request_scope(peer, *headers, port=port))

    assert address == peer


@given(
    peer=plain_addresses,
    port=peer_ports,
    entries=st.lists(any_entry, max_size=8),
)
@override_settings(GATEWAY_TRUSTED_PROXIES=[])
def test_without_trusted_proxies_no_forwarded_header_is_believed(peer, port, entries):
    headers = as_headers(entries, 1)
    assume(all(f":{port}" not in header for header in headers))

    address = client_ip(request_scope(peer, *headers, port=port))

    assert address == peer


@given(
    spoofed=st.lists(any_entry, max_size=4),
    client=untrusted_addresses,
    client_port=entry_ports,
    hops=st.lists(st.tuples(trusted_addresses, entry_ports), max_size=4),
    peer=trusted_addresses,
    splits=st.integers(min_value=1, max_value=3),
)
@override_settings(GATEWAY_TRUSTED_PROXIES=TRUSTED)
def test_a_chain_of_trusted_proxies_yields_the_first_untrusted_hop(
    spoofed, client, client_port, hops, peer, splits
):
    entries = [*spoofed, hop_text(client, client_port)]
    entries += [hop_text(address, port) for address, port in hops]
    headers = as_headers(entries, splits)
    assume(all(f":{PEER_PORT}" not in header for header in headers))

    address = client_ip(request_scope(peer, *headers))

    assert address == client


@given(
    hops=st.lists(st.tuples(trusted_addresses, entry_ports), min_size=1, max_size=5),
    peer=trusted_addresses,
)
@override_settings(GATEWAY_TRUSTED_PROXIES=TRUSTED)
def test_when_every_forwarded_address_is_trusted_the_leftmost_is_the_client(hops, peer):
    header = ", ".join(hop_text(address, port) for address, port in hops)

    address = client_ip(request_scope(peer, header))

    assert address == hops[0][0]


@override_settings(GATEWAY_TRUSTED_PROXIES=TRUSTED)
@pytest.mark.parametrize("malformed", ["unknown", "", "203.0.113.5:http", "[::1"])
def test_nothing_left_of_a_malformed_entry_is_believed(malformed):
    header = f"203.0.113.5, {malformed}, 10.0.0.2"

    address = client_ip(request_scope("10.0.0.1", header))

    # 10.0.0.2 (trusted) wrote the malformed entry: it is the last good address.
    assert address == ipaddress.ip_address("10.0.0.2")


@override_settings(GATEWAY_TRUSTED_PROXIES=TRUSTED)
def test_a_malformed_entry_right_at_the_peer_leaves_the_peer_as_the_client():
    address = client_ip(request_scope("10.0.0.1", "203.0.113.5, unknown"))

    assert address == ipaddress.ip_address("10.0.0.1")


@override_settings(GATEWAY_TRUSTED_PROXIES=TRUSTED)
def test_several_forwarded_for_headers_are_read_as_one_list_in_order():
    scope = request_scope("10.0.0.1", "198.51.100.7, 203.0.113.5", "10.0.0.3")

    assert client_ip(scope) == ipaddress.ip_address("203.0.113.5")


@override_settings(GATEWAY_TRUSTED_PROXIES=["10.0.0.1"])
def test_a_trusted_peer_that_forwards_nothing_is_the_client():
    assert client_ip(request_scope("10.0.0.1")) == ipaddress.ip_address("10.0.0.1")


@given(address=plain_addresses, port=entry_ports)
def test_a_forwarded_entry_is_read_with_or_without_port_and_brackets(address, port):
    assert parse_hop(hop_text(address, port)) == (address, port or 0)


def test_bracketed_ipv6_without_a_port_is_read():
    assert parse_hop("[2001:db8::1]") == (ipaddress.ip_address("2001:db8::1"), 0)


@pytest.mark.parametrize(
    "entry",
    ["", "unknown", "1.2.3.4:", "1.2.3.4:99999", "1.2.3.4:８０", "[::1", "[::1]x",
     "[::1]:", "01.2.3.4", "203.0.113.5/24"],
)  # fmt: skip
def test_a_malformed_entry_is_not_an_address(entry):
    assert parse_hop(entry) is None


@override_settings(GATEWAY_TRUSTED_PROXIES=[])
def test_an_ipv4_mapped_peer_is_matched_against_ipv4_ranges():
    scope = request_scope("::ffff:203.0.113.5")

    assert ip_allowed(scope, ("203.0.113.0/24",))


@given(
    peer=plain_addresses,
    networks=st.lists(
        st.tuples(plain_addresses, st.integers(min_value=0, max_value=128)), max_size=4
    ),
)
@override_settings(GATEWAY_TRUSTED_PROXIES=[])
def test_a_peer_is_allowed_exactly_when_a_network_of_the_allowlist_holds_it(
    peer, networks
):
    allowlist = tuple(
        str(ipaddress.ip_network(f"{a}/{min(bits, a.max_prefixlen)}", strict=False))
        for a, bits in networks
    )

    allowed = ip_allowed(request_scope(peer), allowlist)

    expected = any(peer in ipaddress.ip_network(net) for net in allowlist)
    assert allowed == expected


@override_settings(GATEWAY_TRUSTED_PROXIES=[])
def test_a_request_without_a_peer_address_is_refused():
    assert not ip_allowed({"type": "http", "headers": []}, ("0.0.0.0/0", "::/0"))
    assert not ip_allowed(request_scope("not-an-ip"), ("0.0.0.0/0", "::/0"))


@override_settings(GATEWAY_TRUSTED_PROXIES=[])
def test_a_malformed_allowlist_refuses_rather_than_fails():
    assert not ip_allowed(request_scope("203.0.113.5"), ("203.0.113.0/24", "nope"))


@override_settings(GATEWAY_TRUSTED_PROXIES=["127.0.0.1"])
@pytest.mark.parametrize(
    ("client", "header"),
    [
        (("203.0.113.5", 0), "203.0.113.5"),  # uvicorn, entry without a port
        (("203.0.113.5", 4444), "198.51.100.1, 203.0.113.5:4444"),  # uvicorn, with
        (("203.0.113.5", 0), "203.0.113.5, 127.0.0.1"),  # daphne --proxy-headers
    ],
)
def test_a_client_address_the_server_rewrote_is_refused_and_logged_once(
    client, header, caplog
):
    scope = {
        "type": "http",
        "client": client,
        "headers": [(b"x-forwarded-for", header.encode())],
    }
    client_address._warn_server_rewrites.cache_clear()

    allowed = [ip_allowed(scope, ("203.0.113.0/24",)) for _ in range(3)]

    assert allowed == [False, False, False]
    warnings = [r for r in caplog.records if "--no-proxy-headers" in r.getMessage()]
    assert len(warnings) == 1


@override_settings(GATEWAY_TRUSTED_PROXIES=["127.0.0.1"])
def test_a_peer_that_appears_in_its_own_forwarded_chain_is_still_believed():
    # A client behind a local trusted proxy: the proxy forwards 127.0.0.1.
    scope = request_scope("127.0.0.1", "127.0.0.1")

    assert client_ip(scope) == ipaddress.ip_address("127.0.0.1")


@override_settings(GATEWAY_TRUSTED_PROXIES=["10.0.0.1", "not-a-network"])
def test_an_invalid_trusted_proxies_setting_is_a_configuration_error():
    with pytest.raises(ImproperlyConfigured, match="GATEWAY_TRUSTED_PROXIES"):
        client_ip(request_scope("10.0.0.1", "203.0.113.5"))


@override_settings(GATEWAY_TRUSTED_PROXIES="10.0.0.0/8, fd00::/8")
def test_the_trusted_proxies_setting_may_be_a_comma_separated_string():
    scope = request_scope("fd00::1", "203.0.113.5, 10.1.2.3")

    assert client_ip(scope) == ipaddress.ip_address("203.0.113.5")


@override_settings(GATEWAY_TRUSTED_PROXIES=["10.0.0.0/8"])
def test_networks_are_parsed_once_not_per_request():
    client_address.parse_networks.cache_clear()
    client_address._proxy_networks.cache_clear()
    scope = request_scope("10.0.0.1", "203.0.113.5")
    real = ipaddress.ip_network

    with mock.patch.object(
        client_address.ipaddress, "ip_network", side_effect=real
    ) as ip_network:
        results = [ip_allowed(scope, ("203.0.113.0/24",)) for _ in range(5)]

    assert results == [True] * 5
    assert ip_network.call_count == 2  # the allowlist and the trusted proxies, once
