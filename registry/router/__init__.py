"""The router library: a live index of worker availability, and pick() from memory.

    from registry.router import Router

`client` follows WORKER_AVAILABILITY into the index; `index` is the pure
picture a router decides on (no NATS, clock passed in).
"""

from registry.protocol import Availability
from registry.router.client import Router
from registry.router.index import AvailabilityIndex

__all__ = ["Availability", "AvailabilityIndex", "Router"]
