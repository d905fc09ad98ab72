"""Upstream providers and the public model names routed to them."""

from __future__ import annotations

from django.db import models
from django.utils import timezone


class Provider(models.Model):
    """An OpenAI-compatible upstream.

    Its API key is never stored in plain text: either the name of an environment
    variable holding it (`api_key_env`) or a Fernet token (`api_key_encrypted`).
    """

    name = models.SlugField(max_length=100, unique=True)
    base_url = models.URLField(
        max_length=500, help_text="e.g. https://api.openai.com/v1"
    )
    api_key_env = models.CharField(
        max_length=100,
        blank=True,
        help_text="Environment variable that holds the provider's API key.",
    )
    api_key_encrypted = models.TextField(blank=True, editable=False)
    timeout_s = models.FloatField(default=60.0)
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class ModelRoute(models.Model):
    """A public model name (what apps send) and where it goes.

    A name ending in `/*` is a wildcard: `router/x` goes to the route's provider as
    upstream model `x`. Named ModelRoute, not Model, to stay clear of Django's own.
    """

    name = models.CharField(max_length=200, unique=True)
    provider = models.ForeignKey(
        Provider, on_delete=models.PROTECT, related_name="models"
    )
    upstream_model = models.CharField(
        max_length=200, blank=True, help_text="Defaults to the public name."
    )
    fallbacks = models.JSONField(
        default=list, blank=True, help_text="Other public model names, tried in order."
    )
    max_output_tokens = models.PositiveIntegerField(
        null=True,
        blank=True,
        help_text="Worst case reserved against budgets when a request sets no max_tokens.",
    )
    is_active = models.BooleanField(default=True)
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = "model"
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def is_wildcard(self) -> bool:
        return self.name.endswith("*")


class ConfigGeneration(models.Model):
    """One row whose counter moves whenever keys, quotas, models or prices change.

    Every web process polls it (or its Redis mirror) off the request path and drops
    its in-process snapshots when it moves; that is how a revocation reaches every
    worker within a second without a query per request.
    """

    value = models.BigIntegerField(default=0)

    def __str__(self) -> str:
        return f"generation {self.value}"
