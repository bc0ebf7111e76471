"""Arrivals: when is a read of the last value of every subject complete (no server)."""

from __future__ import annotations

import asyncio

import pytest

from registry.lastvalues import Arrivals


def test_done_once_every_listed_key_came_including_those_before_the_listing() -> None:
    a = Arrivals()
    a.came("w1")  # delivered before the listing was known
    a.came("w9")  # not listed (created after the listing): does not matter
    a.expect({"w1", "w2", "w3"})
    assert not a.is_done
    a.came("w2")
    a.came("w2")  # a newer value of the same key
    assert not a.is_done
    a.came("w3")
    assert a.is_done and a.taken == 5


def test_an_empty_listing_is_done_at_once() -> None:
    a = Arrivals()
    a.expect(set())
    assert a.is_done


def test_a_listing_that_already_came_is_done_at_once() -> None:
    a = Arrivals()
    a.came("w1")
    a.expect({"w1"})
    assert a.is_done


async def test_a_failure_ends_the_wait_with_that_failure() -> None:
    a = Arrivals()
    a.expect({"w1"})
    a.fail(RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        await a.done(1.0, "KV_workers")


async def test_it_gives_up_when_no_listed_key_comes_even_if_others_do() -> None:
    a = Arrivals()
    a.expect({"w1", "w2"})

    async def others() -> None:
        while True:
            a.came("unlisted")
            await asyncio.sleep(0.01)

    noise = asyncio.create_task(others())
    try:
        with pytest.raises(TimeoutError):
            await a.done(0.2, "KV_workers")
    finally:
        noise.cancel()


def test_a_key_no_longer_listed_is_struck_off() -> None:
    a = Arrivals()
    a.expect({"w1", "w2"})
    a.prune({"w1", "w2", "w3"})  # a key listed now that was not then: not awaited
    assert a.missing == {"w1", "w2"}
    a.came("w1")
    a.prune({"w1"})  # w2's message expired before it came
    assert a.is_done


async def test_a_read_waiting_for_a_key_whose_message_expired_ends() -> None:
    a = Arrivals()
    a.expect({"w1", "w2"})
    a.came("w1")
    listed = {"w1"}

    async def relist() -> set[str]:
        return listed

    await asyncio.wait_for(a.done(30.0, "KV_workers", relist), 5.0)
