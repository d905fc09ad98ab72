"""Every state change of keys, teams and quotas. Admin, REST and the commands call
these; none of them writes a key row itself.

Each change of a key is audited here, in its own transaction (`keys.audit`): `by`
is the user who acted (None for the command line and scripts) and `via` the
interface (`admin`, `api`, `cli`). Callers that pass neither are the management
commands and scripts, hence `via="cli"` by default.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from keys.audit import Actor, changes, key_state, record_event
from keys.models import KEY_SETTINGS, ApiKey, KeyEvent, Quota, Team
from keys.secrets import hash_secret, make_secret
from relay.generation import bump_config_generation

logger = logging.getLogger(__name__)

# A week: long enough to redeploy every app that holds the old secret, short enough
# that a leaked secret does not stay valid by accident.
MAX_GRACE_SECONDS = 7 * 24 * 3600

# The fields `set_key_limits` may change.
EDITABLE_FIELDS = frozenset(KEY_SETTINGS)

# Quota limits are stored with 20 digits, 10 of them after the point.
QUOTA_LIMIT_CEILING = Decimal(10) ** 10

Via = KeyEvent.Via


@dataclass(frozen=True)
class IssuedKey:
    key: ApiKey
    secret: str

    def __repr__(self) -> str:
        return f"IssuedKey(key={self.key!r}, secret='…')"


@dataclass(frozen=True)
class QuotaSpec:
    metric: str
    period: str
    limit: Decimal


def quota_specs(
    *,
    rpm: int | None = None,
    tpm: int | None = None,
    budget_usd: Decimal | None = None,
    budget_period: str = "month",
) -> list[QuotaSpec]:
    """The quotas that `--rpm`, `--tpm` and `--budget-usd` stand for."""
    specs = []
    if rpm is not None:
        specs.append(
            QuotaSpec(Quota.Metric.REQUESTS, Quota.Period.MINUTE, Decimal(rpm))
        )
    if tpm is not None:
        specs.append(QuotaSpec(Quota.Metric.TOKENS, Quota.Period.MINUTE, Decimal(tpm)))
    if budget_usd is not None:
        if budget_period not in {"day", "month", "total"}:
            raise ValidationError("budget period must be day, month or total")
        specs.append(
            QuotaSpec(Quota.Metric.COST_USD, budget_period, Decimal(budget_usd))
        )
    return specs


@transaction.atomic
def issue_key(
    *,
    name: str,
    owner: AbstractBaseUser | None = None,
    team: Team | None = None,
    models: Sequence[str] = (),
    ip_allowlist: Sequence[str] = (),
    expires_at: datetime | None = None,
    quotas: Iterable[QuotaSpec] = (),
    log_bodies: bool = False,
    allow_unpriced: bool = False,
    by: Actor = None,
    via: str = Via.CLI,
) -> IssuedKey:
    """Create a key and return it with its secret; the secret is never stored or shown again."""
    name = _clean_name(name)
    _check_expiry(expires_at)
    secret = make_secret()
    key = ApiKey.objects.create(
        name=name,
        owner=owner,
        team=team,
        prefix=secret.prefix,
        secret_hash=hash_secret(secret.value),
        allowed_models=_clean_models(models),
        ip_allowlist=clean_networks(ip_allowlist),
        expires_at=expires_at,
        log_bodies=log_bodies,
        allow_unpriced=allow_unpriced,
        created_by=_user(by),
    )
    _replace_quotas(key=key, quotas=quotas)
    record_event(
        key=key,
        action=KeyEvent.Action.ISSUED,
        by=by,
        via=via,
        details={"prefix": key.prefix, **key_state(key)},
    )
    bump_config_generation()
    logger.info("key issued", extra={"key_id": key.pk, "key_prefix": key.prefix})
    return IssuedKey(key=key, secret=secret.value)


@transaction.atomic
def revoke_key(*, key: ApiKey, by: Actor = None, via: str = Via.CLI) -> bool:
    """Revoke a key for good; every worker refuses it within a second.

    Idempotent: True when this call revoked it, False when it already was.
    """
    if not _revoke(key=key, by=by, via=via):
        return False
    # Every worker drops its snapshots when the generation moves: refused within 1 s.
    bump_config_generation()
    return True


@transaction.atomic
def revoke_keys(
    *, keys: Iterable[ApiKey], by: Actor = None, via: str = Via.CLI
) -> list[ApiKey]:
    """Revoke several keys at once (admin's bulk action); returns those this call
    revoked. Each gets its own audit event; the workers reload once."""
    revoked = [key for key in keys if _revoke(key=key, by=by, via=via)]
    if revoked:
        bump_config_generation()
    return revoked


def _revoke(*, key: ApiKey, by: Actor, via: str) -> bool:
    # The row, locked: two admins revoking at once write one revocation, one event.
    current = ApiKey.objects.select_for_update().only("revoked_at").get(pk=key.pk)
    if current.revoked_at is not None:
        key.revoked_at = current.revoked_at
        return False
    key.revoked_at, key.revoked_by = timezone.now(), _user(by)
    key.save(update_fields=["revoked_at", "revoked_by", "updated_at"])
    record_event(
        key=key,
        action=KeyEvent.Action.REVOKED,
        by=by,
        via=via,
        details={"prefix": key.prefix, "revoked_at": key.revoked_at.isoformat()},
    )
    logger.info("key revoked", extra={"key_id": key.pk, "key_prefix": key.prefix})
    return True


@transaction.atomic
def rotate_key(
    *,
    key: ApiKey,
    grace_seconds: int = 0,
    by: Actor = None,
    via: str = Via.CLI,
) -> IssuedKey:
    """Give the key a new secret; the old one keeps working for `grace_seconds`.

    The key keeps its id, limits, quotas and usage. A secret still inside an earlier
    grace period stops working now: only the secret just replaced gets one.
    """
    if grace_seconds < 0:
        raise ValidationError("grace_seconds must not be negative")
    if grace_seconds > MAX_GRACE_SECONDS:
        raise ValidationError(
            f"grace_seconds must be at most {MAX_GRACE_SECONDS} (a week)"
        )
    current = (
        ApiKey.objects.select_for_update()
        .only("revoked_at", "prefix", "secret_hash")
        .get(pk=key.pk)
    )
    if current.revoked_at is not None:
        raise ValidationError("a revoked key cannot be rotated")
    secret = make_secret()
    old_prefix = current.prefix
    if grace_seconds:
        key.previous_prefix, key.previous_secret_hash = old_prefix, current.secret_hash
        key.previous_valid_until = timezone.now() + timedelta(seconds=grace_seconds)
    else:
        key.previous_prefix, key.previous_secret_hash = "", ""
        key.previous_valid_until = None
    key.prefix, key.secret_hash = secret.prefix, hash_secret(secret.value)
    key.save(
        update_fields=[
            "prefix",
            "secret_hash",
            "previous_prefix",
            "previous_secret_hash",
            "previous_valid_until",
            "updated_at",
        ]
    )
    valid_until = key.previous_valid_until
    record_event(
        key=key,
        action=KeyEvent.Action.ROTATED,
        by=by,
        via=via,
        details={
            "prefix": key.prefix,
            "previous_prefix": old_prefix,
            "grace_seconds": grace_seconds,
            "previous_valid_until": valid_until.isoformat() if valid_until else None,
        },
    )
    bump_config_generation()
    logger.info("key rotated", extra={"key_id": key.pk, "key_prefix": key.prefix})
    return IssuedKey(key=key, secret=secret.value)


@transaction.atomic
def set_key_limits(
    *,
    key: ApiKey,
    quotas: Iterable[QuotaSpec] | None = None,
    by: Actor = None,
    via: str = Via.CLI,
    **fields: object,
) -> ApiKey:
    """Change a key's editable fields and, when given, replace its quotas.

    Records one `changed` event naming each field that really changed, with its
    old and new value; a call that changes nothing records nothing.
    """
    unknown = set(fields) - EDITABLE_FIELDS
    if unknown:
        raise ValidationError(f"not editable: {', '.join(sorted(unknown))}")
    if "name" in fields:
        fields["name"] = _clean_name(str(fields["name"]))
    if "allowed_models" in fields:
        fields["allowed_models"] = _clean_models(fields["allowed_models"])  # type: ignore[arg-type]
    if "ip_allowlist" in fields:
        fields["ip_allowlist"] = clean_networks(fields["ip_allowlist"])  # type: ignore[arg-type]
    if "expires_at" in fields:
        _check_expiry(fields["expires_at"])  # type: ignore[arg-type]
    specs = list(quotas) if quotas is not None else None
    # Compared with the stored row, not `key`: a ModelForm has already copied its
    # input onto the instance it passes here.
    stored = (
        # `of`: PostgreSQL locks no outer-joined (nullable) row.
        ApiKey.objects.select_for_update(of=("self",))
        .select_related("owner", "team")
        .get(pk=key.pk)
    )
    before = key_state(stored)
    changed = [name for name, value in fields.items() if getattr(stored, name) != value]
    for name in fields:
        setattr(key, name, fields[name])
    if changed:
        key.save(update_fields=[*changed, "updated_at"])
    if specs is not None:
        _replace_quotas(key=key, quotas=specs)
    diff = changes(before, key_state(key))
    if not diff:
        return key
    record_event(
        key=key,
        action=KeyEvent.Action.CHANGED,
        by=by,
        via=via,
        details={"prefix": key.prefix, "changes": diff},
    )
    bump_config_generation()
    logger.info(
        "key changed",
        extra={"key_id": key.pk, "key_prefix": key.prefix, "fields": sorted(diff)},
    )
    return key


@transaction.atomic
def upsert_team(*, name: str, quotas: Iterable[QuotaSpec] | None = None) -> Team:
    """The team of that name, created if new; its quotas replaced when given."""
    team, _ = Team.objects.get_or_create(name=_clean_name(name))
    if quotas is not None:
        _replace_quotas(team=team, quotas=quotas)
        bump_config_generation()
    return team


@transaction.atomic
def update_team(
    *,
    team: Team,
    name: str | None = None,
    quotas: Iterable[QuotaSpec] | None = None,
) -> Team:
    """Rename a team and, when given, replace its quotas (shared by its keys)."""
    if name is not None:
        name = _clean_name(name)
        if Team.objects.filter(name=name).exclude(pk=team.pk).exists():
            raise ValidationError({"name": "A team with that name already exists."})
        if name != team.name:
            team.name = name
            team.save(update_fields=["name"])
    if quotas is not None:
        _replace_quotas(team=team, quotas=quotas)
        # Team quotas are part of every member key's snapshot.
        bump_config_generation()
    return team


@transaction.atomic
def config_changed() -> None:
    """For writes that bypass the services above (admin inlines): refresh snapshots."""
    bump_config_generation()


def clean_networks(items: Iterable[str]) -> list[str]:
    """CIDR ranges or single addresses, normalised (`10.0.0.1` is `10.0.0.1/32`)."""
    networks = []
    for item in items:
        try:
            networks.append(str(ipaddress.ip_network(str(item).strip(), strict=False)))
        except ValueError:
            raise ValidationError(
                "%(item)s is not an IP address or CIDR range.",
                code="invalid_network",
                params={"item": item},
            ) from None
    return list(dict.fromkeys(networks))


def _clean_name(name: str) -> str:
    name = name.strip()
    if not name:
        raise ValidationError("a name must not be blank")
    return name


def _clean_models(models: Iterable[str]) -> list[str]:
    # Keep the order given, drop blanks and repeats.
    names = (str(model).strip() for model in models)
    return list(dict.fromkeys(name for name in names if name))


def _check_expiry(expires_at: datetime | None) -> None:
    if expires_at is not None and timezone.is_naive(expires_at):
        raise ValidationError("an expiry needs a time zone")


def _user(by: Actor) -> AbstractBaseUser | None:
    return by if by is not None and by.is_authenticated else None  # type: ignore[return-value]


def _replace_quotas(
    *,
    quotas: Iterable[QuotaSpec],
    key: ApiKey | None = None,
    team: Team | None = None,
) -> None:
    """Make the key's or the team's quotas exactly `quotas`."""
    specs = list(quotas)
    seen = set()
    for spec in specs:
        if not spec.limit.is_finite() or spec.limit < 0:
            raise ValidationError("a quota limit must be a number, not negative")
        if spec.limit >= QUOTA_LIMIT_CEILING:
            raise ValidationError("a quota limit must be below 10,000,000,000")
        if spec.metric not in Quota.Metric.values:
            raise ValidationError(f"unknown quota metric {spec.metric!r}")
        if spec.period not in Quota.Period.values:
            raise ValidationError(f"unknown quota period {spec.period!r}")
        if (spec.metric, spec.period) in seen:
            raise ValidationError(
                f"two quotas for {spec.metric} per {spec.period}: give one"
            )
        seen.add((spec.metric, spec.period))
    owner = {"key": key} if key is not None else {"team": team}
    existing = list(Quota.objects.filter(**owner))
    stale = [q.pk for q in existing if (q.metric, q.period) not in seen]
    Quota.objects.filter(pk__in=stale).delete()
    for spec in specs:
        Quota.objects.update_or_create(
            **owner,
            metric=spec.metric,
            period=spec.period,
            defaults={"limit": spec.limit},
        )
