"""REST shapes of keys, teams and the signed-in user.

Input serializers validate and shape what a client sends; output serializers show
rows. Neither writes: `keys.api` hands validated data to `keys.services`. No output
serializer names a hash column; the secret appears only in `IssuedKeySerializer`,
the answer to issuing or rotating a key.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError as DjangoValidationError
from rest_framework import serializers

from keys.models import ApiKey, Quota, Team
from keys.services import MAX_GRACE_SECONDS, QuotaSpec, clean_networks

# Bounds that keep one key's row and snapshot small.
MAX_LIST_ITEMS = 100
MODEL_NAME_MAX = 200
MONEY = {"max_digits": 20, "decimal_places": 10}
MAX_ID = 2**63 - 1  # BigAutoField


class QuotaSerializer(serializers.Serializer):
    """A quota as shown: limit in requests, tokens or USD, a Decimal string."""

    metric = serializers.ChoiceField(choices=Quota.Metric.choices, read_only=True)
    period = serializers.ChoiceField(choices=Quota.Period.choices, read_only=True)
    limit = serializers.DecimalField(**MONEY, read_only=True)


class QuotaInputSerializer(serializers.Serializer):
    metric = serializers.ChoiceField(choices=Quota.Metric.choices)
    period = serializers.ChoiceField(choices=Quota.Period.choices)
    limit = serializers.DecimalField(
        **MONEY,
        min_value=Decimal(0),
        max_value=Decimal("9999999999.9999999999"),
        help_text="Requests, tokens or USD per period; a Decimal string for USD.",
    )


class QuotaListField(serializers.ListField):
    child = QuotaInputSerializer()

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("max_length", 15)  # 3 metrics x 5 periods
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> list[QuotaSpec]:
        items = super().to_internal_value(data)
        specs = [QuotaSpec(i["metric"], i["period"], i["limit"]) for i in items]
        pairs = [(spec.metric, spec.period) for spec in specs]
        if len(set(pairs)) != len(pairs):
            raise serializers.ValidationError(
                "Give at most one quota per metric and period."
            )
        return specs


class NetworkListField(serializers.ListField):
    """CIDR ranges or single addresses, normalised (`10.0.0.1` is `10.0.0.1/32`)."""

    child = serializers.CharField(max_length=64)

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("max_length", MAX_LIST_ITEMS)
        kwargs.setdefault(
            "help_text", "Addresses or CIDR ranges; empty allows any address."
        )
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> list[str]:
        items = super().to_internal_value(data)
        try:
            return clean_networks(items)
        except DjangoValidationError as exc:
            raise serializers.ValidationError(exc.messages) from None


def model_list_field(**kwargs: Any) -> serializers.ListField:
    return serializers.ListField(
        child=serializers.CharField(max_length=MODEL_NAME_MAX),
        max_length=MAX_LIST_ITEMS,
        help_text="Public model names; `prefix/*` allows a family. Empty allows all.",
        **kwargs,
    )


# --- keys ------------------------------------------------------------------------------


class ApiKeySerializer(serializers.ModelSerializer):
    """A key as the API shows it: its public prefix, never its secret or hash."""

    status = serializers.ChoiceField(choices=ApiKey.Status.choices, read_only=True)
    allowed_models = model_list_field(read_only=True)
    ip_allowlist = serializers.ListField(child=serializers.CharField(), read_only=True)
    quotas = QuotaSerializer(many=True, read_only=True)

    class Meta:
        model = ApiKey
        fields = [
            "id",
            "name",
            "prefix",
            "status",
            "team",
            "owner",
            "allowed_models",
            "ip_allowlist",
            "expires_at",
            "revoked_at",
            "created_at",
            "quotas",
            "log_bodies",
            "allow_unpriced",
        ]
        read_only_fields = fields


class IssuedKeySerializer(ApiKeySerializer):
    """The answer to issuing or rotating a key: the only one that holds its secret."""

    secret = serializers.CharField(
        read_only=True,
        help_text="The key's secret. Shown this once; the gateway keeps only a hash.",
    )
    previous_secret_valid_until = serializers.DateTimeField(
        read_only=True,
        allow_null=True,
        help_text="After a rotation with a grace period: until when the previous "
        "secret still works. Null otherwise.",
    )

    class Meta(ApiKeySerializer.Meta):
        fields = [
            *ApiKeySerializer.Meta.fields,
            "secret",
            "previous_secret_valid_until",
        ]
        read_only_fields = fields


class ApiKeyCreateSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=100)
    owner = serializers.PrimaryKeyRelatedField(
        queryset=get_user_model().objects.all(),
        required=False,
        allow_null=True,
        help_text="Id of the user who owns the key (they may then see, rotate and "
        "revoke it). None by default.",
    )
    team = serializers.PrimaryKeyRelatedField(
        queryset=Team.objects.all(), required=False, allow_null=True
    )
    allowed_models = model_list_field(required=False)
    ip_allowlist = NetworkListField(required=False)
    expires_at = serializers.DateTimeField(required=False, allow_null=True)
    quotas = QuotaListField(required=False)
    log_bodies = serializers.BooleanField(required=False)
    allow_unpriced = serializers.BooleanField(required=False)

    def issue_arguments(self) -> dict[str, Any]:
        """Keyword arguments of `keys.services.issue_key`."""
        data = dict(self.validated_data)
        if "allowed_models" in data:
            data["models"] = data.pop("allowed_models")
        return data


class ApiKeyUpdateSerializer(serializers.Serializer):
    """PATCH keys/{id}/: only the fields sent change; `quotas` replaces them all."""

    name = serializers.CharField(max_length=100, required=False)
    owner = serializers.PrimaryKeyRelatedField(
        queryset=get_user_model().objects.all(), required=False, allow_null=True
    )
    team = serializers.PrimaryKeyRelatedField(
        queryset=Team.objects.all(), required=False, allow_null=True
    )
    allowed_models = model_list_field(required=False)
    ip_allowlist = NetworkListField(required=False)
    expires_at = serializers.DateTimeField(required=False, allow_null=True)
    quotas = QuotaListField(
        required=False,
        help_text="The key's quotas, all of them: omitted ones are removed.",
    )
    log_bodies = serializers.BooleanField(required=False)
    allow_unpriced = serializers.BooleanField(required=False)


class RotateKeySerializer(serializers.Serializer):
    grace_seconds = serializers.IntegerField(
        min_value=0,
        max_value=MAX_GRACE_SECONDS,
        default=0,
        help_text="How long the current secret keeps working next to the new one "
        "(at most a week). 0 stops it at once.",
    )


class KeyListFilterSerializer(serializers.Serializer):
    """Query parameters of GET keys/."""

    search = serializers.CharField(
        required=False, max_length=100, help_text="Part of the name, or a prefix."
    )
    status = serializers.ChoiceField(choices=ApiKey.Status.choices, required=False)
    # Bounded like the id columns: a larger number is a 400, not a database error.
    team = serializers.IntegerField(required=False, min_value=1, max_value=MAX_ID)
    owner = serializers.IntegerField(required=False, min_value=1, max_value=MAX_ID)


# --- teams -----------------------------------------------------------------------------


class TeamSerializer(serializers.ModelSerializer):
    quotas = QuotaSerializer(many=True, read_only=True)

    class Meta:
        model = Team
        fields = ["id", "name", "created_at", "quotas"]
        read_only_fields = fields


class TeamCreateSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=100)
    quotas = QuotaListField(
        required=False, help_text="Quotas shared by every key of the team."
    )

    def validate_name(self, value: str) -> str:
        if Team.objects.filter(name=value).exists():
            raise serializers.ValidationError("A team with that name already exists.")
        return value


class TeamUpdateSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=100, required=False)
    quotas = QuotaListField(
        required=False,
        help_text="The team's quotas, all of them: omitted ones are removed.",
    )


# --- the signed-in user ----------------------------------------------------------------


class MeSerializer(serializers.Serializer):
    id = serializers.IntegerField(read_only=True)
    username = serializers.CharField(read_only=True)
    is_staff = serializers.BooleanField(read_only=True)
    is_superuser = serializers.BooleanField(read_only=True)
    groups = serializers.ListField(child=serializers.CharField(), read_only=True)
    role = serializers.ChoiceField(
        choices=[
            ("admin", "manages keys and teams"),
            ("finance", "reads usage and reports, never keys"),
            ("user", "sees and rotates or revokes their own keys"),
        ],
        read_only=True,
    )
