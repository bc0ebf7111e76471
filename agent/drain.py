"""Whether an operator drained this worker (`registry drain ID`), shared by the host and
the agent's thread.

The registry tells the agent with `worker.control.<id>` `{action: "drain"}` (repeated
on its heartbeats until it leaves) and lifts it with `{action: "uncordon"}`. The
agent keeps beating; what "stop taking work" means is the embedding application's
call: listeners added with `Agent.on_drain` are told, on the agent's own thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import structlog

log = structlog.get_logger("agent")

DrainListener = Callable[[bool, str], None]
"""`fn(draining, reason)`: called on the agent's thread; must return quickly."""


class DrainState:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._listeners: list[DrainListener] = []
        self.draining = False
        self.reason = ""

    def listen(self, fn: DrainListener) -> None:
        with self._lock:
            self._listeners.append(fn)

    def set(self, draining: bool, reason: str) -> bool:
        """Record the registry's word; tell the listeners when it changed. True if it did."""
        with self._lock:
            if draining == self.draining:
                return False
            self.draining, self.reason = draining, reason if draining else ""
            listeners = list(self._listeners)
        for fn in listeners:
            try:
                fn(draining, reason)
            except Exception:  # the host's callback must not stop the agent
                log.exception("drain_listener_failed")
        return True
