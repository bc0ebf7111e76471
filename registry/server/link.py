"""The registry's connection epoch, and whether the projector has caught up within it.

One owner for two facts that the projector, its pulls and publishes, and the
sweeper all act on:

- the epoch counts the times the connection came back. Pull requests and
  publishes of an earlier epoch died with the old connection (their answers
  never come), and while it was away no heartbeat could be stored;
- caught up: the projector has folded everything the stream held, within the
  current epoch. The sweeper judges only then. A new epoch un-catches it at
  once, by itself: nobody has to remember to clear a flag, and a projector that
  catches up on the strength of an older epoch's batch is not believed.

a third: trouble. A stream that did not answer (a leader election), a verdict
that could not be stored, or a reconnect means workers could not beat either
for a while; the sweeper's next grace is then long enough for them to
reconnect and retry (`outage_grace_s`), not one timeout. `take_trouble()`
says whether there was any since it was last asked.

and a fourth, for the active/standby lease (registry.server.lease): `fence()`,
called before every write this process makes to the streams and the bucket,
raises LeaseLost once the lease is not held (a no-op when nobody set one).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from nats.aio.client import Client

RECHECK_S = 0.1  # a reconnect sets no event here: waiters look again this often


class Link:
    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self._caught_up_in: int | None = None
        self._changed = asyncio.Event()
        self._trouble = False
        self._calm_epoch = self.epoch
        self.fence: Callable[[], None] = lambda: None  # raises when this process may not write

    @property
    def epoch(self) -> int:
        """How many times the connection came back (nats-py counts reconnects)."""
        return int(self.nc.stats["reconnects"])

    def reconnected_since(self, epoch: int) -> bool:
        return self.epoch != epoch

    def lost_since(self, epoch: int) -> bool:
        """Down now, or down and back since `epoch`: answers of `epoch` may never come."""
        return self.epoch != epoch or not self.nc.is_connected

    def caught_up(self, epoch: int) -> None:
        """The projector folded all there was, having read it within `epoch`."""
        if epoch == self.epoch:
            self._caught_up_in = epoch
            self._changed.set()

    def fell_behind(self) -> None:
        """The projector is reloading: nobody is judged until it has caught up again."""
        self._caught_up_in = None

    def trouble(self) -> None:
        """Something failed to reach the streams: nobody could beat meanwhile either."""
        self._trouble = True

    def take_trouble(self) -> bool:
        """Trouble or a reconnect since the last call (which clears it)."""
        troubled = self._trouble or self.epoch != self._calm_epoch
        self._trouble, self._calm_epoch = False, self.epoch
        return troubled

    @property
    def is_caught_up(self) -> bool:
        return self._caught_up_in == self.epoch and self.nc.is_connected

    async def wait_caught_up(self) -> int:
        """Until the projector has caught up in the current epoch, connected; that epoch."""
        while not self.is_caught_up:
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RECHECK_S):
                    await self._changed.wait()
        return self.epoch
