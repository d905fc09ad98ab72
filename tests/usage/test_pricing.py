"""`usage.pricing`: Decimal cost with 10 places rounded half-even once, and the
price in force at a given time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from usage.pricing import PriceInfo, cost_usd, price_at

QUANTUM = Decimal("0.0000000001")
JAN_1 = datetime(2024, 1, 1, tzinfo=UTC)


def price(
    input: str = "0.15",
    output: str = "0.60",
    cached_input: str | None = "0.075",
    *,
    id: int = 1,
    effective_from: datetime = JAN_1,
) -> PriceInfo:
    return PriceInfo(
        id=id,
        model="m",
        input=Decimal(input),
        output=Decimal(output),
        cached_input=Decimal(cached_input) if cached_input is not None else None,
        effective_from=effective_from,
    )


def exact_cost(p: PriceInfo, prompt: int, completion: int, cached: int) -> Fraction:
    """The cost as SPEC states it, in exact rational arithmetic."""
    cached = min(max(cached, 0), prompt)
    cached_rate = p.input if p.cached_input is None else p.cached_input
    per_million = (
        (prompt - cached) * Fraction(p.input)
        + cached * Fraction(cached_rate)
        + completion * Fraction(p.output)
    )
    return per_million / 1_000_000


def round_half_even_to_quantum(value: Fraction) -> Decimal:
    """Round to 10 places, ties to even, with integers only (no Decimal context)."""
    scaled = value * 10**10
    floor, remainder = divmod(scaled.numerator, scaled.denominator)
    twice = 2 * remainder
    if twice > scaled.denominator or (twice == scaled.denominator and floor % 2):
        floor += 1
    return Decimal(floor).scaleb(-10)


rates = st.decimals(
    min_value=0, max_value=1000, places=6, allow_nan=False, allow_infinity=False
)
coarse_rates = st.decimals(
    min_value=0, max_value=1000, places=4, allow_nan=False, allow_infinity=False
)
tokens = st.integers(min_value=0, max_value=10_000_000)


@st.composite
def prices(draw: st.DrawFn, rate: st.SearchStrategy[Decimal] = rates) -> PriceInfo:
    cached = draw(st.none() | rate)
    return PriceInfo(
        id=1,
        model="m",
        input=draw(rate),
        output=draw(rate),
        cached_input=cached,
        effective_from=JAN_1,
    )


def test_cost_follows_the_spec_formula_per_million_tokens():
    p = price(input="2.50", output="10.00", cached_input="1.25")

    cost = cost_usd(p, prompt_tokens=1_000, completion_tokens=500, cached_tokens=400)

    # (600 × 2.50 + 400 × 1.25 + 500 × 10.00) / 1,000,000
    assert cost == Decimal("0.0070000000")


def test_cost_is_a_decimal_with_exactly_ten_places():
    cost = cost_usd(price(), prompt_tokens=3, completion_tokens=0)

    assert isinstance(cost, Decimal)
    assert cost.as_tuple().exponent == -10
    assert cost == Decimal("0.0000004500")


@pytest.mark.parametrize(
    ("input", "expected"),
    [
        ("0.00005", "0.0000000000"),  # 0.5 quantum: ties go to the even 0
        ("0.00015", "0.0000000002"),  # 1.5 quanta: up to the even 2
        ("0.00025", "0.0000000002"),  # 2.5 quanta: down to the even 2
        ("0.00035", "0.0000000004"),  # 3.5 quanta: up to the even 4
        ("0.000251", "0.0000000003"),  # past the tie: up
    ],
)
def test_cost_is_rounded_half_even_once(input, expected):
    p = price(input=input, output="0", cached_input=None)

    cost = cost_usd(p, prompt_tokens=1, completion_tokens=0)

    assert cost == Decimal(expected)


def test_rounding_happens_once_on_the_sum_not_per_component():
    # Each part alone is 0.5 quantum (rounded to 0); together they are 1 quantum.
    p = price(input="0.00005", output="0.00005", cached_input=None)

    cost = cost_usd(p, prompt_tokens=1, completion_tokens=1)

    assert cost == QUANTUM


def test_cached_tokens_cost_the_cached_input_price():
    p = price(input="1", output="0", cached_input="0.1")

    all_cached = cost_usd(
        p, prompt_tokens=1_000, completion_tokens=0, cached_tokens=1_000
    )
    none_cached = cost_usd(p, prompt_tokens=1_000, completion_tokens=0)

    assert all_cached == Decimal("0.0001000000")
    assert none_cached == Decimal("0.0010000000")


def test_cached_tokens_cost_the_input_price_when_the_model_has_no_cached_price():
    p = price(input="1", output="0", cached_input=None)

    cost = cost_usd(p, prompt_tokens=1_000, completion_tokens=0, cached_tokens=600)

    assert cost == Decimal("0.0010000000")


def test_cached_tokens_are_capped_at_the_prompt_tokens():
    p = price(input="1", output="2", cached_input="0.5")

    over = cost_usd(p, prompt_tokens=100, completion_tokens=10, cached_tokens=5_000)
    exact = cost_usd(p, prompt_tokens=100, completion_tokens=10, cached_tokens=100)

    assert over == exact == Decimal("0.0000700000")


def test_negative_cached_tokens_count_as_none():
    p = price(input="1", output="2", cached_input="0.5")

    cost = cost_usd(p, prompt_tokens=100, completion_tokens=10, cached_tokens=-50)

    assert cost == cost_usd(p, prompt_tokens=100, completion_tokens=10)


def test_a_free_model_costs_zero_with_ten_places():
    p = price(input="0", output="0", cached_input=None)

    cost = cost_usd(p, prompt_tokens=123_456, completion_tokens=7_890)

    assert cost == 0 and cost.as_tuple().exponent == -10
    assert p.is_free


@given(p=prices(), prompt=tokens, completion=tokens, cached=tokens)
def test_cost_equals_the_exact_rational_cost_rounded_half_even(
    p, prompt, completion, cached
):
    cost = cost_usd(
        p, prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached
    )

    assert isinstance(cost, Decimal) and not isinstance(cost, float)
    assert cost.as_tuple().exponent == -10
    assert cost == round_half_even_to_quantum(exact_cost(p, prompt, completion, cached))


@given(
    p=prices(coarse_rates),
    prompt=tokens,
    completion=tokens,
    cached=tokens,
    times=st.integers(min_value=1, max_value=1000),
)
def test_cost_of_n_times_the_tokens_is_n_times_the_cost_when_exact(
    p, prompt, completion, cached, times
):
    # With at most 4 decimals per million tokens, the cost needs no rounding at all.
    cached = min(cached, prompt)

    once = cost_usd(
        p, prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached
    )
    many = cost_usd(
        p,
        prompt_tokens=prompt * times,
        completion_tokens=completion * times,
        cached_tokens=cached * times,
    )

    assert many == once * times


@given(p=prices(), a=st.tuples(tokens, tokens), b=st.tuples(tokens, tokens))
def test_the_cost_of_two_requests_together_is_within_one_quantum_of_their_sum(p, a, b):
    together = cost_usd(p, prompt_tokens=a[0] + b[0], completion_tokens=a[1] + b[1])
    apart = cost_usd(p, prompt_tokens=a[0], completion_tokens=a[1]) + cost_usd(
        p, prompt_tokens=b[0], completion_tokens=b[1]
    )

    assert abs(together - apart) <= QUANTUM


@given(p=prices(), prompt=tokens, completion=tokens, extra=tokens)
def test_more_tokens_never_cost_less(p, prompt, completion, extra):
    base = cost_usd(p, prompt_tokens=prompt, completion_tokens=completion)

    more_prompt = cost_usd(
        p, prompt_tokens=prompt + extra, completion_tokens=completion
    )
    more_output = cost_usd(
        p, prompt_tokens=prompt, completion_tokens=completion + extra
    )

    assert more_prompt >= base and more_output >= base


def newest_first(*starts: datetime) -> tuple[PriceInfo, ...]:
    ordered = sorted(starts, reverse=True)
    return tuple(price(id=i, effective_from=when) for i, when in enumerate(ordered))


def test_price_at_picks_the_latest_price_in_force():
    prices_ = newest_first(
        JAN_1, JAN_1 + timedelta(days=30), JAN_1 + timedelta(days=60)
    )

    found = price_at(prices_, JAN_1 + timedelta(days=45))

    assert found is not None
    assert found.effective_from == JAN_1 + timedelta(days=30)


def test_price_at_includes_a_price_from_its_first_instant():
    prices_ = newest_first(JAN_1, JAN_1 + timedelta(days=30))

    found = price_at(prices_, JAN_1 + timedelta(days=30))

    assert found is not None and found.effective_from == JAN_1 + timedelta(days=30)


def test_price_at_finds_nothing_before_the_first_price_or_without_prices():
    prices_ = newest_first(JAN_1)

    before = price_at(prices_, JAN_1 - timedelta(microseconds=1))
    without = price_at((), JAN_1)

    assert before is None and without is None


# Hypothesis takes naive bounds and attaches the zone itself.
instants = st.datetimes(
    min_value=datetime(2020, 1, 1),  # noqa: DTZ001
    max_value=datetime(2030, 1, 1),  # noqa: DTZ001
    timezones=st.just(UTC),
)


@given(starts=st.lists(instants, min_size=1, max_size=8, unique=True), when=instants)
def test_price_at_agrees_with_the_latest_start_not_after_the_time(starts, when):
    in_force = [start for start in starts if start <= when]

    found = price_at(newest_first(*starts), when)

    if in_force:
        assert found is not None and found.effective_from == max(in_force)
    else:
        assert found is None
