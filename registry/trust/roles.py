"""Who may say what: one permission template per role. PURE data.

Each role is a scoped signing key of its account (agents: the agents' own;
the rest: the registry's, see authdir.py); the server expands its template for
every user that key signs, with `{{name()}}` the user's name (the worker id,
for agents). So one template covers a fleet of
any size, and adding a worker is minting a credentials file: no server
restart, no reload, no per-user configuration on the server.

Every identity reads its replies on its own inbox prefix `_INBOX_<name>`
(our clients set it from the credentials file), so nobody reads another's
replies.
"""

from __future__ import annotations

from typing import Any, Final

from registry.protocol import (
    AVAILABILITY_STREAM,
    BUCKET,
    EVENTS_STREAM,
    LEASE_BUCKET,
    OPERATOR_KINDS,
    PROJECTOR_CONSUMER,
)

NAME: Final = "{{name()}}"
INBOX: Final = "_INBOX_{{name()}}.>"
KV_STREAM: Final = f"KV_{BUCKET}"
LEASE_STREAM: Final = f"KV_{LEASE_BUCKET}"
ROLES: Final = ("agent", "registry", "router", "operator", "admin")

_JS: Final = "$JS.API"


def _follow(stream: str, unnamed: bool = True) -> list[str]:
    """The JetStream API calls that read a stream through consumers of one's own.

    `unnamed`: the old create subject, whose consumer name (if any) is in the body,
    where no permission can see it: allowed only on streams without the projector's
    consumer. Named creates carry the name in the subject, checked against the body.
    """
    return [
        f"{_JS}.INFO",
        f"{_JS}.STREAM.INFO.{stream}",
        *([f"{_JS}.CONSUMER.CREATE.{stream}"] if unnamed else []),
        f"{_JS}.CONSUMER.CREATE.{stream}.*",
        f"{_JS}.CONSUMER.CREATE.{stream}.*.>",
        f"{_JS}.CONSUMER.INFO.{stream}.*",
        f"{_JS}.CONSUMER.DELETE.{stream}.*",
        f"{_JS}.CONSUMER.MSG.NEXT.{stream}.*",
        f"{_JS}.STREAM.MSG.GET.{stream}",
        f"{_JS}.DIRECT.GET.{stream}",
        f"{_JS}.DIRECT.GET.{stream}.>",
        f"$JS.FC.{stream}.>",
    ]


# The registry's durable consumer is its checkpoint: nobody else creates, changes or
# deletes a consumer of that name.
_PROTECTED: Final = [
    f"{_JS}.CONSUMER.CREATE.*.{PROJECTOR_CONSUMER}",
    f"{_JS}.CONSUMER.CREATE.*.{PROJECTOR_CONSUMER}.>",
    f"{_JS}.CONSUMER.DELETE.*.{PROJECTOR_CONSUMER}",
    f"{_JS}.CONSUMER.MSG.NEXT.*.{PROJECTOR_CONSUMER}",  # pulling would steal its events
    f"{_JS}.CONSUMER.DURABLE.CREATE.>",
]

# What the registry never does, so that nothing can make it (a reply subject it
# answers to, say): delete or purge a stream or its messages, or the account's data.
_DESTRUCTIVE: Final = [
    f"{_JS}.STREAM.DELETE.>", f"{_JS}.STREAM.PURGE.>", f"{_JS}.STREAM.MSG.DELETE.>",
    f"{_JS}.ACCOUNT.>", f"{_JS}.STREAM.SNAPSHOT.>", f"{_JS}.STREAM.RESTORE.>",
]  # fmt: skip

_SERVICE_READS: Final = ["registry.pick", "registry.list", "registry.get"]

TEMPLATES: Final[dict[str, dict[str, Any]]] = {
    # one worker: its own three subjects, its own control subject, its own replies
    "agent": {
        "pub": {
            "allow": [f"worker.{kind}.{NAME}" for kind in ("register", "heartbeat", "unregister")]
        },
        "sub": {"allow": [f"worker.control.{NAME}", INBOX]},
    },
    # the projector and sweeper: verdicts, availability, control, the bucket, the API
    # it provisions with; it answers requests (resp) and reads everything it folds
    "registry": {
        "pub": {
            "allow": [
                "worker.expired.*",
                "worker.late.*",
                "worker.available.*",
                "worker.control.*",
                f"{_JS}.>",
                f"$KV.{BUCKET}.>",
                f"$KV.{LEASE_BUCKET}.>",  # the active/standby lease
                "$JS.ACK.>",
                "$JS.FC.>",
            ],
            "deny": _DESTRUCTIVE,
        },
        "sub": {"allow": [">"]},
        # replies to requesters (`_INBOX_<name>.>` of any name: no permission pattern
        # says that). `resp` lets a reply go to whatever subject a request names, so
        # the query service's connection publishes to inboxes only
        # (registry.server.service.ServiceClient)
        "resp": {"max": 1, "ttl": 0},
    },
    # follows availability; asks the query service; nothing more
    "router": {
        "pub": {"allow": [*_follow(AVAILABILITY_STREAM), *_SERVICE_READS], "deny": _PROTECTED},
        "sub": {"allow": [INBOX]},
    },
    # reads events, the bucket and the service; cordons, uncordons and drains
    # workers (operator events, folded like any other); deletes nothing
    "operator": {
        "pub": {
            "allow": [
                *[f"worker.{kind}.*" for kind in OPERATOR_KINDS],
                *_follow(EVENTS_STREAM, unnamed=False),
                *_follow(KV_STREAM),
                *_follow(AVAILABILITY_STREAM),
                *_follow(LEASE_STREAM),
                f"{_JS}.STREAM.NAMES",
                f"{_JS}.STREAM.LIST",
                f"{_JS}.CONSUMER.NAMES.*",
                f"{_JS}.CONSUMER.LIST.*",
                "registry.>",
                "$SRV.>",
            ],
            "deny": _PROTECTED,
        },
        "sub": {"allow": [INBOX]},
    },
    "admin": {"pub": {"allow": [">"]}, "sub": {"allow": [">"]}, "resp": {"max": 1, "ttl": 0}},
}


def template(role: str) -> dict[str, Any]:
    """The role's permissions as a scoped signing key carries them (no limits: -1)."""
    return TEMPLATES[role] | {"subs": -1, "data": -1, "payload": -1}
