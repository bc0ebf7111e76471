"""registry.catalog: its answers are the scan functions' answers over the same records."""

from __future__ import annotations

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from registry import query
from registry.catalog import Catalog
from registry.protocol import WorkerCapability, WorkerInfo
from tests.factories import FLEET, make_info

IDS = [f"w{i}" for i in range(12)]
TYPES = ["audio", "video", "text"]
CAPABILITIES = [None, *WorkerCapability]
ASKED_TYPES = [None, *TYPES, "other"]


@st.composite
def records(draw: st.DrawFn) -> WorkerInfo:
    max_tasks = draw(st.integers(1, 3))
    return make_info(
        draw(st.sampled_from(IDS)),
        capability=draw(st.sampled_from(["cpu", "gpu", "hybrid"])),
        status=draw(st.sampled_from(["online", "busy", "error", "maintenance", "offline"])),
        active=draw(st.integers(0, max_tasks)),
        max_tasks=max_tasks,
        content_types=draw(st.lists(st.sampled_from(TYPES), max_size=2, unique=True)),
        offline_reason=draw(st.sampled_from([None, None, "expired", "unregistered"])),
    )


changes = st.lists(st.one_of(records(), st.sampled_from(IDS)), max_size=60)


def apply(catalog: Catalog, held: dict[str, WorkerInfo], change: WorkerInfo | str) -> None:
    if isinstance(change, str):
        catalog.remove(change)
        held.pop(change, None)
    else:
        catalog.put(change)
        held[change.worker_id] = change


def assert_same_answers(catalog: Catalog, held: dict[str, WorkerInfo]) -> None:
    assert catalog.stats() == query.stats(held.values())
    for capability in CAPABILITIES:
        for content_type in ASKED_TYPES:
            assert catalog.pick(capability, content_type) is query.pick(
                held.values(), capability, content_type
            ), (capability, content_type)
    everyone = query.select(held.values(), query.Filter(include_offline=True))
    assert list(catalog.after(None)) == everyone
    assert list(catalog.after("w5")) == [r for r in everyone if r.worker_id > "w5"]


@settings(max_examples=300, deadline=None)
@given(changes)
def test_every_answer_matches_the_scan_after_any_changes(steps: list[WorkerInfo | str]) -> None:
    catalog, held = Catalog(), {}
    for change in steps:
        apply(catalog, held, change)
        assert_same_answers(catalog, held)
    assert len(catalog) == len(held) and dict(catalog.records) == held


@settings(max_examples=100, deadline=None)
@given(changes, changes)
def test_reset_starts_over_from_the_records_given(
    before: list[WorkerInfo | str], after: list[WorkerInfo | str]
) -> None:
    catalog, held = Catalog(), {}
    for change in before:
        apply(catalog, held, change)
    held = {}
    for change in after:
        if isinstance(change, WorkerInfo):
            held[change.worker_id] = change
    catalog.reset(held.values())
    assert_same_answers(catalog, held)


def test_pick_breaks_ties_by_worker_id_as_the_scan_does() -> None:
    twins = [make_info(wid, capability="gpu") for wid in ("b", "a", "c")]
    catalog = Catalog(twins)
    picked = catalog.pick(WorkerCapability.GPU)
    assert picked is not None and picked.worker_id == "a"


def test_the_fleet_of_the_service_tests_counts_as_the_scan() -> None:
    assert Catalog(FLEET).stats() == query.stats(FLEET)


def test_is_last_names_the_highest_id() -> None:
    catalog = Catalog(FLEET)
    assert catalog.is_last("x2") and catalog.is_last("zz") and not catalog.is_last("x1")
    assert Catalog().is_last("anything")


def test_a_beat_that_moves_only_metrics_replaces_the_record_in_place() -> None:
    """The fast path of put(): the answers still come from the newest record."""
    records = [make_info(f"w{i}") for i in range(5)]
    catalog, held = Catalog(records), {r.worker_id: r for r in records}
    for r in records:
        beat = msgspec.structs.replace(
            r, metrics=msgspec.structs.replace(r.metrics, cpu_usage_percent=42.0),
            event_seq=r.event_seq + 1,
        )  # fmt: skip
        apply(catalog, held, beat)
        assert_same_answers(catalog, held)
    assert all(r.metrics.cpu_usage_percent == 42.0 for r in catalog.records.values())
    picked = catalog.pick()
    assert picked is not None and picked is held[picked.worker_id]  # the newest object
