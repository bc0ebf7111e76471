"""The Celery app that tests/integration/test_celery.py runs workers of
(`celery -A tests.integration.celery_app worker ...`).

Configured from the environment the test sets: FLEET_TEST_BROKER (a redis:// URL, also
the result backend), FLEET_TEST_NATS, and per worker FLEET_TEST_CONTENT_TYPES and
FLEET_TEST_CAPABILITY. Both ways of configuring are used: `app.conf.worker_registry`
and `register_fleet`'s keywords (which win).
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery

from agent.celery import register_fleet

BROKER = os.environ.get("FLEET_TEST_BROKER", "redis://127.0.0.1:6379/0")

app = Celery("fleet_test", broker=BROKER, backend=BROKER)
app.conf.update(
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
    task_acks_late=False,
)
app.conf.worker_registry = {
    "nats_url": os.environ.get("FLEET_TEST_NATS", "nats://127.0.0.1:4222"),
    "capability": os.environ.get("FLEET_TEST_CAPABILITY", "cpu"),
    "heartbeat_interval_s": 0.5,
    "tags": {"pool": "test"},
}
register_fleet(app, content_types=os.environ.get("FLEET_TEST_CONTENT_TYPES", "text"))


@app.task(bind=True)
def whoami(self: Any, seconds: float = 0.05) -> str:
    """The nodename of the worker that ran it, after `seconds`."""
    time.sleep(seconds)
    return str(self.request.hostname)


@app.task
def fail() -> None:
    raise ValueError("this task always fails")
