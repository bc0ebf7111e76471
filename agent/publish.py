"""Publish one event to JetStream and await its PubAck, retrying under one msg id.

Every event gets a random 128-bit `Nats-Msg-Id` once; every retry of it reuses
that id, so a publish that timed out after the stream stored it is stored once
(the stream's duplicate window drops the repeat).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
from typing import Any, Final

import nats.errors
import nats.js.errors
import structlog
from nats.js import JetStreamContext

from registry import protocol

log = structlog.get_logger("agent")

PERMANENT_ERRORS: Final = (
    nats.js.errors.BadRequestError,
    nats.errors.MaxPayloadError,
    nats.errors.BadSubjectError,
    nats.errors.BadHeaderError,
)
TRANSIENT_ERRORS: Final = (nats.errors.Error, asyncio.TimeoutError)
MIN_ATTEMPT_S: Final = 0.05
MAX_PAUSE_S: Final = 2.0


def error_text(e: BaseException) -> str:
    return str(e) or type(e).__name__


def _pause_s(attempt: int) -> float:
    """Exponential backoff with jitter: 0.1-0.2 s, then doubling up to 2 s."""
    return min(0.1 * 2.0**attempt, MAX_PAUSE_S) * random.uniform(0.5, 1.0)


async def publish_event(
    js: JetStreamContext,
    kind: str,
    event: protocol.Event,
    *,
    attempt_timeout_s: float,
    budget_s: float | None,
    logger: Any = log,
) -> bool:
    """JetStream-publish one event and await its PubAck; retry with the SAME msg id.

    Retries transient failures until `budget_s` is spent (None: until it is
    stored). Returns whether the stream stored it; a permanent refusal is
    logged as an error and not retried.
    """
    subject = protocol.event_subject(kind, event.worker_id)
    data = protocol.encode(event)
    msg_id = protocol.new_msg_id()  # one per event: a retry is stored once
    loop = asyncio.get_running_loop()
    deadline = math.inf if budget_s is None else loop.time() + budget_s
    for attempt in itertools.count(1):
        started = loop.time()
        timeout = max(min(attempt_timeout_s, deadline - started), MIN_ATTEMPT_S)
        try:
            ack = await js.publish(subject, data, timeout, headers={"Nats-Msg-Id": msg_id})
        except PERMANENT_ERRORS as e:
            logger.error("event_rejected", kind=kind, error=error_text(e))
            return False
        except TRANSIENT_ERRORS as e:
            if loop.time() >= deadline:
                logger.warning("publish_failed", kind=kind, attempts=attempt, error=error_text(e))
                return False
            if budget_s is None and attempt & (attempt - 1) == 0:  # attempts 1, 2, 4, 8, ...
                logger.warning("publish_retrying", kind=kind, attempts=attempt, error=error_text(e))
            pause = _pause_s(attempt) - (loop.time() - started)
            await asyncio.sleep(max(0.0, min(pause, deadline - loop.time())))
        else:
            logger.debug("event_published", kind=kind, seq=ack.seq, duplicate=ack.duplicate)
            return True
    raise AssertionError("unreachable")
