"""The three fields of a JetStream message's ack subject the registry reads per message.

nats-py's `Msg.metadata` builds three dataclasses and a datetime for every
message; the projector folds thousands a second and needs only the stream
sequence, the stored time and the pending count. The ack subject is
`$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ns>.<pending>` (9
tokens), or, with a domain and account hash,
`$JS.ACK.<domain>.<hash>.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ns>.<pending>[...]`
(11 or more; nats-py reads the same positions).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import NamedTuple

from nats.aio.msg import Msg
from nats.errors import NotJSMessageError


class AckMeta(NamedTuple):
    seq: int  # stream sequence
    stored_ns: int  # when the server stored it, ns since the epoch
    pending: int  # messages after this one the consumer has not been sent

    @property
    def stored_at(self) -> datetime:
        """As nats-py computes `Msg.metadata.timestamp` (so both give the same instant)."""
        return datetime.fromtimestamp(self.stored_ns / 1_000_000_000.0, UTC)


def ack_meta(msg: Msg) -> AckMeta:
    tokens = (msg.reply or "").split(".")
    n = len(tokens)
    if (n != 9 and n < 11) or tokens[0] != "$JS" or tokens[1] != "ACK":
        raise NotJSMessageError
    base = 2 if n == 9 else 4  # v2 subjects: domain and account hash first
    return AckMeta(int(tokens[base + 3]), int(tokens[base + 5]), int(tokens[base + 6]))
