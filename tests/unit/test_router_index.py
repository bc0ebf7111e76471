"""The router's in-memory index (AvailabilityIndex): pure, no server, clock passed in."""

from __future__ import annotations

import random
from collections import Counter

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from registry.protocol import Availability, WorkerCapability, WorkerStatus
from registry.router import AvailabilityIndex
from tests.factories import T0, make_avail

CAPS = (WorkerCapability.GPU, WorkerCapability.CPU, WorkerCapability.HYBRID)


def index_of(*avails: Availability, hold_s: float = 10.0, seed: int = 1) -> AvailabilityIndex:
    index = AvailabilityIndex(random.Random(seed), hold_s)
    for a in avails:
        index.update(a)
    return index


def picked(index: AvailabilityIndex, *args: str | None, now: float = 0.0) -> str | None:
    a = index.pick(*args, now=now)
    return a.worker_id if a else None


def test_pick_takes_the_least_loaded_worker() -> None:
    index = index_of(make_avail("a", active=1, max_tasks=2), make_avail("b", active=1, max_tasks=4))
    assert picked(index, "gpu") == "b"


def test_pick_prefers_more_free_slots_at_equal_load() -> None:
    index = index_of(make_avail("a", max_tasks=1), make_avail("b", max_tasks=3))
    assert picked(index, "gpu") == "b"


def test_pick_offers_hybrid_workers_for_cpu_jobs() -> None:
    index = index_of(
        make_avail("c", capability="cpu", active=1, max_tasks=1),
        make_avail("h", capability="hybrid"),
    )
    assert picked(index, "cpu") == "h"


def test_pick_never_offers_gpu_workers_for_hybrid_jobs() -> None:
    assert picked(index_of(make_avail("g", capability="gpu")), "hybrid") is None


def test_pick_matches_listed_content_type_or_empty_list() -> None:
    index = index_of(
        make_avail("audio", content_types=["audio"]), make_avail("any", content_types=[], active=1)
    )
    assert picked(index, "gpu", "audio") == "audio"
    assert picked(index, "gpu", "video") == "any"
    assert picked(index, "cpu", "video") is None


def test_pick_without_capability_considers_everyone() -> None:
    index = index_of(make_avail("c", capability="cpu", active=1), make_avail("g", capability="gpu"))
    assert picked(index, None, None) == "g"


def test_unavailable_workers_are_never_picked() -> None:
    index = index_of(
        make_avail("busy", status="busy"), make_avail("full", active=2, max_tasks=2),
        make_avail("gone", offline_reason="expired"),
    )  # fmt: skip
    assert picked(index, "gpu") is None
    assert len(index) == 3


def test_a_pick_holds_a_slot_until_the_next_update() -> None:
    index = index_of(make_avail("a", max_tasks=2))
    assert [picked(index, "gpu") for _ in range(3)] == ["a", "a", None]
    index.update(make_avail("a", active=1, max_tasks=2, event_seq=2))
    assert index.held("a") == 0
    assert picked(index, "gpu") == "a"


def test_held_slots_count_in_the_load_order() -> None:
    index = index_of(make_avail("a", max_tasks=4), make_avail("b", max_tasks=4))
    first = picked(index, "gpu")
    assert picked(index, "gpu") != first


def test_release_returns_a_held_slot() -> None:
    index = index_of(make_avail("a", max_tasks=1))
    assert picked(index, "gpu") == "a"
    assert index.release("a") is True
    assert picked(index, "gpu") == "a"
    assert index.release("nobody") is False


def test_holds_expire_after_hold_s() -> None:
    index = index_of(make_avail("a", max_tasks=1), hold_s=5.0)
    assert picked(index, "gpu", now=100.0) == "a"
    assert picked(index, "gpu", now=104.9) is None
    assert picked(index, "gpu", now=105.0) == "a"


def test_an_older_update_does_not_replace_a_newer_one() -> None:
    index = index_of(make_avail("a", active=1, event_seq=9))
    assert index.update(make_avail("a", active=0, event_seq=3)) is False
    assert index.workers["a"].avail.active_tasks == 1


def test_a_worker_that_changes_capability_moves_bucket() -> None:
    index = index_of(make_avail("a", capability="gpu"))
    index.update(make_avail("a", capability="cpu", event_seq=2))
    assert picked(index, "gpu") is None
    assert picked(index, "cpu") == "a"


def test_ties_are_spread_at_random() -> None:
    index = index_of(*(make_avail(f"w{i}", max_tasks=1000) for i in range(10)))
    counts = Counter(picked(index, "gpu") for _ in range(200))
    assert len(counts) == 10
    assert max(counts.values()) - min(counts.values()) <= 1  # equal load -> round by round


def test_available_lists_candidates_least_loaded_first() -> None:
    index = index_of(
        make_avail("a", active=1, max_tasks=2), make_avail("b"), make_avail("c", status="busy"),
        make_avail("h", capability="hybrid", active=1, max_tasks=4),
    )  # fmt: skip
    assert [a.worker_id for a in index.available("gpu")] == ["b", "h", "a"]


def test_pick_looks_at_profiles_not_workers_at_100k() -> None:
    """100,000 workers of 12 profiles: a request is answered from at most the
    profiles that serve it (cached), never by visiting workers."""
    types = ["audio", "video", "image", "text"]
    index = AvailabilityIndex(random.Random(1))
    for i in range(100_000):
        index.update(Availability(
            worker_id=f"w{i}", available=True, status=WorkerStatus.ONLINE,
            capability=CAPS[i % 3], supported_content_types=types[: 1 + i % 4],
            active_tasks=i % 5, max_concurrent_tasks=8, changed_at=T0, event_seq=1,
        ))  # fmt: skip
    assert len(index._profiles) == 12
    assert len(index._candidates("gpu", "video")) == 6  # gpu and hybrid, with video listed
    assert picked(index, "gpu", "video") is not None
    # workers of one profile share their content-type list (memory per worker)
    lists = {id(w.avail.supported_content_types) for w in index.workers.values()}
    assert len(lists) == 12


def test_an_unknown_capability_is_a_clear_error() -> None:
    index = index_of(make_avail("a"))
    with pytest.raises(ValueError, match="unknown capability 'tpu'"):
        index.pick("tpu")


def test_a_new_profile_joins_requests_already_answered() -> None:
    index = index_of(make_avail("a", capability="gpu", content_types=["audio"], active=1, max_tasks=2))
    assert picked(index, "gpu", "video") is None  # cached: no profile serves it
    index.update(make_avail("b", capability="hybrid", content_types=["video"]))
    assert picked(index, "gpu", "video") == "b"


def _fits(a: Availability, capability: str | None, content_type: str | None) -> bool:
    served = {"cpu": ("cpu", "hybrid"), "gpu": ("gpu", "hybrid"), "hybrid": ("hybrid",)}
    caps = served[capability] if capability else ("cpu", "gpu", "hybrid")
    types = a.supported_content_types
    return str(a.capability) in caps and (content_type is None or not types or content_type in types)


def _loads(
    workers: dict[str, tuple[Availability, int]], capability: str | None, content_type: str | None
) -> dict[str, tuple[float, int]]:
    """DESIGN's rule by brute force: the load of every worker (availability,
    slots this router holds) that could take the job now."""
    out = {}
    for wid, (a, held) in workers.items():
        most = a.max_concurrent_tasks
        free = most - a.active_tasks - held
        if a.available and free > 0 and _fits(a, capability, content_type):
            out[wid] = ((most - free) / most, -free)
    return out


_updates = st.lists(
    st.tuples(
        st.integers(0, 7),  # worker
        st.sampled_from(CAPS),
        st.lists(st.sampled_from(["audio", "video", "text"]), max_size=3),
        st.integers(0, 4),  # active
        st.integers(1, 4),  # max
        st.booleans(),  # available (status online) or not
    ),
    max_size=40,
)
_requests = st.lists(
    st.tuples(st.sampled_from([None, "cpu", "gpu", "hybrid"]),
              st.sampled_from([None, "audio", "video", "text"])),
    max_size=20,
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(_updates, _requests)
def test_pick_is_the_least_loaded_fitting_worker(
    updates: list[tuple[int, WorkerCapability, list[str], int, int, bool]],
    requests: list[tuple[str | None, str | None]],
) -> None:
    """Against a brute-force scan of DESIGN's rule, holds included."""
    index = AvailabilityIndex(random.Random(0))
    for seq, (n, cap, types, active, most, up) in enumerate(updates, 1):
        index.update(make_avail(
            f"w{n}", capability=str(cap), content_types=types, active=min(active, most),
            max_tasks=most, status="online" if up else "maintenance", event_seq=seq,
        ))  # fmt: skip
    holds: Counter[str] = Counter()
    for capability, content_type in requests:
        workers = {wid: (w.avail, holds[wid]) for wid, w in index.workers.items()}
        loads = _loads(workers, capability, content_type)
        got = index.pick(capability, content_type)
        if not loads:
            assert got is None
            continue
        assert got is not None
        assert loads[got.worker_id] == min(loads.values())
        holds[got.worker_id] += 1


_step = st.one_of(
    st.tuples(st.just("update"), st.integers(0, 5), st.sampled_from(CAPS),
              st.lists(st.sampled_from(["audio", "video", "text"]), max_size=2),
              st.integers(0, 3), st.integers(1, 3), st.booleans()),
    st.tuples(st.just("pick"), st.sampled_from([None, "cpu", "gpu", "hybrid"]),
              st.sampled_from([None, "audio", "video"])),
    st.tuples(st.just("release"), st.integers(0, 5)),
    st.tuples(st.just("wait"), st.sampled_from([0.5, 2.0, 5.0])),
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.lists(_step, max_size=60))
def test_updates_picks_releases_and_expiry_follow_a_simple_model(steps: list[tuple]) -> None:  # type: ignore[type-arg]
    """Any interleaving of updates (profiles change), picks, releases and time
    passing, against a model that keeps each worker's holds in a list: every
    pick is a least loaded fitting worker, holds end at an update, a release
    or after hold_s."""
    hold_s = 3.0
    index = AvailabilityIndex(random.Random(0), hold_s)
    model: dict[str, tuple[Availability, list[float]]] = {}
    now, seq = 0.0, 0
    for step in steps:
        match step:
            case ("update", n, cap, types, active, most, up):
                seq += 1
                a = make_avail(f"w{n}", capability=str(cap), content_types=types, max_tasks=most,
                               active=min(active, most), status="online" if up else "maintenance",
                               event_seq=seq)  # fmt: skip
                assert index.update(a)
                model[a.worker_id] = (a, [])
            case ("pick", capability, content_type):
                for _, holds in model.values():
                    holds[:] = [t for t in holds if t > now]
                workers = {w: (a, len(h)) for w, (a, h) in model.items()}
                loads = _loads(workers, capability, content_type)
                got = index.pick(capability, content_type, now=now)
                if not loads:
                    assert got is None
                else:
                    assert got is not None and loads[got.worker_id] == min(loads.values())
                    model[got.worker_id][1].append(now + hold_s)
            case ("release", n):
                holds = model[f"w{n}"][1] if f"w{n}" in model else []
                assert index.release(f"w{n}") == bool(holds)
                if holds:
                    holds.pop()
            case ("wait", dt):
                now += dt
    for wid, (a, holds) in model.items():
        assert index.get(wid) == a
        assert index.held(wid) == len(holds)
    # every profile in the index has a worker in it
    assert all(p.workers > 0 for p in index._profiles.values())
    assert sum(p.workers for p in index._profiles.values()) == len(model)


def test_a_purged_worker_leaves_the_index_and_its_profile() -> None:
    index = index_of(make_avail("a"), make_avail("b", capability="cpu", content_types=["text"]))
    held = index.pick("cpu", now=0.0)
    assert held is not None and held.worker_id == "b"
    assert index.remove("b", held.event_seq)
    assert index.get("b") is None and len(index) == 1
    assert picked(index, "cpu", "text") is None
    assert ("cpu", ("text",)) not in index._profiles  # the last of its profile: dropped
    index.expire(now=100.0)  # its hold's expiry finds nobody: harmless
    assert not index.remove("b", held.event_seq)  # unknown: a no-op


def test_a_purge_older_than_the_workers_last_update_keeps_it() -> None:
    index = index_of(msgspec.structs.replace(make_avail("a"), event_seq=10))
    assert not index.remove("a", 9)
    assert index.get("a") is not None
