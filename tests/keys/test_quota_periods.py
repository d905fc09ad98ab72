"""Sliding windows and calendar periods, on a controlled clock.

Every call passes its own `now`, so a minute, a month or a daylight-saving day
passes in microseconds. Each test runs on both limiter backends: in-process and
Redis (the Lua script), which must agree. The usage ledger is empty here (a stub):
rebuilding counters from it is tested through the relay in
tests/relay/test_quota_redis_outage.py.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from django.test import override_settings
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from keys.quotas import Demand, QuotaRefused, counters_for
from keys.selectors import KeyInfo
from tests.support.redis_server import LimiterBackend, unit_key

# The limiter calls the (stubbed) ledger through database_sync_to_async, whose thread
# may hold a connection an earlier test left: database access must be allowed.
pytestmark = pytest.mark.django_db

TTL_MS = 600_000
ONE_REQUEST = Demand(requests=1)
ZONES = [
    "UTC",
    "America/New_York",
    "Pacific/Auckland",
    "Australia/Lord_Howe",  # half-hour daylight saving shift
    "America/Santiago",  # daylight saving starts at midnight: 00:00 does not exist
    "Asia/Kathmandu",
    "Pacific/Chatham",
]


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


async def admitted(
    backend: LimiterBackend, key: KeyInfo, now: datetime, demand: Demand = ONE_REQUEST
) -> bool:
    """One request, start to end: reserve, then settle to the same amounts."""
    try:
        reservation = await backend.limiter.reserve(
            counters_for(key, now), demand, now, TTL_MS
        )
    except QuotaRefused:
        return False
    await backend.limiter.settle(reservation, demand, now)
    return True


async def refusal(
    backend: LimiterBackend, key: KeyInfo, now: datetime, demand: Demand = ONE_REQUEST
) -> QuotaRefused:
    with pytest.raises(QuotaRefused) as refused:
        await backend.limiter.reserve(counters_for(key, now), demand, now, TTL_MS)
    return refused.value


async def test_a_minute_window_frees_a_request_a_minute_after_its_second_ends(backend):
    key = backend.key([("requests", "minute", 2)])
    t0 = at("2026-03-10T12:00:00+00:00")
    assert await admitted(backend, key, t0)
    assert await admitted(backend, key, t0 + timedelta(seconds=10))

    at_30s = await refusal(backend, key, t0 + timedelta(seconds=30))
    still_full = await admitted(
        backend, key, t0 + timedelta(seconds=60, milliseconds=999)
    )
    first_freed = await admitted(backend, key, t0 + timedelta(seconds=61))
    second_still_counts = await admitted(backend, key, t0 + timedelta(seconds=61))

    assert at_30s.state.used == 2
    assert at_30s.state.reset_s == pytest.approx(
        31.0
    )  # t0's 1-second bucket leaves at t0+61s
    assert not still_full
    assert first_freed
    assert not second_still_counts


async def test_a_window_slides_rather_than_resetting_at_the_top_of_the_minute(backend):
    key = backend.key([("tokens", "minute", 100)])
    t0 = at("2026-03-10T12:00:45+00:00")
    assert await admitted(backend, key, t0, Demand(tokens=60))

    after_the_minute_turns = await admitted(
        backend, key, at("2026-03-10T12:01:05+00:00"), Demand(tokens=60)
    )
    a_minute_later = await admitted(
        backend, key, t0 + timedelta(seconds=61), Demand(tokens=60)
    )

    assert not after_the_minute_turns
    assert a_minute_later


async def test_an_hour_window_frees_its_room_an_hour_after_the_minute_of_use(backend):
    key = backend.key([("requests", "hour", 1)])
    t0 = at("2026-03-10T12:00:00+00:00")
    assert await admitted(backend, key, t0)

    at_59_minutes = await refusal(backend, key, t0 + timedelta(minutes=59))
    at_60_minutes = await admitted(backend, key, t0 + timedelta(minutes=60))
    at_61_minutes = await admitted(backend, key, t0 + timedelta(minutes=61))

    assert at_59_minutes.state.reset_s == pytest.approx(120.0)
    assert not at_60_minutes
    assert at_61_minutes


async def test_a_month_starts_at_midnight_of_the_billing_zone_not_of_utc(
    backend, settings
):
    settings.GATEWAY_BILLING_TZ = "Pacific/Auckland"  # UTC+13 in January
    key = backend.key([("cost_usd", "month", "1.00")])
    january_in_auckland = at("2026-01-31T10:30:00+00:00")  # 23:30 on the 31st there
    assert await admitted(
        backend, key, january_in_auckland, Demand(cost_micros=1_000_000)
    )

    last_minute_of_january = await refusal(
        backend, key, at("2026-01-31T10:59:59+00:00"), Demand(cost_micros=1)
    )
    first_second_of_february = await admitted(
        backend, key, at("2026-01-31T11:00:00+00:00"), Demand(cost_micros=1_000_000)
    )

    assert last_minute_of_january.state.counter.name.endswith(":month:2026-01")
    assert last_minute_of_january.state.reset_s == pytest.approx(1.0)
    assert first_second_of_february  # still January 31st in UTC


async def test_a_month_in_a_zone_behind_utc_lasts_until_its_own_midnight(
    backend, settings
):
    settings.GATEWAY_BILLING_TZ = "America/New_York"  # UTC-5 in February
    key = backend.key([("cost_usd", "month", "1.00")])
    assert await admitted(
        backend, key, at("2026-02-28T20:00:00-05:00"), Demand(cost_micros=1_000_000)
    )

    march_in_utc = await admitted(
        backend, key, at("2026-03-01T04:59:59+00:00"), Demand(cost_micros=1)
    )
    march_in_new_york = await admitted(
        backend, key, at("2026-03-01T05:00:00+00:00"), Demand(cost_micros=1_000_000)
    )

    assert not march_in_utc  # still February 28th, 23:59:59 in New York
    assert march_in_new_york


async def test_the_day_daylight_saving_starts_lasts_23_hours(backend, settings):
    settings.GATEWAY_BILLING_TZ = "America/New_York"
    key = backend.key([("requests", "day", 1)])
    assert await admitted(backend, key, at("2026-03-08T00:30:00-05:00"))

    refused = await refusal(backend, key, at("2026-03-08T23:59:59-04:00"))
    next_day = await admitted(backend, key, at("2026-03-09T00:00:00-04:00"))

    [day] = counters_for(key, at("2026-03-08T12:00:00-04:00"))
    assert day.period_end.astimezone(UTC) - day.period_start.astimezone(
        UTC
    ) == timedelta(hours=23)
    assert refused.state.reset_s == pytest.approx(1.0)
    assert next_day  # 23 hours after midnight; a 24-hour day would still refuse


async def test_the_day_daylight_saving_ends_lasts_25_hours(backend, settings):
    settings.GATEWAY_BILLING_TZ = "America/New_York"
    key = backend.key([("requests", "day", 1)])
    midnight = at("2026-11-01T00:00:00-04:00")
    assert await admitted(backend, key, midnight + timedelta(minutes=30))

    after_24_hours = await admitted(
        backend, key, midnight + timedelta(hours=24, minutes=30)
    )
    after_25_hours = await admitted(backend, key, midnight + timedelta(hours=25))

    [day] = counters_for(key, midnight)
    assert day.period_end.astimezone(UTC) - day.period_start.astimezone(
        UTC
    ) == timedelta(hours=25)
    assert not after_24_hours  # 23:30 on November 1st, local time
    assert after_25_hours


async def test_a_total_quota_never_resets(backend):
    key = backend.key([("requests", "total", 2)])
    assert await admitted(backend, key, at("2020-01-01T00:00:00+00:00"))
    assert await admitted(backend, key, at("2026-06-30T23:59:59+00:00"))

    decades_later = await refusal(backend, key, at("2045-12-31T12:00:00+00:00"))

    assert decades_later.state.used == 2
    assert math.isinf(decades_later.state.reset_s)  # no Retry-After: it never frees
    assert decades_later.state.counter.ttl_s(at("2045-12-31T12:00:00+00:00")) == 0


# --- calendar periods, for any instant in any zone ----------------------------------


instants = st.datetimes(
    min_value=datetime(2000, 1, 1),  # noqa: DTZ001 (hypothesis wants naive bounds)
    max_value=datetime(2040, 12, 31),  # noqa: DTZ001
    timezones=st.just(UTC),
)


@hypothesis_settings(max_examples=300, deadline=None)
@given(
    now=instants, zone=st.sampled_from(ZONES), period=st.sampled_from(["day", "month"])
)
def test_a_calendar_counter_is_the_local_period_that_contains_the_instant(
    now, zone, period
):
    key = unit_key([("requests", period, 1)])

    with override_settings(GATEWAY_BILLING_TZ=zone):
        [counter] = counters_for(key, now)
        [next_counter] = counters_for(key, counter.period_end)
        [last_of_it] = counters_for(key, counter.period_end - timedelta(microseconds=1))

    local_start = counter.period_start.astimezone(ZoneInfo(zone))
    local_now = now.astimezone(ZoneInfo(zone))
    assert counter.period_start <= now < counter.period_end
    assert local_start.date() == (
        local_now.date() if period == "day" else local_now.date().replace(day=1)
    )
    assert counter.name.endswith(
        f":{period}:{local_now:%Y-%m-%d}"
        if period == "day"
        else f":{period}:{local_now:%Y-%m}"
    )
    assert last_of_it.name == counter.name
    assert next_counter.name != counter.name
    assert next_counter.period_start == counter.period_end
    assert (
        timedelta(hours=22)
        <= counter.period_end - counter.period_start.astimezone(UTC)
        <= timedelta(days=31, hours=2)
    )
