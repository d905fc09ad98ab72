"""The /reports/ page in a real headless Chromium against the gateway on uvicorn:
filters applied through the form, the chart drawn (screenshot in artifacts/),
and the downloaded CSV equal to the table."""

from __future__ import annotations

import csv
import io
import time
import uuid
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import Group, User
from django.test import Client

from keys.models import ApiKey
from keys.roles import FINANCE_GROUP
from tests import factories
from tests.support.browser import browser, screenshot
from usage.models import UsageRow
from usage.rollups import rebuild_days

pytestmark = pytest.mark.django_db(transaction=True)

APRIL = [date(2024, 4, 1) + timedelta(days=n) for n in range(30)]
# The first series' colour in static/usage/reports.js.
FIRST_SERIES_RGB = (37, 99, 235)
# How many series the chart drew (set by reports.js once Chart.js is done).
DRAWN = "return document.getElementById('cost-chart')?.dataset.drawn"


def spend(key: ApiKey, day: date, model: str, cost: str) -> None:
    UsageRow.objects.create(
        request_id=f"req-{uuid.uuid4().hex}",
        created_at=datetime.combine(day, datetime.min.time(), tzinfo=UTC)
        + timedelta(hours=9),
        key=key,
        key_prefix=key.prefix,
        team_id=key.team_id,
        endpoint="chat.completions",
        model=model,
        status_code=200,
        prompt_tokens=1200,
        completion_tokens=300,
        cost_usd=Decimal(cost),
    )


def session_cookie(person: User) -> str:
    client = Client()
    client.force_login(person)
    return client.cookies["sessionid"].value


def wait_for(condition: Any, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("the page did not get there in time")


def test_finance_filters_the_report_sees_the_chart_and_downloads_the_table(
    gateway, tmp_path: Path
):
    # Imported here: without selenium, browser() skips (or fails in CI) cleanly.
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    ml, web = factories.make_team("ml"), factories.make_team("web")
    ml_key, _ = factories.make_key(name="ml-batch", team=ml)
    web_key, _ = factories.make_key(name="web-app", team=web)
    for n, day in enumerate(APRIL[:10]):
        spend(ml_key, day, "gpt-4o", f"{n + 1}.25")
        spend(ml_key, day, "gpt-4o-mini", "25.0000040500")
        spend(web_key, day, "gpt-4o", "100")
    rebuild_days(APRIL)
    finance = User.objects.create_user("fin")
    finance.groups.add(Group.objects.get_or_create(name=FINANCE_GROUP)[0])
    downloads = tmp_path / "downloads"
    downloads.mkdir()

    with browser(download_dir=downloads) as driver:
        driver.get(f"{gateway.url}/reports/login/")
        driver.add_cookie(
            {"name": "sessionid", "value": session_cookie(finance), "path": "/"}
        )
        driver.get(f"{gateway.url}/reports/?since=2024-04-01&until=2024-04-30")
        stacked = wait_for(lambda: driver.execute_script(DRAWN))
        screenshot(driver, "reports-page-all-teams")
        Select(driver.find_element(By.NAME, "team")).select_by_visible_text("ml")
        model = driver.find_element(By.NAME, "model")
        model.clear()
        model.send_keys("gpt-4o")
        driver.find_element(By.CSS_SELECTOR, "#filters button[type=submit]").click()
        wait_for(lambda: "team=" in driver.current_url)

        total = driver.find_element(By.ID, "total-cost").text
        drawn = wait_for(lambda: driver.execute_script(DRAWN))
        coloured = driver.execute_script(
            """
            const canvas = document.getElementById('cost-chart');
            const pixels = canvas.getContext('2d')
                .getImageData(0, 0, canvas.width, canvas.height).data;
            let n = 0;
            for (let i = 0; i < pixels.length; i += 4) {
                if (pixels[i] === arguments[0] && pixels[i + 1] === arguments[1]
                    && pixels[i + 2] === arguments[2]) n++;
            }
            return n;
            """,
            *FIRST_SERIES_RGB,
        )
        shot = screenshot(driver, "reports-page")
        cells = driver.execute_script(
            """
            return [...document.querySelectorAll('#report-table tbody tr')].map(
                tr => Object.fromEntries([...tr.querySelectorAll('td')].map(
                    td => [td.dataset.column, [td.dataset.value, td.innerText]])));
            """
        )
        driver.find_element(By.ID, "export-csv").click()
        downloaded = wait_for(
            lambda: [p for p in downloads.glob("*.csv") if p.stat().st_size > 0]
        )

    # Team ml on gpt-4o in April: 1.25 + 2.25 + ... + 10.25.
    assert total == "57.50"
    assert stacked == "2"  # gpt-4o and gpt-4o-mini, stacked
    assert drawn == "1"  # one model left after the filters
    assert coloured > 500, "the chart's bars were not drawn"
    assert shot.exists() and shot.stat().st_size > 10_000
    exported = list(csv.DictReader(io.StringIO(downloaded[0].read_text())))
    assert len(cells) == len(exported) == 10
    for shown, line in zip(cells, exported, strict=True):
        assert {column: value for column, (value, _) in shown.items()} == line
        assert Decimal(shown["cost_usd"][1].split()[0].replace(",", "")) == Decimal(
            line["cost_usd"]
        )
        assert (line["team"], line["model"]) == ("ml", "gpt-4o")
