"""`check --deploy` warns when the gateway's secrets hang on DJANGO_SECRET_KEY."""

from __future__ import annotations

import pytest
from django.core.checks import run_checks
from django.test import override_settings

FERNET_KEY = "yWJ8aYBEv0b6nXLmG1Yc2TpxqJ0uR1iW0vUuJ8Lh3Yo="


def deploy_check_ids() -> set[str]:
    return {m.id for m in run_checks(include_deployment_checks=True)}


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"GATEWAY_KEY_HASH_SECRET": "same", "GATEWAY_ENCRYPTION_KEY": ""}, {
            "keys.W001", "keys.W002"}),
        ({"GATEWAY_KEY_HASH_SECRET": "own", "GATEWAY_ENCRYPTION_KEY": ""}, {
            "keys.W002"}),
        ({"GATEWAY_KEY_HASH_SECRET": "same", "GATEWAY_ENCRYPTION_KEY": FERNET_KEY}, {
            "keys.W001"}),
        ({"GATEWAY_KEY_HASH_SECRET": "own", "GATEWAY_ENCRYPTION_KEY": FERNET_KEY},
         set()),
    ],
)  # fmt: skip
def test_each_secret_left_to_derive_from_django_s_is_warned_about(overrides, expected):
    with override_settings(SECRET_KEY="same", **overrides):
        ids = deploy_check_ids()

    assert {i for i in ids if i.startswith("keys.")} == expected


def test_the_checks_run_only_with_deploy():
    with override_settings(SECRET_KEY="same", GATEWAY_KEY_HASH_SECRET="same"):
        ids = {m.id for m in run_checks(include_deployment_checks=False)}

    assert "keys.W001" not in ids
