"""query.py (filter, rank, stats, pick) and timeparse.py: pure, no server."""

from __future__ import annotations

from datetime import timedelta

import pytest

from registry import query
from registry.protocol import (
    WorkerCapability,
    WorkerInfo,
    WorkerStatus,
)
from registry.query import Filter
from registry.timeparse import (
    TimeParseError,
    format_age,
    parse_duration,
    parse_range,
    parse_when,
)
from tests.factories import FLEET, T0, make_info


def ids(records: list[WorkerInfo]) -> list[str]:
    return [r.worker_id for r in records]




# ---------------------------------------------------------------- filter


def test_listing_shows_live_workers_only_by_default() -> None:
    assert ids(query.select(FLEET, Filter())) == ["c1", "g1", "g2", "h1"]


def test_listing_with_include_offline_shows_offline_records() -> None:
    assert ids(query.select(FLEET, Filter(include_offline=True))) == [
        "c1", "g1", "g2", "h1", "x1", "x2",
    ]  # fmt: skip


def test_listing_filters_capability_exactly() -> None:
    assert ids(query.select(FLEET, Filter(capability=WorkerCapability.GPU))) == ["g1", "g2"]


def test_picking_filter_offers_hybrid_for_any_capability() -> None:
    f = Filter(capability=WorkerCapability.CPU, for_picking=True)
    assert ids(query.select(FLEET, f)) == ["c1", "h1"]


def test_content_type_matches_listed_type_or_empty_list() -> None:
    assert ids(query.select(FLEET, Filter(content_type="video"))) == ["g1", "g2", "h1"]


def test_status_filter_is_exact() -> None:
    assert ids(query.select(FLEET, Filter(status=WorkerStatus.BUSY))) == ["g2"]


def test_status_offline_lists_offline_records_without_all() -> None:
    assert ids(query.select(FLEET, Filter(status=WorkerStatus.OFFLINE))) == ["x1", "x2"]


def test_available_filter() -> None:
    assert ids(query.select(FLEET, Filter(available=True))) == ["c1", "g1"]
    assert ids(query.select(FLEET, Filter(available=False))) == ["g2", "h1"]


def test_tag_filter_needs_every_pair() -> None:
    assert ids(query.select(FLEET, Filter(tags={"zone": "eu"}))) == ["g1"]
    assert query.select(FLEET, Filter(tags={"zone": "eu", "tier": "spot"})) == []


def test_parse_tags_refuses_pairs_without_equals() -> None:
    assert query.parse_tags(["a=1", "b="]) == {"a": "1", "b": ""}
    with pytest.raises(query.QueryError, match="key=value"):
        query.parse_tags(["zone"])


# ---------------------------------------------------------------- rank and pick


def test_rank_least_loaded_then_more_free_slots_then_id() -> None:
    records = [
        make_info("b", active=1, max_tasks=2),
        make_info("a", active=2, max_tasks=4),
        make_info("c", active=0, max_tasks=1),
        make_info("d", active=0, max_tasks=3),
    ]
    assert ids(query.rank(records)) == ["d", "c", "a", "b"]


def test_pick_prefers_least_loaded_available_worker() -> None:
    records = [make_info("a", active=1, max_tasks=2), make_info("b", active=1, max_tasks=4)]
    picked = query.pick(records, WorkerCapability.GPU)
    assert picked is not None and picked.worker_id == "b"


def test_pick_offers_hybrid_when_no_exact_capability_is_free() -> None:
    records = [
        make_info("c", capability="cpu", active=1, max_tasks=1),
        make_info("h", capability="hybrid"),
    ]
    picked = query.pick(records, WorkerCapability.CPU, "text")
    assert picked is not None and picked.worker_id == "h"


def test_pick_respects_content_types() -> None:
    records = [make_info("a", content_types=["audio"]), make_info("b", content_types=["video"])]
    picked = query.pick(records, WorkerCapability.GPU, "video")
    assert picked is not None and picked.worker_id == "b"


def test_pick_returns_none_when_nobody_can_take_the_job() -> None:
    assert query.pick(FLEET, WorkerCapability.GPU, "document") is None
    assert query.pick([], WorkerCapability.CPU) is None


def test_pick_never_offers_a_hybrid_job_to_a_plain_gpu_worker() -> None:
    assert query.pick([make_info("g")], WorkerCapability.HYBRID) is None


# ---------------------------------------------------------------- stats


def test_stats_count_live_workers_and_offline_records_apart() -> None:
    s = query.stats(FLEET)
    assert s == query.Stats(
        total=4, online=3, offline=2, busy=1, gpu_workers=2, cpu_workers=1, hybrid_workers=1,
        available=2,
    )  # fmt: skip


def test_stats_of_an_empty_fleet_are_zero() -> None:
    assert query.stats([]) == query.Stats()


# ---------------------------------------------------------------- time parsing


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90.0), ("90s", 90.0), ("15m", 900.0), ("1h30m", 5400.0), ("2d", 172800.0),
     ("500ms", 0.5), ("1.5h", 5400.0)],
)  # fmt: skip
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "-5s", "1x", "inf", "nan", "h1"])
def test_parse_duration_refuses_nonsense(text: str) -> None:
    with pytest.raises(TimeParseError):
        parse_duration(text)


def test_parse_when_takes_an_age_before_now() -> None:
    assert parse_when("1h", T0) == T0 - timedelta(hours=1)


def test_parse_when_takes_rfc3339_in_any_offset() -> None:
    assert parse_when("2024-05-01T14:00:00+02:00", T0) == T0
    assert parse_when("2024-05-01T12:00:00Z", T0) == T0


def test_parse_when_refuses_a_time_without_zone() -> None:
    with pytest.raises(TimeParseError, match="no timezone"):
        parse_when("2024-05-01T12:00:00", T0)


def test_parse_range_refuses_since_after_until() -> None:
    with pytest.raises(TimeParseError, match="bad time range"):
        parse_range("1h", "2h", T0)


def test_parse_range_keeps_missing_ends_open() -> None:
    assert parse_range(None, "1h", T0) == (None, T0 - timedelta(hours=1))


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.2, "0s"), (42, "42s"), (150, "2m"), (7300, "2h"), (200000, "2d"), (-5, "-")],
)
def test_format_age_reads_like_kubectl(seconds: float, text: str) -> None:
    assert format_age(seconds) == text
