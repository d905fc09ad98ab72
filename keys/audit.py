"""The key audit trail: what `keys.services` records about each step of a key's life.

An event's details are built here, from a fixed list of public fields, so no caller
can put a secret or a hash into the trail by passing the wrong dictionary: the key's
name, owner and team (by name), its limits and quotas, times, and public prefixes.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser

from keys.models import ApiKey, KeyEvent, Quota

Actor = AbstractBaseUser | AnonymousUser | None


def limit_text(limit: Decimal) -> str:
    """A quota limit without trailing zeros: `60`, not `60.0000000000`."""
    return format(limit.normalize(), "f") if limit else "0"


def quota_entries(quotas: Any) -> list[dict[str, str]]:
    """Quotas (model rows or specs) as sorted, JSON-ready entries."""
    entries = [
        {"metric": q.metric, "period": q.period, "limit": limit_text(q.limit)}
        for q in quotas
    ]
    return sorted(entries, key=lambda e: (e["metric"], e["period"]))


def key_state(key: ApiKey) -> dict[str, Any]:
    """The audited, public state of a key, JSON-ready."""
    return {
        "name": key.name,
        "owner": key.owner.get_username() if key.owner is not None else None,
        "team": key.team.name if key.team is not None else None,
        "allowed_models": list(key.allowed_models or []),
        "ip_allowlist": list(key.ip_allowlist or []),
        "expires_at": _moment(key.expires_at),
        "log_bodies": key.log_bodies,
        "allow_unpriced": key.allow_unpriced,
        "quotas": quota_entries(Quota.objects.filter(key=key)),
    }


def changes(before: dict[str, Any], after: dict[str, Any]) -> dict[str, list[Any]]:
    """`{field: [old, new]}` for each audited field whose value differs."""
    return {
        name: [before.get(name), after.get(name)]
        for name in after
        if before.get(name) != after.get(name)
    }


def record_event(
    *,
    key: ApiKey,
    action: str,
    by: Actor,
    via: str,
    details: dict[str, Any],
) -> KeyEvent:
    actor = by if by is not None and by.is_authenticated else None
    return KeyEvent.objects.create(
        key=key,
        action=action,
        actor=actor,
        actor_name=actor.get_username() if actor is not None else "",
        via=via,
        details=details,
    )


def _moment(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def summarize(event: KeyEvent) -> str:
    """One line of plain text about an event, for admin (which escapes it)."""
    details = event.details or {}
    if event.action == KeyEvent.Action.ROTATED:
        until = details.get("previous_valid_until")
        old = details.get("previous_prefix", "?")
        kept = f"valid until {until}" if until else "retired at once"
        return f"new prefix {details.get('prefix', '?')}; previous {old} {kept}"
    if event.action == KeyEvent.Action.CHANGED:
        return "; ".join(
            f"{name}: {_show(old)} → {_show(new)}"
            for name, (old, new) in sorted(details.get("changes", {}).items())
        )
    if event.action == KeyEvent.Action.ISSUED:
        shown = [f"prefix {details.get('prefix', '?')}"]
        for name in ("name", "owner", "team", "allowed_models", "expires_at"):
            if details.get(name):
                shown.append(f"{name} {_show(details[name])}")
        if details.get("quotas"):
            shown.append(f"quotas {_show(details['quotas'])}")
        return "; ".join(shown)
    return f"prefix {details.get('prefix', '?')}"


def _show(value: Any) -> str:
    if value is None or value == []:
        return "—"
    if isinstance(value, list):
        return ", ".join(
            f"{v['metric']}/{v['period']} ≤ {v['limit']}"
            if isinstance(v, dict)
            else str(v)
            for v in value
        )
    return str(value)
