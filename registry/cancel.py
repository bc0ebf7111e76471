"""Cancellation that a library swallowed, surfaced again."""

from __future__ import annotations

import asyncio


def raise_if_cancelled() -> None:
    """Re-raise a cancellation that a library call swallowed.

    On Python 3.11 `asyncio.wait_for` returns the result when it arrives in the
    same loop iteration as a cancel, and nats-py awaits every reply that way; the
    task's CancelledError then never comes, and a loop that carries on never
    stops (the TaskGroup waits for it forever). The cancel request still counts
    in `Task.cancelling()`, so it can be raised again here.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
