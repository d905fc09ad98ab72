"""Who someone is to the gateway: the role checks every interface shares."""

from __future__ import annotations

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser

FINANCE_GROUP = "finance"


def is_finance(user: AbstractBaseUser | AnonymousUser) -> bool:
    """Finance reads usage and reports, never keys."""
    return (
        bool(user.is_authenticated) and user.groups.filter(name=FINANCE_GROUP).exists()
    )
