"""Who may call the usage API; which rows they then see is `usage.selectors`' job."""

from __future__ import annotations

from typing import Any

from rest_framework.exceptions import MethodNotAllowed
from rest_framework.permissions import SAFE_METHODS, BasePermission
from rest_framework.request import Request


class ReadsUsage(BasePermission):
    """Any signed-in user reads (scoped by the selectors); nobody writes.

    Anonymous callers get 401 (the JWT authenticator names itself in
    WWW-Authenticate); a write gets 405 whoever asks, before any view code runs.
    """

    def has_permission(self, request: Request, view: Any) -> bool:
        if not (request.user and request.user.is_authenticated):
            return False
        if request.method not in SAFE_METHODS:
            raise MethodNotAllowed(request.method or "")
        return True
