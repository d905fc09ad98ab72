"""Who may do what in the REST API's keys/ and teams/ routes.

- Staff with Django's model permissions on keys (`keys.view_apikey`, `add_apikey`,
  `change_apikey`) or teams (`keys.view_team`, `add_team`, `change_team`): what those
  permissions say, on every key or team.
- Group `finance`: no key route at all (403), whatever key they would ask for.
  Finance reads usage and reports; it never sees a key.
- Any other signed-in user: their own keys (those they own) only: list, retrieve,
  rotate and revoke them. Issuing keys and changing limits stay with staff, so a
  user cannot lift the limits an admin set. Another user's key answers 404, as a
  key that does not exist, so ids cannot be probed.

Which rows a user sees is `keys.selectors.visible_keys`; these classes only decide
which operations they may attempt.
"""

from __future__ import annotations

from typing import Any

from rest_framework.permissions import BasePermission, DjangoModelPermissions
from rest_framework.request import Request
from rest_framework.views import APIView

from keys.models import ApiKey
from keys.roles import is_finance

# Actions any key holder may take on a key they own.
OWNER_ACTIONS = frozenset({"revoke", "rotate"})
STAFF_ONLY = {
    "create": "keys.add_apikey",
    "partial_update": "keys.change_apikey",
    "update": "keys.change_apikey",
}


class KeyAccess(BasePermission):
    """keys/: staff by model permission, finance never, others their own keys."""

    def has_permission(self, request: Request, view: APIView) -> bool:
        user = request.user
        if not (user and user.is_authenticated):
            return False
        action = getattr(view, "action", None)
        if action in STAFF_ONLY:
            return bool(user.has_perm(STAFF_ONLY[action]))
        if user.has_perm("keys.view_apikey"):
            return True
        return not is_finance(user)

    def has_object_permission(self, request: Request, view: APIView, obj: Any) -> bool:
        if getattr(view, "action", None) in OWNER_ACTIONS:
            assert isinstance(obj, ApiKey)
            return bool(
                request.user.has_perm("keys.change_apikey")
                or obj.owner_id == request.user.pk
            )
        return True


class TeamAccess(DjangoModelPermissions):
    """teams/: Django's model permissions, reading included (`keys.view_team`)."""

    perms_map = {
        **DjangoModelPermissions.perms_map,
        "GET": ["%(app_label)s.view_%(model_name)s"],
        "HEAD": ["%(app_label)s.view_%(model_name)s"],
    }
