"""keys.services: issuing, revoking, rotating and limiting keys, seen through the
selectors the relay uses (`key_info_for_secret`, `KeyInfo.is_usable`)."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from django.core.exceptions import ValidationError
from django.utils import timezone

from keys.models import ApiKey, Quota
from keys.secrets import hash_secret
from keys.selectors import key_info_for_secret
from keys.services import (
    QuotaSpec,
    issue_key,
    quota_specs,
    revoke_key,
    rotate_key,
    set_key_limits,
)
from relay.generation import read_config_generation
from tests import factories

pytestmark = pytest.mark.django_db


def quotas_of(key: ApiKey) -> set[tuple[str, str, Decimal]]:
    return {(q.metric, q.period, q.limit) for q in Quota.objects.filter(key=key)}


def test_an_issued_key_is_found_by_its_secret_and_stores_only_prefix_and_hash():
    issued = issue_key(name="  billing app  ", models=["gpt-4o-mini"])

    info = key_info_for_secret(issued.secret)
    row = ApiKey.objects.get(pk=issued.key.pk)
    assert info is not None and info.id == row.pk
    assert info.is_usable(timezone.now())
    assert row.name == "billing app"
    assert issued.secret.startswith(f"sk-gw-{row.prefix}-")
    assert row.secret_hash == hash_secret(issued.secret)
    assert issued.secret not in repr(issued)


def test_a_key_without_a_name_is_refused():
    with pytest.raises(ValidationError):
        issue_key(name="   ")

    assert not ApiKey.objects.exists()


def test_a_secret_that_matches_no_key_finds_nothing():
    key, secret = factories.make_key()
    forged = secret[:-4] + ("aaaa" if not secret.endswith("aaaa") else "bbbb")

    found = [key_info_for_secret(forged), key_info_for_secret("sk-not-a-gateway-key")]

    assert found == [None, None]


def test_a_revoked_key_is_no_longer_usable(django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        key, secret = factories.make_key()  # the generation row exists from here
    before = read_config_generation()

    with django_capture_on_commit_callbacks(execute=True):
        revoke_key(key=key)

    info = key_info_for_secret(secret)
    assert info is not None and info.revoked
    assert not info.is_usable(timezone.now())
    assert read_config_generation() == before + 1


def test_revoking_a_key_twice_changes_nothing_the_second_time(
    django_capture_on_commit_callbacks,
):
    key, _ = factories.make_key()
    with django_capture_on_commit_callbacks(execute=True):
        revoke_key(key=key)
    revoked_at = ApiKey.objects.get(pk=key.pk).revoked_at
    generation = read_config_generation()

    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        revoke_key(key=ApiKey.objects.get(pk=key.pk))

    assert ApiKey.objects.get(pk=key.pk).revoked_at == revoked_at
    assert callbacks == []
    assert read_config_generation() == generation


def test_an_expired_key_is_not_usable():
    now = timezone.now()
    _, secret = factories.make_key(expires_at=now + timedelta(minutes=5))

    info = key_info_for_secret(secret)

    assert info is not None
    assert info.is_usable(now)
    assert not info.is_usable(now + timedelta(minutes=5))


def test_rotating_with_grace_keeps_the_old_secret_valid_until_the_grace_ends():
    key, old_secret = factories.make_key()

    rotated = rotate_key(key=key, grace_seconds=60)

    row = ApiKey.objects.get(pk=key.pk)
    old, new = key_info_for_secret(old_secret), key_info_for_secret(rotated.secret)
    assert rotated.key.pk == key.pk and rotated.secret != old_secret
    assert old is not None and new is not None and old.id == new.id == key.pk
    assert old.valid_until == row.previous_valid_until
    now = timezone.now()
    assert row.previous_valid_until - now <= timedelta(seconds=60)
    assert old.is_usable(now) and new.is_usable(now)
    assert not old.is_usable(row.previous_valid_until)
    assert new.is_usable(row.previous_valid_until)


def test_rotating_without_grace_retires_the_old_secret_at_once():
    key, old_secret = factories.make_key()

    rotated = rotate_key(key=key)

    assert key_info_for_secret(old_secret) is None
    new = key_info_for_secret(rotated.secret)
    assert new is not None and new.id == key.pk and new.valid_until is None


def test_a_second_rotation_without_grace_also_drops_the_first_grace_secret():
    key, first = factories.make_key()
    second = rotate_key(key=key, grace_seconds=3600).secret

    third = rotate_key(key=ApiKey.objects.get(pk=key.pk)).secret

    found = [key_info_for_secret(s) is not None for s in (first, second, third)]
    assert found == [False, False, True]


def test_a_revoked_key_cannot_be_rotated():
    key, secret = factories.make_key()
    revoke_key(key=key)

    with pytest.raises(ValidationError):
        rotate_key(key=ApiKey.objects.get(pk=key.pk), grace_seconds=60)

    assert key_info_for_secret(secret) is not None
    assert ApiKey.objects.get(pk=key.pk).previous_prefix == ""


def test_a_negative_grace_period_is_refused():
    key, secret = factories.make_key()

    with pytest.raises(ValidationError):
        rotate_key(key=key, grace_seconds=-1)

    assert ApiKey.objects.get(pk=key.pk).secret_hash == hash_secret(secret)


def test_rpm_tpm_and_budget_stand_for_the_spec_quotas():
    specs = quota_specs(
        rpm=60, tpm=1000, budget_usd=Decimal("12.34"), budget_period="day"
    )

    assert specs == [
        QuotaSpec("requests", "minute", Decimal(60)),
        QuotaSpec("tokens", "minute", Decimal(1000)),
        QuotaSpec("cost_usd", "day", Decimal("12.34")),
    ]


def test_a_budget_period_outside_day_month_total_is_refused():
    with pytest.raises(ValidationError):
        quota_specs(budget_usd=Decimal(5), budget_period="minute")


def test_set_key_limits_replaces_the_quotas(django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        key, secret = factories.make_key(
            quotas=quota_specs(rpm=10, budget_usd=Decimal(5))
        )
    generation = read_config_generation()

    with django_capture_on_commit_callbacks(execute=True):
        set_key_limits(key=key, quotas=quota_specs(tpm=500), allowed_models=["a"])

    assert quotas_of(key) == {("tokens", "minute", Decimal(500))}
    info = key_info_for_secret(secret)
    assert info is not None and info.allowed_models == ("a",)
    assert [(q.metric, q.period) for q in info.quotas] == [("tokens", "minute")]
    assert read_config_generation() == generation + 1


def test_set_key_limits_without_quotas_keeps_the_quotas():
    key, _ = factories.make_key(quotas=quota_specs(rpm=10))

    set_key_limits(key=key, log_bodies=True)

    assert quotas_of(key) == {("requests", "minute", Decimal(10))}
    assert ApiKey.objects.get(pk=key.pk).log_bodies is True


def test_set_key_limits_refuses_fields_that_are_not_editable():
    key, _ = factories.make_key()
    prefix = key.prefix

    with pytest.raises(ValidationError):
        set_key_limits(key=key, prefix="AAAAAAAA")

    assert ApiKey.objects.get(pk=key.pk).prefix == prefix


def test_a_negative_quota_limit_is_refused_and_nothing_is_issued():
    with pytest.raises(ValidationError):
        issue_key(
            name="negative", quotas=[QuotaSpec("requests", "minute", Decimal(-1))]
        )

    assert not ApiKey.objects.filter(name="negative").exists()


def test_team_quotas_reach_the_keys_of_the_team():
    team = factories.make_team("research")
    Quota.objects.create(
        team=team, metric="cost_usd", period="month", limit=Decimal(100)
    )
    _, secret = factories.make_key(team=team, quotas=quota_specs(rpm=5))

    info = key_info_for_secret(secret)

    assert info is not None and info.team_id == team.pk
    assert {(q.scope, q.metric, q.period, q.limit) for q in info.quotas} == {
        ("key", "requests", "minute", Decimal(5)),
        ("team", "cost_usd", "month", Decimal(100)),
    }
