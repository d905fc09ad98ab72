"""Admin forms for providers and models. They validate and shape input;
`relay.services` writes."""

from __future__ import annotations

from typing import Any

from django import forms
from django.core.validators import RegexValidator

from keys.forms import NameListField
from relay.models import ModelRoute, Provider

# A variable's name, so a key pasted here by mistake is refused rather than stored
# in plain text and listed as "env: sk-…".
env_name = RegexValidator(
    r"^[A-Za-z_][A-Za-z0-9_]*$",
    "Letters, digits and underscores only: the name of a variable, not its value.",
)


class ProviderForm(forms.ModelForm):
    base_url = forms.URLField(
        max_length=500,
        assume_scheme="https",
        help_text="e.g. https://api.openai.com/v1",
    )
    api_key = forms.CharField(
        label="API key",
        required=False,
        strip=True,
        widget=forms.PasswordInput(render_value=False),
        help_text="Write-only: stored encrypted, never shown again. Leave empty to "
        "keep the stored key. An environment variable above takes precedence.",
    )
    clear_api_key = forms.BooleanField(
        label="Remove the stored API key", required=False
    )

    class Meta:
        model = Provider
        fields = ["name", "base_url", "api_key_env", "timeout_s"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if "api_key_env" in self.fields:
            self.fields["api_key_env"].validators.append(env_name)

    def clean_timeout_s(self) -> float:
        value = self.cleaned_data["timeout_s"]
        if value is None or value <= 0:
            raise forms.ValidationError("The timeout must be more than 0 seconds.")
        return value

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        if data.get("api_key") and data.get("clear_api_key"):
            raise forms.ValidationError(
                "Either enter a new API key or remove the stored one, not both."
            )
        return data

    def upsert_fields(self, provider: Provider) -> dict[str, Any]:
        """Keyword arguments of `upsert_provider`; `api_key=None` keeps the stored key."""
        data = self.cleaned_data
        api_key: str | None = data.get("api_key") or None
        if data.get("clear_api_key"):
            api_key = ""
        return {
            "name": provider.name,
            "base_url": data["base_url"],
            "api_key_env": data.get("api_key_env") or "",
            "timeout_s": data["timeout_s"],
            "api_key": api_key,
        }


class ModelRouteForm(forms.ModelForm):
    fallbacks = NameListField(
        help_text="Other public model names, one per line, tried in this order."
    )

    class Meta:
        model = ModelRoute
        fields = [
            "name",
            "provider",
            "upstream_model",
            "fallbacks",
            "max_output_tokens",
            "is_active",
        ]

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        name = data.get("name") or (self.instance.name if self.instance.pk else "")
        if name and name in (data.get("fallbacks") or []):
            self.add_error("fallbacks", "A model cannot fall back to itself.")
        return data

    def upsert_fields(self, route: ModelRoute) -> dict[str, Any]:
        """Keyword arguments of `upsert_model`."""
        data = self.cleaned_data
        return {
            "name": route.name,
            "provider": data["provider"].name,
            "upstream_model": data.get("upstream_model") or "",
            "fallbacks": data.get("fallbacks") or [],
            "max_output_tokens": data.get("max_output_tokens"),
            "is_active": data.get("is_active", False),
        }
