"""`agent simulate`: a fleet of simulated workers in one process, on one connection.

Every event a simulated worker sends is what the real agent sends, each with
its own random `Nats-Msg-Id`. It is cheap enough for 100,000 workers on a
small machine beside the registry:

- one schedule (`Schedule`) spreads all heartbeats evenly over the interval;
  there is no task, timer or coroutine per worker;
- heartbeat bodies are a per-incarnation prefix plus one `%`-format of the
  metrics, byte for byte what the contract encodes (`wire`);
- publishes are pipelined (`AckedPublisher`), at most `window` awaiting a PubAck.

The parts: `settings` (SimSettings), `schedule`, `publisher`, `wire` (the fast
heartbeat body), `worker` (machine kinds and SimWorker), `fleet` (Fleet,
churn and kills, SimReport), `run` (connect, simulate, run_until_signal) and
`cli` (flags and environment, `main`).
"""

from agent.simulate.cli import (
    LOG_LEVELS,
    OPTIONS,
    UsageError,
    add_arguments,
    main,
    run_command,
    settings_from,
)
from agent.simulate.fleet import Fleet, SimReport
from agent.simulate.publisher import AckedPublisher, Publisher
from agent.simulate.run import connect, run_until_signal, simulate
from agent.simulate.schedule import Schedule
from agent.simulate.settings import SimSettings
from agent.simulate.wire import sent_at_now
from agent.simulate.worker import ALIVE, DEAD, DOWN, NEW, SimWorker, profiles

__all__ = [
    "ALIVE",
    "DEAD",
    "DOWN",
    "LOG_LEVELS",
    "NEW",
    "OPTIONS",
    "AckedPublisher",
    "Fleet",
    "Publisher",
    "Schedule",
    "SimReport",
    "SimSettings",
    "SimWorker",
    "UsageError",
    "add_arguments",
    "connect",
    "main",
    "profiles",
    "run_command",
    "run_until_signal",
    "sent_at_now",
    "settings_from",
    "simulate",
]
