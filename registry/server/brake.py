"""`registry.brake`: the mass-expiry brake's state, and an operator's release.

Every registry process subscribes (no queue group); only the active one, whose
sweeper holds the expiries, answers. So `registry brake status | release` reaches
the process that acts, and a standby never answers for it.

    request  {action?: "status" | "release", by?, reason?}
    answer   {instance, action, released, phase, engaged, held, held_since, hold_s,
              release_per_s, expiries_released, operator_released_until,
              operator_releases}
"""

from __future__ import annotations

from typing import Final, Literal, Protocol

import msgspec
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg

from registry.protocol import Name, Text, encode
from registry.server.sweeper import Sweeper

log = structlog.get_logger("registry.brake")

SUBJECT: Final = "registry.brake"
MAX_REQUEST_BYTES: Final = 64 * 1024


class BrakeRequest(msgspec.Struct, frozen=True, kw_only=True):
    action: Literal["status", "release"] = "status"
    by: Name = "unknown"
    reason: Text = ""


_DECODER: Final = msgspec.json.Decoder(BrakeRequest)


class Active(Protocol):
    sweeper: Sweeper

    @property
    def active(self) -> bool: ...

    def lease(self) -> dict[str, object]: ...


async def answer_brake(nc: Client, registry: Active) -> None:
    async def handle(msg: Msg) -> None:
        if not registry.active or not msg.reply:
            return  # the active registry answers; a standby holds nothing
        try:
            if len(msg.data) > MAX_REQUEST_BYTES:
                raise msgspec.ValidationError(f"request over {MAX_REQUEST_BYTES} bytes")
            req = _DECODER.decode(msg.data or b"{}")
        except msgspec.DecodeError as e:
            await msg.respond(encode({"error": f"bad request: {e}"}))
            return
        released = 0
        if req.action == "release":
            released = registry.sweeper.release()
            log.warning("brake_released_by_operator", by=req.by, reason=req.reason,
                        held=released)  # fmt: skip
        answer = {"instance": registry.lease().get("instance"), "action": req.action,
                  "released": released, **registry.sweeper.brake()}  # fmt: skip
        await msg.respond(encode(answer))

    await nc.subscribe(SUBJECT, cb=handle)
