"""`python manage.py loadconfig FILE.yaml`: providers, models and prices, idempotently."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from io import StringIO
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection

from relay.generation import read_config_generation
from relay.models import ModelRoute, Provider
from usage.models import Price

# The SPEC's example, verbatim, plus the `router` provider its wildcard model names.
SPEC_EXAMPLE = """\
providers:
  - name: openai
    base_url: https://api.openai.com/v1   # any OpenAI-compatible base URL
    api_key_env: OPENAI_API_KEY
    timeout_s: 60
  - name: router
    base_url: https://openrouter.ai/api/v1
    api_key_env: OPENROUTER_API_KEY
models:
  - name: gpt-4o-mini             # the public name apps send
    provider: openai
    upstream_model: gpt-4o-mini   # optional, defaults to name
    fallbacks: [backup-mini]      # optional: other public model names, tried in order
    max_output_tokens: 16384      # used for budget reservation when a request sets no max_tokens
  - name: "router/*"              # wildcard: router/x goes to provider `router` as model x
    provider: router
prices:                           # USD per million tokens, effective-dated; old rows keep old prices
  - model: gpt-4o-mini
    input: "0.15"
    output: "0.60"
    cached_input: "0.075"
    effective_from: 2024-07-18
"""

TWO_PRICES = """\
providers:
  - {name: openai, base_url: "https://api.openai.com/v1", api_key_env: OPENAI_API_KEY}
models:
  - {name: gpt-4o-mini, provider: openai}
  - {name: gpt-4o, provider: openai}
prices:
  - {model: gpt-4o-mini, input: "0.15", output: "0.60", effective_from: 2024-07-18}
  - {model: gpt-4o, input: "2.50", output: "10.00", effective_from: 2024-08-06}
"""


@pytest.fixture
def write_yaml(tmp_path: Path):
    def write(text: str, name: str = "gateway.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


def loadconfig(path: Path) -> str:
    out = StringIO()
    call_command("loadconfig", str(path), stdout=out)
    return out.getvalue()


def snapshot_of_config() -> list[tuple]:
    """Every row loadconfig writes, with every column."""
    return [
        *Provider.objects.order_by("name").values_list(),
        *ModelRoute.objects.order_by("name").values_list(),
        *Price.objects.order_by("model", "effective_from").values_list(),
    ]


def nothing_written() -> bool:
    return not (
        Provider.objects.exists()
        or ModelRoute.objects.exists()
        or Price.objects.exists()
    )


@pytest.mark.django_db
def test_the_spec_example_creates_its_providers(write_yaml):
    loadconfig(write_yaml(SPEC_EXAMPLE))

    openai = Provider.objects.get(name="openai")

    assert openai.base_url == "https://api.openai.com/v1"
    assert openai.api_key_env == "OPENAI_API_KEY"
    assert openai.timeout_s == 60
    assert openai.api_key_encrypted == ""
    assert set(Provider.objects.values_list("name", flat=True)) == {"openai", "router"}


@pytest.mark.django_db
def test_the_spec_example_creates_its_models_and_their_wildcard(write_yaml):
    loadconfig(write_yaml(SPEC_EXAMPLE))

    mini = ModelRoute.objects.get(name="gpt-4o-mini")
    router = ModelRoute.objects.get(name="router/*")

    assert (mini.provider.name, mini.upstream_model) == ("openai", "gpt-4o-mini")
    assert mini.fallbacks == ["backup-mini"]
    assert mini.max_output_tokens == 16384
    assert router.provider.name == "router" and router.is_wildcard
    # "" stands for "the public name", as admin shows it.
    assert router.upstream_model == ""
    assert router.fallbacks == [] and router.max_output_tokens is None


@pytest.mark.django_db
def test_the_spec_example_creates_its_price_as_exact_decimals(write_yaml):
    loadconfig(write_yaml(SPEC_EXAMPLE))

    price = Price.objects.get(model="gpt-4o-mini")

    assert (price.input, price.output, price.cached_input) == (
        Decimal("0.15"),
        Decimal("0.60"),
        Decimal("0.075"),
    )
    assert all(isinstance(v, Decimal) for v in (price.input, price.output))
    assert price.effective_from == datetime(2024, 7, 18, tzinfo=UTC)


@pytest.mark.django_db
def test_a_price_date_starts_at_midnight_in_the_billing_time_zone(write_yaml, settings):
    settings.GATEWAY_BILLING_TZ = "America/New_York"

    loadconfig(write_yaml(SPEC_EXAMPLE))

    price = Price.objects.get(model="gpt-4o-mini")
    midnight = datetime(2024, 7, 18, tzinfo=ZoneInfo("America/New_York"))
    assert price.effective_from == midnight
    assert price.effective_from == datetime(2024, 7, 18, 4, 0, tzinfo=UTC)


@pytest.mark.django_db
def test_a_price_with_an_explicit_instant_keeps_it(write_yaml):
    text = SPEC_EXAMPLE.replace(
        "effective_from: 2024-07-18", "effective_from: 2024-07-18T10:00:00+02:00"
    )

    loadconfig(write_yaml(text))

    price = Price.objects.get(model="gpt-4o-mini")
    assert price.effective_from == datetime(2024, 7, 18, 8, 0, tzinfo=UTC)


@pytest.mark.django_db
def test_a_model_without_upstream_model_is_stored_as_the_same_name(write_yaml):
    text = SPEC_EXAMPLE.replace(
        "    upstream_model: gpt-4o-mini   # optional, defaults to name\n", ""
    )

    loadconfig(write_yaml(text))

    assert ModelRoute.objects.get(name="gpt-4o-mini").upstream_model == ""


def test_loading_the_same_file_twice_changes_nothing_the_second_time(
    transactional_db, write_yaml
):
    path = write_yaml(SPEC_EXAMPLE)
    first = loadconfig(path)
    before, generation = snapshot_of_config(), read_config_generation()

    second = loadconfig(path)

    assert first.startswith("5 rows")
    assert second.startswith("0 rows")
    # Every column, `updated_at` included, is as the first run left it.
    assert snapshot_of_config() == before
    assert read_config_generation() == generation


def test_loading_a_file_moves_the_config_generation(transactional_db, write_yaml):
    before = read_config_generation()

    loadconfig(write_yaml(SPEC_EXAMPLE))

    assert read_config_generation() > before


@pytest.mark.django_db
def test_changing_one_price_updates_that_row_only(write_yaml):
    loadconfig(write_yaml(TWO_PRICES))
    changed = Price.objects.get(model="gpt-4o-mini")
    untouched_before = list(Price.objects.filter(model="gpt-4o").values_list())
    models_before = list(ModelRoute.objects.order_by("name").values_list())

    output = loadconfig(
        write_yaml(TWO_PRICES.replace('output: "0.60"', 'output: "0.66"'))
    )

    assert output.startswith("1 rows")
    assert Price.objects.count() == 2
    assert Price.objects.get(pk=changed.pk).output == Decimal("0.66")
    assert Price.objects.get(pk=changed.pk).input == Decimal("0.15")
    assert list(Price.objects.filter(model="gpt-4o").values_list()) == untouched_before
    assert list(ModelRoute.objects.order_by("name").values_list()) == models_before


@pytest.mark.django_db
def test_a_new_effective_date_adds_a_price_and_keeps_the_old_one(write_yaml):
    loadconfig(write_yaml(TWO_PRICES))
    text = TWO_PRICES + (
        '  - {model: gpt-4o, input: "2.00", output: "8.00", effective_from: 2025-01-01}\n'
    )

    loadconfig(write_yaml(text))

    prices = Price.objects.filter(model="gpt-4o").order_by("effective_from")
    assert [(p.input, p.effective_from.date().isoformat()) for p in prices] == [
        (Decimal("2.50"), "2024-08-06"),
        (Decimal("2.00"), "2025-01-01"),
    ]


@pytest.mark.django_db
def test_invalid_yaml_is_refused_and_nothing_is_written(write_yaml):
    path = write_yaml(SPEC_EXAMPLE + "models: [unclosed\n")

    with pytest.raises(CommandError):
        loadconfig(path)

    assert nothing_written()


@pytest.mark.django_db
def test_a_missing_file_is_refused(tmp_path):
    with pytest.raises(CommandError):
        loadconfig(tmp_path / "absent.yaml")

    assert nothing_written()


@pytest.mark.django_db
def test_a_model_of_an_unknown_provider_is_refused_and_nothing_is_written(write_yaml):
    text = SPEC_EXAMPLE.replace("    provider: router\n", "    provider: nowhere\n")

    with pytest.raises(CommandError, match="nowhere"):
        loadconfig(write_yaml(text))

    assert nothing_written()


@pytest.mark.django_db
def test_an_unquoted_price_is_refused_and_nothing_is_written(write_yaml):
    text = SPEC_EXAMPLE.replace('input: "0.15"', "input: 0.15")

    with pytest.raises(CommandError, match="quote"):
        loadconfig(write_yaml(text))

    assert nothing_written()


@pytest.mark.django_db
@pytest.mark.parametrize(
    "field, value",
    [
        ("input", '"cheap"'),
        ("effective_from", "someday"),
        ("effective_from", "2024-07-18 10:00:00"),  # a time with no offset
    ],
)
def test_a_malformed_price_is_refused_and_nothing_is_written(write_yaml, field, value):
    old = {"input": 'input: "0.15"', "effective_from": "effective_from: 2024-07-18"}[
        field
    ]
    text = SPEC_EXAMPLE.replace(old, f"{field}: {value}")

    with pytest.raises(CommandError):
        loadconfig(write_yaml(text))

    assert nothing_written()


@pytest.mark.django_db
def test_a_failed_update_leaves_the_loaded_configuration_as_it_was(write_yaml):
    loadconfig(write_yaml(SPEC_EXAMPLE))
    before = snapshot_of_config()
    text = SPEC_EXAMPLE.replace("timeout_s: 60", "timeout_s: 90").replace(
        'output: "0.60"', "output: 0.70"
    )

    with pytest.raises(CommandError):
        loadconfig(write_yaml(text))

    assert snapshot_of_config() == before


@pytest.mark.django_db
@pytest.mark.parametrize(
    "text",
    [
        "- just\n- a list\n",
        "providers: {name: openai}\n",
        "models:\n  - provider: openai\n",
    ],
)
def test_a_file_of_the_wrong_shape_is_refused(write_yaml, text):
    with pytest.raises(CommandError):
        loadconfig(write_yaml(text))

    assert nothing_written()


@pytest.mark.django_db
def test_the_providers_secret_is_never_stored_in_plain_text(write_yaml, monkeypatch):
    secret = "sk-provider-live-0123456789abcdefghij"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    text = SPEC_EXAMPLE.replace(
        "    api_key_env: OPENAI_API_KEY\n",
        f"    api_key_env: OPENAI_API_KEY\n    api_key: {secret}\n",
    )

    loadconfig(write_yaml(text))

    with connection.cursor() as cursor:
        cursor.execute("SELECT * FROM relay_provider")
        cells = [str(cell) for row in cursor.fetchall() for cell in row]
    assert "OPENAI_API_KEY" in cells
    assert not any(secret in cell for cell in cells)
