"""Reads of keys: the frozen snapshot the relay works from, and who may see which key."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db.models import Q, QuerySet

from keys.models import ApiKey, Quota
from keys.roles import is_finance
from keys.secrets import parse_prefix, verify_secret


@dataclass(frozen=True, slots=True)
class QuotaInfo:
    scope: str  # "key" or "team"
    metric: str
    period: str
    limit: Decimal


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What the relay needs of a key, read once and cached in-process.

    Never a model instance, so no lazy query can slip into a request.
    """

    id: int
    prefix: str
    name: str
    team_id: int | None
    allowed_models: tuple[str, ...]
    ip_allowlist: tuple[str, ...]
    expires_at: datetime | None
    revoked: bool
    # Set when the secret presented is the previous one, inside its grace period.
    valid_until: datetime | None
    log_bodies: bool
    allow_unpriced: bool
    quotas: tuple[QuotaInfo, ...]

    def is_usable(self, now: datetime) -> bool:
        if self.revoked:
            return False
        if self.expires_at is not None and self.expires_at <= now:
            return False
        return self.valid_until is None or self.valid_until > now

    def allows_model(self, name: str) -> bool:
        if not self.allowed_models:
            return True
        for allowed in self.allowed_models:
            if allowed == name or (
                allowed.endswith("*") and name.startswith(allowed[:-1])
            ):
                return True
        return False


def key_info_for_secret(secret: str) -> KeyInfo | None:
    """Look a presented secret up in the database; None when it matches no key."""
    prefix = parse_prefix(secret)
    if prefix is None:
        return None
    candidates = ApiKey.objects.filter(Q(prefix=prefix) | Q(previous_prefix=prefix))
    for key in candidates:
        if key.prefix == prefix and verify_secret(secret, key.secret_hash):
            return _key_info(key, valid_until=None)
        if key.previous_prefix == prefix and verify_secret(
            secret, key.previous_secret_hash
        ):
            return _key_info(key, valid_until=key.previous_valid_until)
    return None


def _key_info(key: ApiKey, *, valid_until: datetime | None) -> KeyInfo:
    quotas = [QuotaInfo("key", q.metric, q.period, q.limit) for q in key.quotas.all()]
    if key.team_id is not None:
        quotas += [
            QuotaInfo("team", q.metric, q.period, q.limit)
            for q in Quota.objects.filter(team_id=key.team_id)
        ]
    return KeyInfo(
        id=key.pk,
        prefix=key.prefix,
        name=key.name,
        team_id=key.team_id,
        allowed_models=tuple(key.allowed_models or ()),
        ip_allowlist=tuple(key.ip_allowlist or ()),
        expires_at=key.expires_at,
        revoked=key.revoked_at is not None,
        valid_until=valid_until,
        log_bodies=key.log_bodies,
        allow_unpriced=key.allow_unpriced,
        quotas=tuple(quotas),
    )


def visible_keys(user: AbstractBaseUser | AnonymousUser) -> QuerySet[ApiKey]:
    """The keys a user may see: staff with the permission all, finance none, others their own."""
    qs = ApiKey.objects.select_related("team", "owner")
    if not user.is_authenticated:
        return qs.none()
    if user.has_perm("keys.view_apikey"):
        return qs
    if is_finance(user):
        return qs.none()  # Finance sees usage, never keys.
    return qs.filter(owner=user)
