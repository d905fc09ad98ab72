"""The configuration generation: moves on every change, never repeats after the
row is recreated (a restore, or a test database flushed between tests)."""

from __future__ import annotations

import pytest
from asgiref.sync import async_to_sync

from relay.generation import bump_config_generation, read_config_generation
from relay.models import ConfigGeneration
from relay.snapshot import Snapshot
from tests import factories

pytestmark = pytest.mark.django_db(transaction=True)


def test_each_change_moves_the_generation_on_commit():
    before = read_config_generation()

    bump_config_generation()  # outside a transaction: commits at once
    first = read_config_generation()
    bump_config_generation()

    assert before != first
    assert read_config_generation() == first + 1


def test_a_recreated_row_does_not_count_up_through_values_already_seen():
    seen = []
    for _ in range(20):
        bump_config_generation()
        seen.append(read_config_generation())
        ConfigGeneration.objects.all().delete()

    assert len(set(seen)) == len(seen)


def test_a_process_reloads_after_the_table_is_recreated_with_the_same_number_of_changes():
    """The failure this guards against: a process loaded generation N of one
    configuration; the table is emptied and as many changes are made again; a
    counter restarting at 1 would reach N and the process would keep the old
    catalog (the relay answered 404 for a model that exists)."""
    snapshot = Snapshot()
    factories.make_provider("http://127.0.0.1:9/v1")
    factories.make_route("before-flush")
    async_to_sync(snapshot.refresh)()
    held = snapshot.generation

    ConfigGeneration.objects.all().delete()
    factories.make_provider("http://127.0.0.1:9/v1", name="other")
    factories.make_route("after-flush", provider="other")
    async_to_sync(snapshot.refresh)()

    assert snapshot.generation != held
    catalog = async_to_sync(snapshot.catalog)()
    assert catalog.candidates("after-flush")
