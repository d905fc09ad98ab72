"""keys.secrets: the secret's format, its public prefix and its keyed hash."""

from __future__ import annotations

import hmac
import re
import string
from unittest import mock

from hypothesis import given
from hypothesis import strategies as st

from keys.secrets import hash_secret, make_secret, parse_prefix, verify_secret

SPEC_FORMAT = re.compile(r"^sk-gw-[A-Za-z0-9]{8}-[A-Za-z0-9_-]{32,}$")
# The SPEC sets no upper bound; the gateway refuses random parts over 200 characters
# (it issues 43), so that a client cannot make it hash megabytes.
ACCEPTED = re.compile(r"sk-gw-[A-Za-z0-9]{8}-[A-Za-z0-9_-]{32,200}")
ALNUM = string.ascii_letters + string.digits
prefixes = st.text(alphabet=ALNUM, min_size=8, max_size=8)
tails = st.text(alphabet=ALNUM + "_-", min_size=32, max_size=200)


def test_a_new_secret_has_the_spec_format_and_carries_its_prefix():
    secret = make_secret()

    assert SPEC_FORMAT.fullmatch(secret.value)
    assert secret.value.startswith(f"sk-gw-{secret.prefix}-")
    assert len(secret.value.split("-", 3)[3]) >= 32


def test_new_secrets_and_their_prefixes_do_not_repeat():
    secrets = [make_secret() for _ in range(500)]

    assert len({s.value for s in secrets}) == 500
    assert len({s.prefix for s in secrets}) == 500


def test_a_secrets_repr_does_not_show_its_value():
    secret = make_secret()

    assert secret.value not in repr(secret)
    assert secret.prefix in repr(secret)


def test_the_prefix_of_a_fresh_secret_is_parsed_back():
    secret = make_secret()

    assert parse_prefix(secret.value) == secret.prefix


@given(prefix=prefixes, tail=tails)
def test_every_well_formed_secret_yields_its_prefix(prefix, tail):
    assert parse_prefix(f"sk-gw-{prefix}-{tail}") == prefix


@given(text=st.text())
def test_parse_prefix_never_raises_and_accepts_only_the_format(text):
    prefix = parse_prefix(text)

    if prefix is not None:
        assert SPEC_FORMAT.fullmatch(text) and ACCEPTED.fullmatch(text)
        assert text.startswith(f"sk-gw-{prefix}-")


@given(
    core=st.builds(lambda p, t: f"sk-gw-{p}-{t}", prefixes, tails),
    before=st.text(),
    after=st.text(),
)
def test_text_around_a_secret_makes_it_malformed(core, before, after):
    text = before + core + after

    prefix = parse_prefix(text)

    assert (prefix is not None) == bool(ACCEPTED.fullmatch(text))


def test_a_secret_followed_by_a_newline_has_no_prefix():
    value = make_secret().value + "\n"

    assert parse_prefix(value) is None


def test_malformed_secrets_have_no_prefix():
    good = make_secret().value
    malformed = [
        "",
        "sk-gw-",
        "sk-gw-abcdefgh-" + "x" * 31,  # random part too short
        "sk-gw-abcdefg-" + "x" * 40,  # prefix too short
        "sk-gw-abcdefghi-" + "x" * 40,  # prefix too long
        "sk-gw-abc!efgh-" + "x" * 40,  # prefix outside the alphabet
        "sk-gw-abcdefgh-" + "x" * 39 + "!",  # random part outside the alphabet
        "sk-abcdefgh-" + "x" * 40,
        "Bearer " + good,
        " " + good,
        good + " ",
    ]

    parsed = {value: parse_prefix(value) for value in malformed}

    assert parsed == dict.fromkeys(malformed)


def test_the_hash_is_keyed_by_the_gateway_hash_secret(settings):
    value = make_secret().value
    settings.GATEWAY_KEY_HASH_SECRET = "first-hash-secret"
    first = hash_secret(value)

    settings.GATEWAY_KEY_HASH_SECRET = "second-hash-secret"
    second = hash_secret(value)

    assert first != second
    assert value not in first and value not in second
    assert re.fullmatch(r"[0-9a-f]{64}", first)


def test_a_hash_verifies_only_its_own_secret_under_its_own_hash_secret(settings):
    settings.GATEWAY_KEY_HASH_SECRET = "first-hash-secret"
    value, other = make_secret().value, make_secret().value
    stored = hash_secret(value)

    mine, theirs, empty = (
        verify_secret(value, stored),
        verify_secret(other, stored),
        verify_secret(value, ""),
    )
    settings.GATEWAY_KEY_HASH_SECRET = "second-hash-secret"
    after_change = verify_secret(value, stored)

    assert (mine, theirs, empty, after_change) == (True, False, False, False)


def test_verify_secret_compares_hashes_in_constant_time():
    value = make_secret().value
    stored = hash_secret(value)

    with mock.patch(
        "keys.secrets.hmac.compare_digest", wraps=hmac.compare_digest
    ) as compare:
        verified = verify_secret(value, stored)

    assert verified is True
    compare.assert_called_once_with(stored, stored)
