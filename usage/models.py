"""Prices, the append-only usage ledger and its daily rollups.

Money is `Decimal` with 10 decimal places everywhere (`usage.pricing`).
"""

from __future__ import annotations

import uuid

from django.db import models
from django.db.models import Q
from django.utils import timezone

MONEY = {"max_digits": 20, "decimal_places": 10}


class Price(models.Model):
    """USD per million tokens for a public model name, from `effective_from` on.

    Rows are effective-dated, not edited: a request is costed with the row in force
    at its time, so old usage keeps its old price.
    """

    model = models.CharField(max_length=200, db_index=True)
    input = models.DecimalField(**MONEY, help_text="USD per million prompt tokens")
    output = models.DecimalField(**MONEY, help_text="USD per million completion tokens")
    cached_input = models.DecimalField(
        **MONEY,
        null=True,
        blank=True,
        help_text="USD per million cached prompt tokens; the input price when empty",
    )
    effective_from = models.DateTimeField()
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        ordering = ["model", "-effective_from"]
        constraints = [
            models.UniqueConstraint(
                fields=["model", "effective_from"], name="price_unique_model_from"
            ),
            models.CheckConstraint(
                condition=Q(input__gte=0) & Q(output__gte=0), name="price_non_negative"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.model} from {self.effective_from:%Y-%m-%d %H:%M}"


class UsageRow(models.Model):
    """One row per authenticated request, whatever its outcome. Never updated.

    Foreign keys carry no database constraint: the ledger must accept a row even if
    the key or price it names was deleted meanwhile (keys are revoked, not deleted).
    """

    class Source(models.TextChoices):
        PROVIDER = "provider", "Reported by the provider"
        PROVIDER_PARTIAL = "provider_partial", "Partly reported by the provider"
        ESTIMATED = "estimated", "Counted locally"
        NONE = "none", "No usage"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    request_id = models.CharField(max_length=200, db_index=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    key = models.ForeignKey(
        "keys.ApiKey",
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        related_name="usage_rows",
    )
    key_prefix = models.CharField(max_length=8)
    team = models.ForeignKey(
        "keys.Team",
        null=True,
        blank=True,
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        related_name="usage_rows",
    )
    user = models.CharField(max_length=200, blank=True)
    endpoint = models.CharField(max_length=50)
    model = models.CharField(max_length=200, blank=True)
    upstream_model = models.CharField(max_length=200, blank=True)
    provider = models.CharField(max_length=100, blank=True)
    status_code = models.PositiveSmallIntegerField()
    error_code = models.CharField(max_length=50, blank=True)
    stream = models.BooleanField(default=False)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    cached_tokens = models.PositiveIntegerField(default=0)
    usage_source = models.CharField(
        max_length=20, choices=Source.choices, default=Source.NONE
    )
    cost_usd = models.DecimalField(**MONEY, null=True, blank=True)
    price = models.ForeignKey(
        Price,
        null=True,
        blank=True,
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        related_name="+",
    )
    latency_ms = models.PositiveIntegerField(default=0)
    ttft_ms = models.PositiveIntegerField(null=True, blank=True)
    client_disconnected = models.BooleanField(default=False)
    cache_hit = models.BooleanField(default=False)
    tags = models.JSONField(default=list, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            # Serves a key's usage history and its spend in the current period.
            models.Index(fields=["key", "created_at"], name="usage_key_created"),
            models.Index(fields=["team", "created_at"], name="usage_team_created"),
            models.Index(fields=["model", "created_at"], name="usage_model_created"),
        ]

    def __str__(self) -> str:
        return f"{self.request_id} {self.model} {self.status_code}"

    @property
    def is_unpriced(self) -> bool:
        return (
            self.cost_usd is None and (self.prompt_tokens or self.completion_tokens) > 0
        )


# What a rollup line measures: the columns reconcile checks and report totals sum.
ROLLUP_MEASURES = (
    "requests",
    "errors",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "cost_usd",
    "unpriced_requests",
)


class DailyRollup(models.Model):
    """Totals of one billing day × key × team × model, recomputed from the rows."""

    day = models.DateField()
    key = models.ForeignKey(
        "keys.ApiKey",
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        related_name="+",
    )
    team = models.ForeignKey(
        "keys.Team",
        null=True,
        blank=True,
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        related_name="+",
    )
    model = models.CharField(max_length=200)
    requests = models.PositiveIntegerField(default=0)
    errors = models.PositiveIntegerField(default=0)
    prompt_tokens = models.PositiveBigIntegerField(default=0)
    completion_tokens = models.PositiveBigIntegerField(default=0)
    cached_tokens = models.PositiveBigIntegerField(default=0)
    cost_usd = models.DecimalField(**MONEY, default=0)
    unpriced_requests = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["-day"]
        constraints = [
            models.UniqueConstraint(
                fields=["day", "key", "team", "model"],
                name="rollup_unique_day_key_team_model",
            ),
            # NULLs are distinct in a unique index, so the constraint above never
            # sees two team-less lines as equal; this one does. A partial index
            # rather than `nulls_distinct=False`, which SQLite lacks (Django would
            # skip the whole constraint there) and PostgreSQL has only from 15 on.
            models.UniqueConstraint(
                fields=["day", "key", "model"],
                condition=Q(team__isnull=True),
                name="rollup_unique_day_key_model_teamless",
            ),
        ]
        indexes = [models.Index(fields=["day"], name="rollup_day")]

    def __str__(self) -> str:
        return f"{self.day} key {self.key_id} {self.model}"
