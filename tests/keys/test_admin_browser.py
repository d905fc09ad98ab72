"""Django admin in a real headless browser (Chromium), against the gateway as the
SPEC serves it (uvicorn): sign in, issue a key, see its secret once, revoke it, and
watch the relay refuse it. Screenshots land in artifacts/."""

from __future__ import annotations

import re
import time
from datetime import timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone

from keys.models import ApiKey, KeyEvent
from keys.services import QuotaSpec, set_key_limits, upsert_team
from tests import factories
from tests.support.browser import browser, screenshot
from tests.support.servers import ServerProcess
from tests.support.services import IN_CI
from usage.models import UsageRow

if not IN_CI:  # CI must have it (requirements-dev.txt): there the import fails loudly
    pytest.importorskip("selenium")
from selenium.common.exceptions import NoAlertPresentException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

pytestmark = pytest.mark.django_db(transaction=True)

PASSWORD = "browser-admin-pass-1"
SECRET = re.compile(r"^sk-gw-[A-Za-z0-9]{8}-[A-Za-z0-9_-]{32,}$")


@pytest.fixture
def admin_login() -> Any:
    return get_user_model().objects.create_superuser("browser-admin", password=PASSWORD)


def sign_in(driver: Any, server: ServerProcess) -> None:
    driver.get(f"{server.url}/admin/login/?next=/admin/")
    driver.find_element(By.NAME, "username").send_keys("browser-admin")
    driver.find_element(By.NAME, "password").send_keys(PASSWORD)
    driver.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    wait_for(lambda: driver.find_elements(By.ID, "gateway-dashboard"))


def wait_for(condition: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError("the page never got there")


def relay_status(server: ServerProcess, secret: str) -> int:
    return httpx.get(
        f"{server.url}/v1/models", headers={"authorization": f"Bearer {secret}"}
    ).status_code


def busy_key() -> ApiKey:
    """A key with quotas and a month of traffic, so the pages have numbers to show."""
    team = upsert_team(
        name="payments", quotas=[QuotaSpec("cost_usd", "month", Decimal(50))]
    )
    key, _ = factories.make_key(
        name="busy app",
        team=team,
        quotas=[
            QuotaSpec("requests", "minute", Decimal(3)),
            QuotaSpec("tokens", "day", Decimal(100_000)),
        ],
    )
    now = timezone.now()
    UsageRow.objects.bulk_create(
        UsageRow(
            request_id=f"req-browser-{n}",
            # Six in the last minute (for a minute to come), six earlier today.
            created_at=now - timedelta(seconds=1 if n < 6 else 600 + n),
            key=key,
            key_prefix=key.prefix,
            team=team,
            endpoint="chat.completions",
            provider="openai",
            model=("gpt-4o-mini", "gpt-4o")[n % 2],
            status_code=200 if n % 5 else 502,
            prompt_tokens=120,
            completion_tokens=40,
            usage_source=UsageRow.Source.PROVIDER,
            cost_usd=Decimal("0.0125"),
        )
        for n in range(12)
    )
    set_key_limits(key=key, log_bodies=True, by=None)
    return key


def test_an_admin_issues_sees_the_secret_once_and_revokes_the_key_in_a_browser(
    gateway, admin_login
):
    busy = busy_key()

    with browser() as driver:
        sign_in(driver, gateway)
        dashboard = driver.find_element(By.ID, "gateway-dashboard").text
        screenshot(driver, "admin-index")
        driver.get(f"{gateway.url}/admin/keys/apikey/{busy.pk}/change/")
        status = driver.find_element(By.XPATH, "//h2[normalize-space()='Status']")
        driver.execute_script("arguments[0].scrollIntoView()", status)
        trail = driver.find_element(By.CSS_SELECTOR, ".field-audit_trail").text
        screenshot(driver, "admin-key-status-and-trail")

        driver.get(f"{gateway.url}/admin/keys/apikey/add/")
        driver.find_element(By.NAME, "name").send_keys("browser app")
        driver.find_element(By.NAME, "allowed_models").send_keys("gpt-4o-mini")
        driver.find_element(By.NAME, "_save").click()
        field = wait_for(lambda: driver.find_elements(By.ID, "issued-secret"))[0]
        secret = field.get_attribute("value")
        screenshot(driver, "admin-key-issued")
        works_at_first = relay_status(gateway, secret)

        driver.find_element(By.PARTIAL_LINK_TEXT, "I have copied it").click()
        wait_for(lambda: driver.find_elements(By.ID, "apikey_form"))
        change_page = driver.page_source
        screenshot(driver, "admin-key-change")
        driver.find_element(
            By.CSS_SELECTOR, ".object-tools a[href$='/revoke/']"
        ).click()
        driver.find_element(By.CSS_SELECTOR, "input[value='Yes, revoke']").click()
        wait_for(lambda: "Revoked" in driver.page_source)
        started = time.monotonic()
        while relay_status(gateway, secret) != 401 and time.monotonic() - started < 5:
            time.sleep(0.02)
        refused_after = time.monotonic() - started
        screenshot(driver, "admin-key-revoked")

        driver.get(f"{gateway.url}/admin/keys/apikey/")
        listing = driver.page_source
        screenshot(driver, "admin-key-list")

    key = ApiKey.objects.get(name="browser app")
    assert "busy app" in dashboard and "gpt-4o-mini" in dashboard
    assert "log_bodies: False → True" in trail
    assert SECRET.match(secret) and secret.startswith(f"sk-gw-{key.prefix}-")
    assert works_at_first == 200
    assert secret not in change_page and secret not in listing
    # Six requests in the last minute against a limit of 3: shown, and in bold.
    assert "<strong>req/min 6 / 3</strong>" in listing
    assert key.status() == ApiKey.Status.REVOKED and key.revoked_by == admin_login
    assert refused_after < 1.0
    assert list(
        KeyEvent.objects.filter(key=key).order_by("at").values_list("action", "via")
    ) == [("issued", "admin"), ("revoked", "admin")]


def test_a_hostile_key_name_is_only_text_in_the_browser(gateway, admin_login):
    name = "<img src=x onerror=alert('xss')><script>alert('xss')</script>"
    factories.make_key(name=name)

    with browser() as driver:
        sign_in(driver, gateway)
        driver.get(f"{gateway.url}/admin/keys/apikey/")
        wait_for(lambda: driver.find_elements(By.ID, "result_list"))
        try:
            driver.switch_to.alert.dismiss()
            alerted = True
        except NoAlertPresentException:
            alerted = False
        shown = driver.find_element(By.ID, "result_list").text
        injected = driver.find_elements(
            By.CSS_SELECTOR, "#result_list img, #result_list script"
        )
        screenshot(driver, "admin-key-list-hostile-name")

    assert not alerted
    assert name in shown
    assert injected == []
