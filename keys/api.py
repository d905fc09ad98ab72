"""REST API of keys/ under /api/v1/: keys/, teams/, auth/token/ and auth/me/.

Thin views: validate with an input serializer, call one service, answer with an
output serializer. Every write is audited by the service with `via="api"`.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from django.db.models import Prefetch, Q, QuerySet
from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_view,
    inline_serializer,
)
from rest_framework import exceptions, mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.parsers import JSONParser
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.serializers import as_serializer_error
from rest_framework.views import APIView
from rest_framework.views import exception_handler as drf_exception_handler
from rest_framework_simplejwt import views as jwt_views
from rest_framework_simplejwt.serializers import (
    TokenObtainPairSerializer,
    TokenRefreshSerializer,
)

from keys.models import ApiKey, KeyEvent, Quota, Team
from keys.permissions import KeyAccess, TeamAccess
from keys.secrets import SECRET_PREFIX
from keys.selectors import user_role, visible_keys, visible_teams
from keys.serializers import (
    ApiKeyCreateSerializer,
    ApiKeySerializer,
    ApiKeyUpdateSerializer,
    IssuedKeySerializer,
    KeyListFilterSerializer,
    MeSerializer,
    RotateKeySerializer,
    TeamCreateSerializer,
    TeamSerializer,
    TeamUpdateSerializer,
)
from keys.services import (
    IssuedKey,
    issue_key,
    revoke_key,
    rotate_key,
    set_key_limits,
    update_team,
    upsert_team,
)

VIA = KeyEvent.Via.API


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """DRF's handler, plus Django's ValidationError (raised by the services) as a 400.

    Without it DRF answers 500 to a service's refusal. HackSoft's styleguide does the
    same (`styleguide_example/api/exception_handlers.py`).
    """
    if isinstance(exc, DjangoValidationError):
        exc = exceptions.ValidationError(as_serializer_error(exc))
    return drf_exception_handler(exc, context)


class GatewayApiMixin:
    """JSON bodies only, and service refusals as 400s even without the settings line."""

    parser_classes = [JSONParser]

    def get_exception_handler(self) -> Any:
        return exception_handler


# Error answers, documented so clients (and schemathesis) know their shape.
VALIDATION_ERROR = OpenApiResponse(
    OpenApiTypes.OBJECT,
    description="Invalid input: field names map to lists of messages "
    "(`non_field_errors` for the others).",
)
# The id as the schema shows it; the URL takes any segment (see lookup_value_regex).
ID = OpenApiParameter("id", OpenApiTypes.INT, OpenApiParameter.PATH)
DETAIL = inline_serializer("ErrorDetail", {"detail": serializers.CharField()})
DENIED = OpenApiResponse(
    DETAIL, description="Not signed in (401) or not allowed (403)."
)
NOT_FOUND = OpenApiResponse(
    DETAIL,
    description="Nothing with that id visible to you (another user's key reads the "
    "same as a key that does not exist).",
)


def issued_response(issued: IssuedKey, *, created: bool) -> Response:
    key = ApiKey.objects.prefetch_related(_ordered_quotas()).get(pk=issued.key.pk)
    until = key.previous_valid_until
    data = {
        **ApiKeySerializer(key).data,
        "secret": issued.secret,
        "previous_secret_valid_until": (
            serializers.DateTimeField().to_representation(until) if until else None
        ),
    }
    headers = {"Cache-Control": "no-store"}
    code = status.HTTP_201_CREATED if created else status.HTTP_200_OK
    return Response(data, status=code, headers=headers)


def _ordered_quotas() -> Prefetch:
    return Prefetch("quotas", queryset=Quota.objects.order_by("metric", "period"))


@extend_schema(tags=["keys"])
@extend_schema_view(
    list=extend_schema(
        summary="List the keys you may see",
        parameters=[KeyListFilterSerializer],
        responses={
            200: ApiKeySerializer(many=True),
            400: VALIDATION_ERROR,
            401: DENIED,
            403: DENIED,
        },
    ),
    retrieve=extend_schema(
        summary="One key",
        parameters=[ID],
        responses={200: ApiKeySerializer, 401: DENIED, 403: DENIED, 404: NOT_FOUND},
    ),
)
class ApiKeyViewSet(
    GatewayApiMixin,
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    viewsets.GenericViewSet,
):
    """API keys. Staff with permissions see and change every key; other users
    see, rotate and revoke their own; group finance sees none (403)."""

    permission_classes = [KeyAccess]
    serializer_class = ApiKeySerializer
    queryset = ApiKey.objects.none()  # for the schema; rows come from get_queryset
    # Any path segment reaches the view, so `keys/abc/` is this API's JSON 404
    # rather than Django's HTML one.
    lookup_value_regex = "[^/]+"
    http_method_names = ["get", "post", "patch", "head", "options"]

    def get_queryset(self) -> QuerySet[ApiKey]:
        return (
            visible_keys(self.request.user)
            .defer("secret_hash", "previous_secret_hash")
            .prefetch_related(_ordered_quotas())
            .order_by("-created_at", "-id")
        )

    def filter_queryset(self, queryset: QuerySet[ApiKey]) -> QuerySet[ApiKey]:
        if self.action != "list":
            return queryset
        params = KeyListFilterSerializer(data=self.request.query_params)
        params.is_valid(raise_exception=True)
        wanted = params.validated_data
        if "search" in wanted:
            term = wanted["search"].strip()
            if term.startswith(SECRET_PREFIX):
                term = term[len(SECRET_PREFIX) : len(SECRET_PREFIX) + 8]
            queryset = queryset.filter(
                Q(name__icontains=term) | Q(prefix=term) | Q(previous_prefix=term)
            )
        if "team" in wanted:
            queryset = queryset.filter(team_id=wanted["team"])
        if "owner" in wanted:
            queryset = queryset.filter(owner_id=wanted["owner"])
        if "status" in wanted:
            queryset = queryset.filter(_status_filter(wanted["status"]))
        return queryset

    @extend_schema(
        summary="Issue a key (staff); the answer holds its secret, once",
        request=ApiKeyCreateSerializer,
        responses={
            201: IssuedKeySerializer,
            400: VALIDATION_ERROR,
            401: DENIED,
            403: DENIED,
        },
    )
    def create(self, request: Request) -> Response:
        data = ApiKeyCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        issued = issue_key(**data.issue_arguments(), by=request.user, via=VIA)
        return issued_response(issued, created=True)

    @extend_schema(
        summary="Change a key's name, owner, team or limits (staff)",
        parameters=[ID],
        request=ApiKeyUpdateSerializer,
        responses={
            200: ApiKeySerializer,
            400: VALIDATION_ERROR,
            401: DENIED,
            403: DENIED,
            404: NOT_FOUND,
        },
    )
    def partial_update(self, request: Request, pk: str) -> Response:
        key = self.get_object()
        data = ApiKeyUpdateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        set_key_limits(key=key, by=request.user, via=VIA, **data.validated_data)
        return Response(ApiKeySerializer(self.get_object()).data)

    @extend_schema(
        summary="Revoke a key: refused on every worker within a second",
        parameters=[ID],
        request=None,
        responses={200: ApiKeySerializer, 401: DENIED, 403: DENIED, 404: NOT_FOUND},
    )
    @action(detail=True, methods=["post"])
    def revoke(self, request: Request, pk: str) -> Response:
        revoke_key(key=self.get_object(), by=request.user, via=VIA)
        return Response(ApiKeySerializer(self.get_object()).data)

    @extend_schema(
        summary="Rotate a key's secret; the answer holds the new secret, once",
        parameters=[ID],
        request=RotateKeySerializer,
        responses={
            200: IssuedKeySerializer,
            400: VALIDATION_ERROR,
            401: DENIED,
            403: DENIED,
            404: NOT_FOUND,
        },
    )
    @action(detail=True, methods=["post"])
    def rotate(self, request: Request, pk: str) -> Response:
        key = self.get_object()
        data = RotateKeySerializer(data=request.data)
        data.is_valid(raise_exception=True)
        issued = rotate_key(
            key=key,
            grace_seconds=data.validated_data["grace_seconds"],
            by=request.user,
            via=VIA,
        )
        return issued_response(issued, created=False)


@extend_schema(tags=["teams"])
@extend_schema_view(
    list=extend_schema(
        summary="List teams (staff)",
        responses={200: TeamSerializer(many=True), 401: DENIED, 403: DENIED},
    ),
    retrieve=extend_schema(
        summary="One team (staff)",
        parameters=[ID],
        responses={200: TeamSerializer, 401: DENIED, 403: DENIED, 404: NOT_FOUND},
    ),
)
class TeamViewSet(
    GatewayApiMixin,
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    viewsets.GenericViewSet,
):
    """Teams and their shared quotas; staff with the team permissions only."""

    permission_classes = [TeamAccess]
    serializer_class = TeamSerializer
    queryset = Team.objects.none()  # for the schema and TeamAccess's model lookup
    lookup_value_regex = "[^/]+"
    http_method_names = ["get", "post", "patch", "head", "options"]

    def get_queryset(self) -> QuerySet[Team]:
        return visible_teams(self.request.user).order_by("name")

    @extend_schema(
        summary="Create a team (staff)",
        request=TeamCreateSerializer,
        responses={
            201: TeamSerializer,
            400: VALIDATION_ERROR,
            401: DENIED,
            403: DENIED,
        },
    )
    def create(self, request: Request) -> Response:
        data = TeamCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        team = upsert_team(
            name=data.validated_data["name"], quotas=data.validated_data.get("quotas")
        )
        return Response(
            TeamSerializer(self.get_queryset().get(pk=team.pk)).data,
            status=status.HTTP_201_CREATED,
        )

    @extend_schema(
        summary="Rename a team or replace its quotas (staff)",
        parameters=[ID],
        request=TeamUpdateSerializer,
        responses={
            200: TeamSerializer,
            400: VALIDATION_ERROR,
            401: DENIED,
            403: DENIED,
            404: NOT_FOUND,
        },
    )
    def partial_update(self, request: Request, pk: str) -> Response:
        team = self.get_object()
        data = TeamUpdateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        update_team(team=team, **data.validated_data)
        return Response(TeamSerializer(self.get_object()).data)


# simplejwt's views, subclassed only to document every answer they give: left to
# themselves they document 200 alone. Its refusals are {"detail": ...}, plus a
# `code` for a bad token.
TOKEN_REFUSED = inline_serializer(
    "TokenRefused",
    {
        "detail": serializers.CharField(),
        "code": serializers.CharField(
            required=False, help_text="`token_not_valid` for a bad token"
        ),
    },
)


@extend_schema_view(
    post=extend_schema(
        summary="Sign in with a username and password",
        tags=["auth"],
        responses={
            200: TokenObtainPairSerializer,
            400: VALIDATION_ERROR,
            401: OpenApiResponse(
                TOKEN_REFUSED,
                description="No active user with that username and password.",
            ),
        },
    )
)
class TokenObtainPairView(jwt_views.TokenObtainPairView):
    """POST auth/token/: an access token (sent as `Authorization: Bearer ...`) and a
    refresh token for a username and password."""


@extend_schema_view(
    post=extend_schema(
        summary="Refresh an access token",
        tags=["auth"],
        responses={
            200: TokenRefreshSerializer,
            400: VALIDATION_ERROR,
            401: OpenApiResponse(
                TOKEN_REFUSED,
                description="The refresh token is malformed, expired, not a refresh "
                "token, or its user is no longer active.",
            ),
        },
    )
)
class TokenRefreshView(jwt_views.TokenRefreshView):
    """POST auth/token/refresh/: a new access token for a refresh token."""


class MeView(GatewayApiMixin, APIView):
    """GET auth/me/: who the token (or session) belongs to, and their role."""

    permission_classes = [IsAuthenticated]

    @extend_schema(
        summary="The signed-in user",
        tags=["auth"],
        responses={200: MeSerializer, 401: DENIED},
    )
    def get(self, request: Request) -> Response:
        user = request.user
        data = {
            "id": user.pk,
            "username": user.get_username(),
            "is_staff": user.is_staff,
            "is_superuser": user.is_superuser,
            "groups": sorted(user.groups.values_list("name", flat=True)),
            "role": user_role(user),
        }
        return Response(MeSerializer(data).data)


def _status_filter(value: str) -> Q:
    now = timezone.now()
    if value == ApiKey.Status.REVOKED:
        return Q(revoked_at__isnull=False)
    if value == ApiKey.Status.EXPIRED:
        return Q(revoked_at__isnull=True, expires_at__lte=now)
    return Q(revoked_at__isnull=True) & (
        Q(expires_at__isnull=True) | Q(expires_at__gt=now)
    )
