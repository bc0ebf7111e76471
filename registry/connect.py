"""The one place that builds NATS connection options, for every client.

The agent, the simulator, routers, the operator commands, `registry check` and
the registry process all connect with `NatsOptions(...).kwargs()`: the server
list (one URL, or several comma-separated for a cluster), a client name, the
first connection's timeout, and the reconnect policy. Two policies cover them:

- long-running clients reconnect forever; with jitter, each try waits the
  interval plus a random part and goes to the least-failed server first, so a
  fleet does not return to a restarted server in one herd;
- one-shot commands (`FAIL_FAST`) try the servers briefly, never reconnect, and
  fail with one clear line.

How a client proves who it is (`Auth`: a credentials file or an nkey seed) and
its TLS files come from the same flags and environment variables everywhere
(`AUTH_OPTIONS`: `--creds`, `--nkey`, `--tls-ca`, `--tls-cert`, `--tls-key`, as
the `nats` CLI names them), checked before anything connects.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final
from urllib.parse import urlsplit

import nats.errors
import structlog
from nats.aio.client import Client, Server

from registry import protocol
from registry.trust.creds import TrustError, creds_claims, role_of

log = structlog.get_logger("registry.connect")

NATS_SCHEMES: Final = ("nats", "tls", "ws", "wss")
DEFAULT_URL: Final = "nats://127.0.0.1:4222"


class NatsUrlError(ValueError):
    """A server list that is empty or holds something that is not a NATS URL."""


def is_nats_url(url: str) -> bool:
    parts = urlsplit(url if "://" in url else f"nats://{url}")
    try:
        return parts.scheme in NATS_SCHEMES and bool(parts.hostname) and parts.port != 0
    except ValueError:  # a port that is not a number, or out of range
        return False


def split_servers(value: str | Sequence[str]) -> list[str]:
    """`nats://a:4222,nats://b:4222` (or a list) -> the URLs; NatsUrlError if any is bad."""
    parts = value.split(",") if isinstance(value, str) else value
    urls = [url.strip() for url in parts if url.strip()]
    if not urls:
        raise NatsUrlError("no NATS server URL given")
    for url in urls:
        if not is_nats_url(url):
            raise NatsUrlError(f"not a NATS URL: {url!r} (expected e.g. {DEFAULT_URL})")
    return urls


def redact(url: str) -> str:
    """A server URL without credentials, for logs and messages."""
    parts = urlsplit(url if "://" in url else f"nats://{url}")
    return f"{parts.scheme}://{parts.hostname}:{parts.port or 4222}"


class AuthError(ValueError):
    """Credentials or TLS files that cannot be used; the message is one line."""


# Auth field -> (flag, environment variable, help): the same for every command
AUTH_OPTIONS: Final = {
    "creds": ("--creds", "NATS_CREDS", "credentials file: a user JWT and its nkey seed"),
    "nkey": ("--nkey", "NATS_NKEY", "file holding an nkey seed (a user of the server config)"),
    "tls_ca": ("--tls-ca", "NATS_CA", "CA certificate(s) to trust, PEM"),
    "tls_cert": ("--tls-cert", "NATS_CERT", "client certificate, PEM (mutual TLS)"),
    "tls_key": ("--tls-key", "NATS_KEY", "the client certificate's private key, PEM"),
}


@dataclass(frozen=True)
class Auth:
    """Who the client is and which TLS files it uses; each a file path, None when unused."""

    creds: str | None = None
    nkey: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    _context: ssl.SSLContext | None = field(default=None, init=False, repr=False, compare=False)
    _identity: str | None = field(default=None, init=False, repr=False, compare=False)
    _role: str | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name, (flag, _, _) in AUTH_OPTIONS.items():
            path = getattr(self, name)
            if path is not None and not os.access(path, os.R_OK):
                raise AuthError(f"{flag} {path}: no such file, or not readable")
        if self.creds and self.nkey:
            raise AuthError("--creds and --nkey are two ways to say who you are: give one")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise AuthError("--tls-cert and --tls-key go together")
        if self.uses_tls:  # load the files now: a bad one is a usage error, not a lost server
            object.__setattr__(self, "_context", self._load_tls())
        if self.creds:
            identity, role = _identity_of(self.creds)
            object.__setattr__(self, "_identity", identity)
            object.__setattr__(self, "_role", role)

    @classmethod
    def from_values(
        cls, values: Mapping[str, str | None], environ: Mapping[str, str] | None = None
    ) -> Auth:
        """Flags (field -> value or None) over environment variables."""
        env = os.environ if environ is None else environ
        return cls(**{
            name: values.get(name) or env.get(variable) or None
            for name, (_, variable, _) in AUTH_OPTIONS.items()
        })  # fmt: skip

    @property
    def identity(self) -> str | None:
        """The name in the credentials file's user JWT (a worker id, for an agent's),
        when `registry auth mint` made it; None otherwise (then the default inbox)."""
        return self._identity

    @property
    def role(self) -> str | None:
        """The role `registry auth mint` wrote into the credentials (agent, router, ...)."""
        return self._role

    @property
    def uses_tls(self) -> bool:
        return bool(self.tls_ca or self.tls_cert)

    def _load_tls(self) -> ssl.SSLContext:
        try:
            context = ssl.create_default_context(cafile=self.tls_ca)
            if self.tls_cert and self.tls_key:
                context.load_cert_chain(self.tls_cert, self.tls_key)
        except (ssl.SSLError, OSError) as e:
            raise AuthError(f"TLS files cannot be used: {e}") from None
        return context

    def kwargs(self) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if self.creds:
            options["user_credentials"] = self.creds  # re-read on every reconnect
        if self._identity:  # replies come to this identity's own inboxes (trust/roles.py)
            options["inbox_prefix"] = f"_INBOX_{self._identity}"
        if self.nkey:
            options["nkeys_seed"] = self.nkey
        if self._context is not None:
            options["tls"] = self._context
        return options


def is_refused(e: BaseException) -> bool:
    """The server refused the client's credentials (unknown, revoked, expired): nats-py
    raises its AuthorizationError, or a plain Error carrying the server's -ERR."""
    return isinstance(e, nats.errors.AuthorizationError) or "authorization" in str(e).lower()


def _identity_of(creds: str) -> tuple[str | None, str | None]:
    """(name, role) of the credentials' user JWT; the name only when it is a subject token."""
    try:
        with open(creds, encoding="utf-8", errors="replace") as f:
            claims = creds_claims(f.read())
    except TrustError as e:
        raise AuthError(f"--creds {creds}: {e}") from None
    except OSError as e:
        raise AuthError(f"--creds {creds}: {e.strerror or e}") from None
    name, role = claims.get("name"), role_of(claims)
    if role is None:  # not minted by `registry auth`: its inbox rules are not ours to guess
        return None, None
    if not isinstance(name, str):
        return None, role
    try:  # a name is a worker-id token (it names subjects and inboxes)
        return protocol.validate_worker_id(name), role
    except protocol.InvalidWorkerId:
        return None, role


def add_auth_arguments(parser: argparse.ArgumentParser) -> None:
    """--creds, --nkey, --tls-ca, --tls-cert, --tls-key (each with its environment variable)."""
    for name, (flag, variable, text) in AUTH_OPTIONS.items():
        parser.add_argument(flag, dest=name, metavar="FILE", help=f"{text} (env {variable})")


def auth_from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Auth:
    return Auth.from_values({name: getattr(args, name, None) for name in AUTH_OPTIONS}, environ)


@dataclass(frozen=True)
class Reconnect:
    """How a lost connection (and, for `forever`, a first one) is retried."""

    forever: bool = True
    wait_s: float = 0.5
    jitter_s: float = 0.0


FAIL_FAST: Final = Reconnect(forever=False, wait_s=0.1)


@dataclass(frozen=True)
class NatsOptions:
    """Everything a client says to nats-py when it connects, built in one place."""

    servers: tuple[str, ...]
    name: str
    connect_timeout_s: float = 2.0
    reconnect: Reconnect = field(default_factory=Reconnect)
    ping_interval_s: int | None = None  # None: the library's default
    auth: Auth = field(default_factory=Auth)

    @classmethod
    def of(cls, servers: str | Sequence[str], name: str, **kw: Any) -> NatsOptions:
        return cls(servers=tuple(split_servers(servers)), name=name, **kw)

    def kwargs(self, **extra: Any) -> dict[str, Any]:
        """Keyword arguments for `nats.connect` / `Client.connect`; `extra` adds callbacks
        and the odd client-specific setting (e.g. a larger pending buffer)."""
        r = self.reconnect
        options: dict[str, Any] = {
            "servers": list(self.servers),
            "name": self.name,
            "connect_timeout": self.connect_timeout_s,
            "allow_reconnect": r.forever,
            "max_reconnect_attempts": -1 if r.forever else 1,
            "reconnect_time_wait": r.wait_s,
        }
        if self.ping_interval_s is not None:
            options["ping_interval"] = self.ping_interval_s
        if r.forever and r.jitter_s > 0:
            options["reconnect_to_server_handler"] = partial(_least_failed, r)
        return options | self.auth.kwargs() | extra


async def connect(options: NatsOptions, **extra: Any) -> Client:
    """A connected client (see `NatsOptions.kwargs` for `extra`)."""
    nc = Client()
    await nc.connect(**options.kwargs(**extra))
    return nc


async def connect_patiently(
    options: NatsOptions, client: Callable[[], Client] = Client, **extra: Any
) -> Client:
    """Connect, retrying with backoff while no server answers (logged as
    `nats_unreachable`), then reconnect forever; disconnects and reconnects are logged.

    With unlimited reconnects nats-py also retries the *first* connection forever,
    silently, so this loop would never see a failure: the first connection may
    retry once, and unlimited reconnects are switched on once connected.
    """
    servers = ",".join(redact(url) for url in options.servers)
    backoff = 0.2
    while True:
        nc = client()
        callbacks = {
            "disconnected_cb": _on_disconnected(nc, servers),
            "reconnected_cb": _on_reconnected(nc),
            "error_cb": _on_error,
        }
        try:
            first = {"max_reconnect_attempts": 1}
            await nc.connect(**options.kwargs(**(callbacks | extra | first)))
        except (OSError, nats.errors.Error, TimeoutError) as e:
            log.warning("nats_unreachable", url=servers, error=str(e) or type(e).__name__,
                        retry_in_s=round(backoff, 1))  # fmt: skip
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)
            continue
        if options.reconnect.forever:
            nc.options["max_reconnect_attempts"] = -1  # connected: from now on, forever
        return nc


def _on_disconnected(nc: Client, servers: str) -> Callable[[], Awaitable[None]]:
    async def cb() -> None:
        if not nc.is_closed:  # our own drain or close is not news
            log.warning("nats_disconnected", url=servers)

    return cb


def _on_reconnected(nc: Client) -> Callable[[], Awaitable[None]]:
    async def cb() -> None:
        url = nc.connected_url
        log.info("nats_reconnected", url=redact(url.geturl()) if url else "?")

    return cb


_last_refusal_logged = [-60.0]  # monotonic time of the last `nats_not_authorized` line


async def _on_error(e: Exception) -> None:
    if is_refused(e):  # said at most every 30 s while the server keeps refusing
        now = time.monotonic()
        if now - _last_refusal_logged[0] >= 30.0:
            _last_refusal_logged[0] = now
            log.error("nats_not_authorized", error=str(e) or type(e).__name__,
                      hint="the server refuses these credentials (revoked or expired?)")  # fmt: skip
        return
    log.debug("nats_error", error=str(e) or type(e).__name__)


def _least_failed(
    policy: Reconnect, servers: list[Server], _info: dict[str, Any]
) -> tuple[Server, float]:
    """The least-failed server, after the wait plus jitter (no herd after a restart)."""
    delay = policy.wait_s + random.uniform(0.0, policy.jitter_s)
    return min(servers, key=lambda server: server.reconnects), delay
