"""Retention bookkeeping: offline records due for purging, markers while they last (no server)."""

from __future__ import annotations

from registry.retention import (
    COMPACT_ABOVE,
    MARKER_SLACK_S,
    Markers,
    OfflineSince,
    loaded_markers,
    shrunk,
)


def test_offline_records_come_due_oldest_first_and_at_most_so_many() -> None:
    index = OfflineSince()
    for i, wid in enumerate(("a", "b", "c", "d")):
        index.set(wid, 100.0 + i)
    assert index.due(cutoff=102.5, most=2) == ["a", "b"]
    assert index.due(cutoff=102.5, most=10) == ["c"]
    assert len(index) == 1  # d: not yet


def test_a_worker_that_came_back_or_left_again_is_due_by_its_last_offline_time() -> None:
    index = OfflineSince()
    index.set("back", 100.0)
    index.set("again", 100.0)
    index.discard("back")  # registered again
    index.set("again", 200.0)  # offline again later
    assert index.due(cutoff=150.0, most=10) == []
    assert index.due(cutoff=250.0, most=10) == ["again"]
    assert len(index) == 0


def test_stale_items_do_not_pile_up() -> None:
    index = OfflineSince()
    for t in range(10_000):  # one worker flapping
        index.set("flap", float(t))
    assert len(index._heap) <= 2 * len(index) + 1024 + 1


def test_a_marker_with_a_ttl_is_forgotten_once_the_server_removed_it() -> None:
    markers = Markers()
    markers.add("w", 7, expires_at=100.0)
    assert markers.expire(100.0) == 0  # the server removes it a little after its TTL
    assert markers.revisions == {"w": 7}
    assert markers.expire(100.0 + MARKER_SLACK_S) == 1
    assert markers.pop("w") == 0  # nothing there: a write expects revision 0


def test_a_key_written_again_takes_its_markers_revision_once() -> None:
    markers = Markers()
    markers.add("w", 7, expires_at=100.0)
    assert markers.pop("w") == 7
    markers.add("w", 9, expires_at=200.0)  # purged again later
    assert markers.expire(150.0) == 0  # the first marker's expiry is stale
    assert markers.revisions == {"w": 9}


def test_markers_without_a_ttl_are_listed_once_to_be_purged_again() -> None:
    markers = loaded_markers({"old": 3, "new": 5, "gone": 6}, {"new": 300.0})
    markers.pop("gone")  # its worker came back
    assert markers.legacy(10) == ["old"]
    markers.add("old", 11, expires_at=400.0)  # purged again, with a TTL
    assert markers.legacy(10) == []
    assert len(markers) == 2


def test_tables_are_copied_smaller_once_down_to_a_quarter_of_their_peak() -> None:
    index, markers = OfflineSince(), Markers()
    for i in range(COMPACT_ABOVE):
        index.set(f"w{i}", float(i))
        markers.add(f"w{i}", i + 1, expires_at=float(i))
    table = index._since
    assert len(index.due(cutoff=COMPACT_ABOVE * 0.5, most=COMPACT_ABOVE)) == COMPACT_ABOVE // 2
    assert index._since is table  # half: not yet
    index.due(cutoff=COMPACT_ABOVE * 0.75 + 1, most=COMPACT_ABOVE)
    assert index._since is not table and len(index) == COMPACT_ABOVE // 4 - 1
    left = [f"w{i}" for i in range(3 * COMPACT_ABOVE // 4 + 1, COMPACT_ABOVE)]
    assert index.due(cutoff=1e9, most=COMPACT_ABOVE) == left  # the heap was rebuilt right
    revisions = markers.revisions
    markers.expire(COMPACT_ABOVE * 0.75 + MARKER_SLACK_S)
    assert markers.revisions is not revisions and len(markers) < COMPACT_ABOVE // 4
    assert shrunk(0, COMPACT_ABOVE) and not shrunk(0, COMPACT_ABOVE - 1)
