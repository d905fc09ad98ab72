"""Admin forms for keys. They validate and shape input; `keys.services` writes."""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from django import forms
from django.core.exceptions import ValidationError

from keys.models import KEY_SETTINGS, ApiKey
from keys.services import MAX_GRACE_SECONDS

# Fields an admin may set on a key; the same set `set_key_limits` accepts.
KEY_FIELDS = list(KEY_SETTINGS)


class NameListField(forms.CharField):
    """A list of strings typed one per line (commas work too), kept as a JSON list."""

    widget = forms.Textarea(attrs={"rows": 3, "cols": 60})

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("required", False)
        super().__init__(**kwargs)

    def prepare_value(self, value: Any) -> Any:
        if isinstance(value, list | tuple):
            return "\n".join(str(item) for item in value)
        return value

    def to_python(self, value: Any) -> list[str]:  # type: ignore[override]
        if isinstance(value, list | tuple):
            return [str(item) for item in value]
        text = super().to_python(value)
        items = [item.strip() for item in re.split(r"[\n,]", text)]
        # Keep the order the admin typed (fallbacks are tried in order), drop repeats.
        return list(dict.fromkeys(item for item in items if item))


class NetworkListField(NameListField):
    """CIDR ranges or single addresses, normalised (`10.0.0.1` becomes `10.0.0.1/32`)."""

    def clean(self, value: Any) -> list[str]:
        items = super().clean(value)
        networks = []
        for item in items:
            try:
                networks.append(str(ipaddress.ip_network(item, strict=False)))
            except ValueError:
                raise ValidationError(
                    "%(item)s is not an IP address or CIDR range.",
                    code="invalid_network",
                    params={"item": item},
                ) from None
        return list(dict.fromkeys(networks))


class ApiKeyForm(forms.ModelForm):
    allowed_models = NameListField(
        help_text="Public model names, one per line; `prefix/*` allows a family. "
        "Empty allows every model."
    )
    ip_allowlist = NetworkListField(
        label="IP allowlist",
        help_text="Addresses or CIDR ranges, one per line. Empty allows any address.",
    )

    class Meta:
        model = ApiKey
        fields = KEY_FIELDS

    def issue_fields(self) -> dict[str, Any]:
        """Keyword arguments of `issue_key` for a new key."""
        data = self.cleaned_data
        return {
            "name": data["name"],
            "owner": data.get("owner"),
            "team": data.get("team"),
            "models": data.get("allowed_models") or [],
            "ip_allowlist": data.get("ip_allowlist") or [],
            "expires_at": data.get("expires_at"),
            "log_bodies": data.get("log_bodies", False),
            "allow_unpriced": data.get("allow_unpriced", False),
        }

    def limit_fields(self) -> dict[str, Any]:
        """Keyword arguments of `set_key_limits`: the fields the admin changed."""
        return {
            name: self.cleaned_data[name]
            for name in KEY_FIELDS
            if name in self.changed_data and name in self.cleaned_data
        }


class RotateKeyForm(forms.Form):
    grace_seconds = forms.IntegerField(
        label="Grace period (seconds)",
        min_value=0,
        max_value=MAX_GRACE_SECONDS,
        initial=0,
        help_text="How long the current secret keeps working next to the new one. "
        "0 stops it at once.",
    )
