"""Running a fleet against a NATS server, on one connection, until told to stop."""

from __future__ import annotations

import asyncio
import signal

import nats
import nats.errors
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg

from agent.simulate.fleet import Fleet, SimReport
from agent.simulate.publisher import AckedPublisher
from agent.simulate.settings import SimSettings
from registry.connect import Auth, NatsOptions, Reconnect
from registry.connect import connect as connect_to

log = structlog.get_logger("agent.simulate")


async def connect(url: str, timeout_s: float = 10.0, *, auth: Auth | None = None) -> Client:
    """Connect (retrying for up to `timeout_s`), then reconnect by ourselves forever."""

    async def on_error(e: Exception) -> None:
        log.warning("nats_error", url=url, error=str(e) or type(e).__name__)

    options = NatsOptions.of(
        url, "agent-simulate", reconnect=Reconnect(wait_s=0.5), auth=auth or Auth()
    )
    return await asyncio.wait_for(
        connect_to(options, pending_size=32 * 1024 * 1024, error_cb=on_error), timeout_s
    )


async def _connect_unless_stopped(settings: SimSettings, stop: asyncio.Event) -> Client | None:
    """Connect, or give up quietly (None) when stopped while still connecting."""
    connecting = asyncio.ensure_future(connect(settings.nats_url, auth=settings.auth))
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({connecting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if connecting.done():
        return connecting.result()
    connecting.cancel()
    try:
        nc = await connecting
    except asyncio.CancelledError:
        me = asyncio.current_task()
        if me is not None and me.cancelling():
            raise  # we were cancelled ourselves, not just the connection attempt
        return None
    except (OSError, TimeoutError, nats.errors.Error):
        return None
    await nc.close()  # it connected just as we were told to stop
    return None


async def simulate(
    settings: SimSettings, stop: asyncio.Event, hurry: asyncio.Event | None = None
) -> SimReport:
    """Run the fleet until `stop` (or --duration); then unregister, bounded. `hurry` skips that."""
    hurry = hurry or asyncio.Event()
    loop = asyncio.get_running_loop()
    nc = await _connect_unless_stopped(settings, stop)
    if nc is None:
        return SimReport(workers=settings.count, heartbeat_interval_s=settings.heartbeat_interval_s)
    t0 = loop.time()
    publisher = AckedPublisher(nc, settings.window)
    fleet = Fleet(settings, publisher)
    try:
        await publisher.start()

        async def on_control(msg: Msg) -> None:
            fleet.on_control(msg.subject.rpartition(".")[2], msg.data)

        await nc.subscribe("worker.control.*", cb=on_control)
        await _run(fleet, settings, stop, loop)
        if settings.unregister and not hurry.is_set():
            await _leave(fleet, settings, hurry)
        await fleet.pub.settle(0.5 if hurry.is_set() else settings.stop_timeout_s / 2)
    finally:
        report = fleet.finish(loop.time() - t0)
        try:
            await asyncio.wait_for(nc.drain(), 2.0)
        except (TimeoutError, nats.errors.Error):
            await nc.close()
    return report


async def _run(
    fleet: Fleet, s: SimSettings, stop: asyncio.Event, loop: asyncio.AbstractEventLoop
) -> None:
    """Register (at once, or evenly over --ramp while the registered beat), then beat."""
    start = loop.time()
    end = start + s.duration_s if s.duration_s else float("inf")
    n, registered = len(fleet.workers), 0
    if s.ramp_s:
        fleet.start(start, in_registration_order=True)  # first beat one interval after its register
    next_log, last_events = start + 10.0, 0
    while not stop.is_set() and (now := loop.time()) < end:
        if registered < n:
            due = n if not s.ramp_s else min(n, int((now - start) / s.ramp_s * n) + 1)
            for w in fleet.workers[registered:due]:
                if stop.is_set():
                    return
                await fleet.register(w)
            registered = due
            if registered == n:
                log.info("simulate_registered", workers=n, seconds=round(loop.time() - start, 2))
                if not s.ramp_s:
                    fleet.start(loop.time())
                continue
        await fleet.step(now)
        if now >= next_log:
            events = fleet.report.events
            log.info("simulate_progress", events=events, rate=round((events - last_events) / 10.0),
                     in_flight=fleet.pub.in_flight, lag_ms=round(fleet.schedule.lag(now) * 1000),
                     errors=fleet.pub.errors)  # fmt: skip
            next_log, last_events = now + 10.0, events
        delay = min(s.tick_s - (loop.time() - now), end - loop.time())
        await asyncio.sleep(max(delay, 0.0))


async def _leave(fleet: Fleet, s: SimSettings, hurry: asyncio.Event) -> None:
    """Unregister every live worker, within half the stop timeout."""
    try:
        await asyncio.wait_for(fleet.leave(hurry), s.stop_timeout_s / 2)
    except TimeoutError:
        log.warning("simulate_unregister_incomplete", timeout_s=s.stop_timeout_s / 2)


async def run_until_signal(settings: SimSettings) -> SimReport:
    """`simulate` until SIGINT/SIGTERM; a second signal skips the unregistering."""
    stop, hurry = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        (hurry if stop.is_set() else stop).set()

    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, on_signal)
    try:
        return await simulate(settings, stop, hurry)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
