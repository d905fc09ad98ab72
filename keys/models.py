"""Teams, API keys and the quotas attached to them.

A key's secret is never stored: only its public prefix and a keyed hash
(`keys.secrets`). The hot path never touches these models; it reads frozen
snapshots (`keys.selectors.KeyInfo`).
"""

from __future__ import annotations

from datetime import datetime

from django.conf import settings
from django.core.validators import MinValueValidator
from django.db import models
from django.db.models import Q
from django.utils import timezone


class Team(models.Model):
    name = models.CharField(max_length=100, unique=True)
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


# A key's settings: what an admin may set (admin form, REST, services) and what
# its audit events record; never its hashes.
KEY_SETTINGS = (
    "name",
    "owner",
    "team",
    "allowed_models",
    "ip_allowlist",
    "expires_at",
    "log_bodies",
    "allow_unpriced",
)


class ApiKey(models.Model):
    """An app's credential. Its id is stable: rotation changes the secret, not the key."""

    class Status(models.TextChoices):
        ACTIVE = "active", "Active"
        EXPIRED = "expired", "Expired"
        REVOKED = "revoked", "Revoked"

    name = models.CharField(max_length=100)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="api_keys",
    )
    team = models.ForeignKey(
        Team, null=True, blank=True, on_delete=models.PROTECT, related_name="api_keys"
    )
    prefix = models.CharField(max_length=8, editable=False)
    secret_hash = models.CharField(max_length=64, editable=False)
    # During a rotation's grace period the previous secret still works until then.
    previous_prefix = models.CharField(max_length=8, blank=True, editable=False)
    previous_secret_hash = models.CharField(max_length=64, blank=True, editable=False)
    previous_valid_until = models.DateTimeField(null=True, blank=True, editable=False)

    allowed_models = models.JSONField(
        default=list, blank=True, help_text="Public model names; empty allows all."
    )
    ip_allowlist = models.JSONField(
        default=list, blank=True, help_text="CIDR ranges; empty allows any address."
    )
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True, editable=False)
    revoked_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        editable=False,
    )
    log_bodies = models.BooleanField(
        default=False, help_text="Write request bodies to the logs for this key."
    )
    allow_unpriced = models.BooleanField(
        default=False,
        help_text="Allow models without a price even when the key has a cost budget.",
    )
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    updated_at = models.DateTimeField(auto_now=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        editable=False,
    )

    class Meta:
        verbose_name = "API key"
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["prefix"], name="apikey_prefix_unique"),
        ]
        indexes = [
            # Serves the lookup of a secret still inside its rotation grace period.
            models.Index(
                fields=["previous_prefix"],
                name="apikey_previous_prefix",
                condition=~Q(previous_prefix=""),
            ),
            # Serves the admin's and the REST API's newest-first pages of 100k keys
            # without sorting the whole table.
            models.Index(fields=["created_at", "id"], name="apikey_created"),
        ]

    def __str__(self) -> str:
        return f"{self.name} (sk-gw-{self.prefix}-…)"

    def status(self, now: datetime | None = None) -> ApiKey.Status:
        now = now or timezone.now()
        if self.revoked_at is not None:
            return self.Status.REVOKED
        if self.expires_at is not None and self.expires_at <= now:
            return self.Status.EXPIRED
        return self.Status.ACTIVE

    def is_usable(self, now: datetime | None = None) -> bool:
        return self.status(now) == self.Status.ACTIVE


class Quota(models.Model):
    """A limit on a key or a team: (metric, period, limit)."""

    class Metric(models.TextChoices):
        REQUESTS = "requests", "Requests"
        TOKENS = "tokens", "Tokens"
        COST_USD = "cost_usd", "Cost (USD)"

    class Period(models.TextChoices):
        MINUTE = "minute", "Minute (sliding)"
        HOUR = "hour", "Hour (sliding)"
        DAY = "day", "Day (calendar)"
        MONTH = "month", "Month (calendar)"
        TOTAL = "total", "Total"

    key = models.ForeignKey(
        ApiKey, null=True, blank=True, on_delete=models.CASCADE, related_name="quotas"
    )
    team = models.ForeignKey(
        Team, null=True, blank=True, on_delete=models.CASCADE, related_name="quotas"
    )
    metric = models.CharField(max_length=10, choices=Metric.choices)
    period = models.CharField(max_length=10, choices=Period.choices)
    limit = models.DecimalField(
        max_digits=20, decimal_places=10, validators=[MinValueValidator(0)]
    )
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=Q(key__isnull=False, team__isnull=True)
                | Q(key__isnull=True, team__isnull=False),
                name="quota_on_key_xor_team",
            ),
            models.CheckConstraint(condition=Q(limit__gte=0), name="quota_limit_gte_0"),
            models.UniqueConstraint(
                fields=["key", "metric", "period"], name="quota_unique_per_key"
            ),
            models.UniqueConstraint(
                fields=["team", "metric", "period"], name="quota_unique_per_team"
            ),
        ]

    def __str__(self) -> str:
        owner = f"key {self.key_id}" if self.key_id else f"team {self.team_id}"
        return f"{self.metric} per {self.period} ≤ {self.limit:f} ({owner})"


class KeyEvent(models.Model):
    """One step in a key's life: who did what to it, when, and through which interface.

    Written by `keys.services` in the same transaction as the change itself.
    `details` holds field names and public values only (names, prefixes, limits,
    times): never a secret, never a hash (`keys.audit` builds it from a fixed list).
    """

    class Action(models.TextChoices):
        ISSUED = "issued", "Issued"
        CHANGED = "changed", "Changed"
        ROTATED = "rotated", "Rotated"
        REVOKED = "revoked", "Revoked"

    class Via(models.TextChoices):
        ADMIN = "admin", "Django admin"
        API = "api", "REST API"
        CLI = "cli", "Command line"

    # PROTECT: an audited key cannot vanish with its trail (keys are revoked, and
    # admin never deletes them).
    key = models.ForeignKey(ApiKey, on_delete=models.PROTECT, related_name="events")
    action = models.CharField(max_length=10, choices=Action.choices)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    # The actor's username when it acted: the trail still reads after the user is
    # renamed or deleted. Empty for the command line and other scripts.
    actor_name = models.CharField(max_length=150, blank=True)
    via = models.CharField(max_length=10, choices=Via.choices)
    at = models.DateTimeField(default=timezone.now)
    details = models.JSONField(default=dict, blank=True)

    class Meta:
        verbose_name = "key event"
        ordering = ["-at", "-id"]
        indexes = [
            # Serves a key's own trail (its change page) and the newest-first list.
            models.Index(fields=["key", "at"], name="keyevent_key_at"),
            models.Index(fields=["at"], name="keyevent_at"),
        ]

    def __str__(self) -> str:
        return f"{self.get_action_display()} key {self.key_id} at {self.at:%Y-%m-%d %H:%M:%S}"
