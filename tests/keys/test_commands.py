"""`createkey` and `revokekey`, driven as the SPEC writes them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from io import StringIO

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from django.utils import timezone

from keys.models import ApiKey, Quota, Team
from keys.secrets import parse_prefix
from keys.selectors import key_info_for_secret
from relay.generation import read_config_generation
from tests import factories
from tests.support import gateway as gateway_support
from tests.support.servers import PROJECT_ROOT

SECRET_FORMAT = re.compile(r"^sk-gw-[A-Za-z0-9]{8}-[A-Za-z0-9_-]{32,}$")


def createkey(*args: str) -> tuple[str, list[str]]:
    """The secret (the last line) and every line the command printed."""
    out = StringIO()
    call_command("createkey", *args, stdout=out)
    lines = out.getvalue().splitlines()
    return lines[-1], lines


def revokekey(name_or_prefix: str) -> str:
    out = StringIO()
    call_command("revokekey", name_or_prefix, stdout=out)
    return out.getvalue()


def apikey_table_cells() -> list[str]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT * FROM keys_apikey")
        return [str(cell) for row in cursor.fetchall() for cell in row]


# --- createkey ------------------------------------------------------------------------


@pytest.mark.django_db
def test_createkey_prints_the_secret_alone_on_the_last_line():
    secret, lines = createkey("--name", "billing")

    assert SECRET_FORMAT.match(secret)
    assert lines[-1] == secret
    assert all(secret not in line for line in lines[:-1])
    info = key_info_for_secret(secret)
    assert info is not None and info.name == "billing"


@pytest.mark.django_db
def test_the_database_keeps_the_prefix_and_a_hash_never_the_secret():
    secret, _ = createkey("--name", "billing")
    random_part = secret.split("-", 3)[3]

    cells = apikey_table_cells()

    key = ApiKey.objects.get(name="billing")
    assert secret.startswith(f"sk-gw-{key.prefix}-")
    assert key.prefix in cells
    assert not any(secret in cell or random_part in cell for cell in cells)


@pytest.mark.django_db
def test_rpm_tpm_and_budget_become_the_keys_quotas():
    createkey(
        "--name", "limited", "--rpm", "60", "--tpm", "40000",
        "--budget-usd", "12.34", "--budget-period", "day",
    )  # fmt: skip

    quotas = Quota.objects.filter(key__name="limited")

    assert {(q.metric, q.period, q.limit) for q in quotas} == {
        ("requests", "minute", Decimal(60)),
        ("tokens", "minute", Decimal(40000)),
        ("cost_usd", "day", Decimal("12.34")),
    }
    budget = quotas.get(metric="cost_usd")
    assert (
        isinstance(budget.limit, Decimal) and str(budget.limit.normalize()) == "12.34"
    )


@pytest.mark.django_db
def test_every_metric_and_period_can_be_given_with_quota():
    every = [(m, p) for m in Quota.Metric.values for p in Quota.Period.values]
    args = [a for i, (m, p) in enumerate(every) for a in ("--quota", f"{m}:{p}:{i}.5")]

    createkey("--name", "all-kinds", *args)

    quotas = Quota.objects.filter(key__name="all-kinds")
    assert {(q.metric, q.period, q.limit) for q in quotas} == {
        (m, p, Decimal(f"{i}.5")) for i, (m, p) in enumerate(every)
    }


@pytest.mark.django_db
def test_quota_adds_to_rpm_tpm_and_budget():
    createkey(
        "--name", "mixed", "--rpm", "60", "--budget-usd", "5",
        "--quota", "requests:hour:1000", "--quota", "cost_usd:day:1.25",
    )  # fmt: skip

    quotas = Quota.objects.filter(key__name="mixed")
    assert {(q.metric, q.period, q.limit) for q in quotas} == {
        ("requests", "minute", Decimal(60)),
        ("requests", "hour", Decimal(1000)),
        ("cost_usd", "month", Decimal(5)),
        ("cost_usd", "day", Decimal("1.25")),
    }


@pytest.mark.django_db
def test_the_allowlist_and_unpriced_use_are_set_on_the_key():
    createkey(
        "--name", "fenced", "--ip-allowlist", "10.0.0.0/8, 192.168.1.7",
        "--allow-unpriced",
    )  # fmt: skip

    key = ApiKey.objects.get(name="fenced")
    assert key.ip_allowlist == ["10.0.0.0/8", "192.168.1.7/32"]
    assert key.allow_unpriced is True
    assert ApiKey.objects.get(pk=createkey_key("plain").pk).allow_unpriced is False


def createkey_key(name: str) -> ApiKey:
    createkey("--name", name)
    return ApiKey.objects.get(name=name)


@pytest.mark.django_db
def test_the_budget_period_is_a_month_unless_given():
    createkey("--name", "monthly", "--budget-usd", "100")

    budget = Quota.objects.get(key__name="monthly")

    assert (budget.metric, budget.period, budget.limit) == (
        "cost_usd",
        "month",
        Decimal(100),
    )


@pytest.mark.django_db
def test_a_key_without_limits_has_no_quotas_and_allows_every_model():
    createkey("--name", "open")

    key = ApiKey.objects.get(name="open")

    assert not key.quotas.exists()
    assert key.allowed_models == []
    assert key.team is None and key.owner is None and key.expires_at is None


@pytest.mark.django_db
def test_models_are_stored_as_the_keys_allowed_models():
    secret, _ = createkey("--name", "narrow", "--models", "gpt-4o-mini, router/*")

    info = key_info_for_secret(secret)

    assert ApiKey.objects.get(name="narrow").allowed_models == [
        "gpt-4o-mini",
        "router/*",
    ]
    assert info is not None
    assert info.allows_model("gpt-4o-mini") and info.allows_model("router/llama")
    assert not info.allows_model("gpt-4o")


@pytest.mark.django_db
def test_a_team_is_created_once_and_reused():
    createkey("--name", "first", "--team", "research")
    createkey("--name", "second", "--team", "research")

    team = Team.objects.get(name="research")

    assert Team.objects.count() == 1
    assert set(team.api_keys.values_list("name", flat=True)) == {"first", "second"}


@pytest.mark.django_db
def test_the_owner_is_found_by_username():
    alice = get_user_model().objects.create_user("alice")

    createkey("--name", "alices", "--owner", "alice")

    assert ApiKey.objects.get(name="alices").owner == alice


@pytest.mark.django_db
def test_an_unknown_owner_is_refused_and_nothing_is_written():
    with pytest.raises(CommandError, match="nobody"):
        createkey("--name", "orphan", "--owner", "nobody", "--team", "new-team")

    assert not ApiKey.objects.exists()
    assert not Team.objects.exists()


@pytest.mark.django_db
def test_the_expiry_is_stored_as_the_instant_given():
    createkey("--name", "temporary", "--expires", "2030-06-30T12:00:00+02:00")

    key = ApiKey.objects.get(name="temporary")

    assert key.expires_at == datetime(2030, 6, 30, 10, 0, tzinfo=UTC)


@pytest.mark.django_db
def test_a_key_that_expired_already_is_issued_but_not_usable():
    secret, _ = createkey("--name", "stale", "--expires", "2000-01-01T00:00:00Z")

    info = key_info_for_secret(secret)

    assert info is not None and not info.is_usable(timezone.now())


@pytest.mark.django_db
@pytest.mark.parametrize(
    "expires", ["2030-06-30T12:00:00", "next tuesday", "2030-13-01T00:00:00+00:00"]
)
def test_an_expiry_without_offset_or_not_iso_is_refused(expires):
    with pytest.raises(CommandError, match="--expires"):
        createkey("--name", "bad-expiry", "--expires", expires)

    assert not ApiKey.objects.exists()


@pytest.mark.django_db
def test_a_refused_createkey_leaves_no_team_behind():
    with pytest.raises(CommandError):
        createkey("--name", "bad", "--team", "ghost-team", "--expires", "garbage")

    assert not Team.objects.filter(name="ghost-team").exists()


@pytest.mark.django_db
@pytest.mark.parametrize("budget", ["twelve", "NaN", "-5"])
def test_a_budget_that_is_not_a_non_negative_number_is_refused(budget):
    with pytest.raises(CommandError):
        createkey("--name", "bad-budget", "--budget-usd", budget)

    assert not ApiKey.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize(
    "args",
    [
        ["--rpm", "-1"],
        ["--tpm", "ten"],
        ["--budget-usd", "5", "--budget-period", "week"],
        ["--quota", "requests:hour"],
        ["--quota", "requests:week:5"],
        ["--quota", "calls:hour:5"],
        ["--quota", "tokens:hour:many"],
        ["--quota", "tokens:hour:-1"],
        ["--rpm", "5", "--quota", "requests:minute:9"],
        ["--ip-allowlist", "10.0.0.300"],
    ],
)
def test_bad_limits_are_refused(args):
    with pytest.raises(CommandError):
        createkey("--name", "bad-limits", *args)

    assert not ApiKey.objects.exists()


@pytest.mark.django_db
def test_a_name_is_required():
    with pytest.raises(CommandError):
        createkey("--rpm", "5")

    assert not ApiKey.objects.exists()


def test_createkey_as_a_process_ends_its_stdout_with_the_secret(transactional_db):
    env = {**os.environ, "DATABASE_URL": gateway_support.database_url_for_tests()}
    argv = [sys.executable, "manage.py", "createkey", "--name", "from-the-shell"]
    argv += ["--team", "ops", "--rpm", "5"]

    done = subprocess.run(
        argv, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=60
    )

    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    secret = lines[-1]
    assert SECRET_FORMAT.match(secret)
    assert (done.stdout + done.stderr).count(secret) == 1
    info = key_info_for_secret(secret)
    assert info is not None and info.name == "from-the-shell"
    assert ApiKey.objects.get(pk=info.id).team.name == "ops"


def test_a_refused_createkey_process_prints_no_secret_and_fails(transactional_db):
    env = {**os.environ, "DATABASE_URL": gateway_support.database_url_for_tests()}
    argv = [
        sys.executable,
        "manage.py",
        "createkey",
        "--name",
        "x",
        "--owner",
        "nobody",
    ]

    done = subprocess.run(
        argv, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=60
    )

    assert done.returncode != 0
    assert "sk-gw-" not in done.stdout + done.stderr
    assert not ApiKey.objects.exists()


# --- revokekey ------------------------------------------------------------------------


@pytest.mark.django_db
def test_revokekey_revokes_by_name(django_capture_on_commit_callbacks):
    key, secret = factories.make_key(name="billing")
    other, other_secret = factories.make_key(name="reports")

    with django_capture_on_commit_callbacks(execute=True):
        output = revokekey("billing")

    assert "billing" in output and key.prefix in output
    assert key_info_for_secret(secret).revoked
    assert not key_info_for_secret(other_secret).revoked


@pytest.mark.django_db
def test_revokekey_revokes_by_prefix():
    key, secret = factories.make_key(name="billing")

    revokekey(key.prefix)

    assert key_info_for_secret(secret).revoked


@pytest.mark.django_db
def test_revokekey_revokes_by_the_whole_secret_without_printing_it():
    key, secret = factories.make_key(name="billing")

    output = revokekey(secret)

    assert key_info_for_secret(secret).revoked
    assert secret not in output


@pytest.mark.django_db
def test_revokekey_refuses_an_unknown_key():
    key, secret = factories.make_key(name="billing")

    with pytest.raises(CommandError):
        revokekey("nothing-by-this-name")

    assert not key_info_for_secret(secret).revoked


@pytest.mark.django_db
def test_revokekey_refuses_a_name_two_keys_share_and_revokes_neither():
    _, first = factories.make_key(name="shared")
    _, second = factories.make_key(name="shared")

    with pytest.raises(CommandError, match="prefix"):
        revokekey("shared")

    assert not key_info_for_secret(first).revoked
    assert not key_info_for_secret(second).revoked


@pytest.mark.django_db
def test_a_shared_name_can_still_be_revoked_one_key_at_a_time_by_prefix():
    first, first_secret = factories.make_key(name="shared")
    _, second_secret = factories.make_key(name="shared")

    revokekey(first.prefix)

    assert key_info_for_secret(first_secret).revoked
    assert not key_info_for_secret(second_secret).revoked


def test_revokekey_moves_the_config_generation_on_commit(transactional_db):
    factories.make_key(name="billing")
    before = read_config_generation()

    revokekey("billing")

    assert read_config_generation() == before + 1


def test_revoking_a_revoked_key_again_changes_nothing(transactional_db):
    key, _ = factories.make_key(name="billing")
    revokekey("billing")
    revoked_at = ApiKey.objects.get(pk=key.pk).revoked_at
    generation = read_config_generation()

    output = revokekey("billing")

    assert "already revoked" in output
    assert ApiKey.objects.get(pk=key.pk).revoked_at == revoked_at
    assert read_config_generation() == generation


@pytest.mark.django_db
def test_rotatekey_prints_the_new_secret_last_and_keeps_the_old_one_for_the_grace():
    key, old_secret = factories.make_key(name="rotating")
    out = StringIO()

    call_command("rotatekey", "rotating", "--grace-seconds", "60", stdout=out)

    new_secret = out.getvalue().strip().splitlines()[-1]
    assert new_secret != old_secret and parse_prefix(new_secret) is not None
    now = timezone.now()
    new_info, old_info = (
        key_info_for_secret(new_secret),
        key_info_for_secret(old_secret),
    )
    assert new_info is not None and new_info.is_usable(now)
    assert old_info is not None and old_info.is_usable(now)
    assert not old_info.is_usable(now + timedelta(seconds=61))
