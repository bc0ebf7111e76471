"""The trust material of one deployment, kept in one directory.

    auth = AuthDir.init(Path("auth"))            # operator, accounts, role keys, server config
    creds = auth.mint("agent", "gpu-box-1")       # a credentials file's text
    auth.revoke("gpu-box-1")                      # every credential issued to that name
    await push_account(auth, nc_of_system_user)   # tell running servers (or restart them)

Layout (seeds are 0600, the directory 0700):

    operator.nk  operator.jwt      the operator: trusted by the server configuration
    system.nk    system.jwt        the system account (the server's own; revocations travel on it)
    account.nk   account.jwt       the registry's account: streams, bucket, every client
    signing/<role>.nk              one scoped signing key per role (roles.py)
    system-user.creds              a system-account user, to push account updates
    registry.creds admin.creds     minted at init for the registry process and for people
    issued.jsonl                   every identity minted (a JSON line each): name, role, user key, times
    auth.conf                      operator, system account, resolver: include it in a config
    server.conf                    a whole nats-server configuration that includes auth.conf
    resolver/                      the server's account store (type full: keeps pushed updates)
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import nats.errors
from nats.aio.client import Client

from registry import definitions
from registry.trust import jwt
from registry.trust.creds import ROLE_TAG, TrustError, creds_text
from registry.trust.roles import ROLES, template

ACCOUNT_NAME: Final = "REGISTRY"
SYSTEM_NAME: Final = "SYS"
LEDGER: Final = "issued.jsonl"
NAME_PATTERN: Final = re.compile(r"^[A-Za-z0-9_-]{1,128}$")

_UNLIMITED: Final = {
    "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
    "wildcards": True, "conn": -1, "leaf": -1,
}  # fmt: skip
_JETSTREAM: Final = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}


@dataclass(frozen=True)
class Issued:
    name: str
    role: str
    user: str  # the user's public nkey
    issued_at: int
    expires_at: int | None = None


def check_name(name: str) -> str:
    if not NAME_PATTERN.match(name):
        raise TrustError(f"invalid name {name!r}: 1-128 of A-Z a-z 0-9 _ - (a worker id)")
    return name


class AuthDir:
    """One deployment's keys, JWTs and ledger (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        if not (root / "account.nk").is_file():
            raise TrustError(f"{root}: no trust material here (run `registry auth init`)")

    # ------------------------------------------------------------ creating

    @classmethod
    def init(cls, root: Path, force: bool = False) -> AuthDir:
        """Make every key, sign the JWTs, write the server configuration and mint
        `registry.creds` and `admin.creds`."""
        if (root / "account.nk").exists() and not force:
            raise TrustError(f"{root} already holds trust material (--force replaces it)")
        root.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o700)
        (root / "signing").mkdir(exist_ok=True)
        (root / "resolver").mkdir(exist_ok=True)
        operator_seed, operator = jwt.new_key("operator")
        system_seed, system = jwt.new_key("account")
        account_seed, _ = jwt.new_key("account")
        _write_secret(root / "operator.nk", operator_seed)
        _write_secret(root / "system.nk", system_seed)
        _write_secret(root / "account.nk", account_seed)
        for role in ROLES:
            _write_secret(root / "signing" / f"{role}.nk", jwt.new_key("account")[0])
        operator_claims = {
            "sub": operator, "name": "worker-registry",
            "nats": {"type": "operator", "version": 2, "system_account": system},
        }  # fmt: skip
        (root / "operator.jwt").write_text(jwt.encode(operator_claims, operator_seed))
        system_claims = {
            "sub": system, "name": SYSTEM_NAME,
            "nats": {"type": "account", "version": 2, "limits": _UNLIMITED},
        }  # fmt: skip
        (root / "system.jwt").write_text(jwt.encode(system_claims, operator_seed))
        (root / LEDGER).write_text("")
        auth = cls(root)
        auth._sign_account({})
        user_seed, user = jwt.new_key("user")
        user_claims = {
            "sub": user, "name": "system",
            "nats": {"type": "user", "version": 2, "pub": {}, "sub": {}, **_limits()},
        }  # fmt: skip
        token = jwt.encode(user_claims, system_seed)
        _write_secret(root / "system-user.creds", creds_text(token, user_seed).encode())
        for role in ("registry", "admin"):
            _write_secret(root / f"{role}.creds", auth.mint(role, role).encode())
        auth.write_server_config()
        return auth

    def mint(self, role: str, name: str, expires_s: float | None = None) -> str:
        """A credentials file's text for `name` (the worker id, for an agent) in `role`."""
        if role not in ROLES:
            raise TrustError(f"unknown role {role!r}: one of {', '.join(ROLES)}")
        check_name(name)
        seed, user = jwt.new_key("user")
        now = int(time.time())
        claims: dict[str, Any] = {
            "sub": user, "name": name,
            "nats": {
                "type": "user", "version": 2, "issuer_account": self.account,
                "tags": [f"{ROLE_TAG}{role}"],
            },
        }  # fmt: skip
        expires_at = None
        if expires_s is not None:
            expires_at = now + max(1, int(expires_s))
            claims["exp"] = expires_at
        token = jwt.encode(claims, self._seed(f"signing/{role}.nk"), issued_at=now)
        self._record(Issued(name, role, user, now, expires_at))
        return creds_text(token, seed)

    def revoke(self, name: str | None = None, user: str | None = None) -> list[Issued]:
        """Revoke every credential issued to `name` so far (or the one user key):
        the account JWT gains revocations and is signed again. Returns what was revoked."""
        issued = self.issued()
        hits = [i for i in issued if (name is not None and i.name == name) or i.user == user]
        if not hits:
            raise TrustError(f"nothing issued to {name or user!r} (see `registry auth list`)")
        revocations = dict(self.revocations())
        now = int(time.time())
        for i in hits:
            revocations[i.user] = now
        self._sign_account(revocations)
        self.write_server_config()
        return hits

    # ------------------------------------------------------------ reading

    @property
    def account(self) -> str:
        return jwt.public_key(self._seed("account.nk"))

    @property
    def system_account(self) -> str:
        return jwt.public_key(self._seed("system.nk"))

    def account_jwt(self) -> str:
        return (self.root / "account.jwt").read_text().strip()

    def revocations(self) -> dict[str, int]:
        claims = jwt.decode(self.account_jwt(), verify=False)
        return dict(claims["nats"].get("revocations") or {})

    def issued(self) -> list[Issued]:
        path = self.root / LEDGER
        try:
            with path.open() as f:
                return [Issued(**json.loads(line)) for line in f if line.strip()]
        except (OSError, ValueError, TypeError) as e:
            raise TrustError(f"{path}: unreadable ledger ({e})") from None

    def is_revoked(self, i: Issued) -> bool:
        at = self.revocations().get(i.user)
        return at is not None and i.issued_at <= at

    # ------------------------------------------------------------ server configuration

    def auth_conf(self) -> str:
        resolver = (self.root / "resolver").resolve()
        return (
            "# Decentralized JWT auth for the worker registry (written by `registry auth`).\n"
            "# Include it from your nats-server configuration: include auth.conf\n"
            f'operator: "{(self.root / "operator.jwt").read_text().strip()}"\n'
            f'system_account: "{self.system_account}"\n'
            "resolver: {\n"
            "  type: full\n"
            f'  dir: "{resolver}"\n'
            "  allow_delete: false\n"
            '  interval: "2m"\n'
            "}\n"
            "resolver_preload: {\n"
            f'  {self.system_account}: "{(self.root / "system.jwt").read_text().strip()}"\n'
            f'  {self.account}: "{self.account_jwt()}"\n'
            "}\n"
        )

    def write_server_config(self) -> None:
        """auth.conf, and server.conf: the packaged configuration plus `include auth.conf`.
        The account JWT also goes into the resolver's store, so a restarted server
        starts from the latest revocations."""
        (self.root / "auth.conf").write_text(self.auth_conf())
        base = definitions.ROOT.joinpath(definitions.SERVER_CONF).read_text()
        (self.root / "server.conf").write_text(f"{base}\ninclude auth.conf\n")
        (self.root / "resolver" / f"{self.account}.jwt").write_text(self.account_jwt())

    # ------------------------------------------------------------ internals

    def _seed(self, relative: str) -> bytes:
        try:
            return (self.root / relative).read_bytes().strip()
        except OSError as e:
            raise TrustError(f"{self.root / relative}: {e.strerror}") from None

    def _sign_account(self, revocations: dict[str, int]) -> None:
        signing_keys: list[Any] = [
            {"kind": "user_scope", "key": jwt.public_key(self._seed(f"signing/{role}.nk")),
             "role": role, "template": template(role)}
            for role in ROLES
        ]  # fmt: skip
        nats: dict[str, Any] = {
            "type": "account", "version": 2, "limits": _UNLIMITED | _JETSTREAM,
            "signing_keys": signing_keys, "default_permissions": {"pub": {}, "sub": {}},
        }  # fmt: skip
        if revocations:
            nats["revocations"] = revocations
        claims = {"sub": self.account, "name": ACCOUNT_NAME, "nats": nats}
        # a server keeps the newer of two account JWTs: issue each one later than the last
        issued_at = int(time.time())
        if (self.root / "account.jwt").is_file():
            issued_at = max(issued_at, int(jwt.decode(self.account_jwt(), verify=False)["iat"]) + 1)
        token = jwt.encode(claims, self._seed("operator.nk"), issued_at=issued_at)
        (self.root / "account.jwt").write_text(token)

    def _record(self, issued: Issued) -> None:
        """One line per identity, appended: minting stays O(1) at 100,000 workers."""
        with (self.root / LEDGER).open("a") as f:
            f.write(json.dumps(vars(issued)) + "\n")


def _limits() -> dict[str, int]:
    return {"subs": -1, "data": -1, "payload": -1}


def _write_secret(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


class PushError(RuntimeError):
    """The servers could not be told of the account's new JWT; one line."""


async def push_account(auth: AuthDir, nc: Client, timeout_s: float = 5.0) -> None:
    """Send the account JWT (with its revocations) to the running servers, over a
    connection of the system-account user (`system-user.creds`). A full resolver
    stores it and passes it on to the rest of a cluster; connections of revoked
    users close at once."""
    subject = f"$SYS.REQ.ACCOUNT.{auth.account}.CLAIMS.UPDATE"
    try:
        msg = await nc.request(subject, auth.account_jwt().encode(), timeout=timeout_s)
    except (nats.errors.Error, TimeoutError) as e:
        raise PushError(f"no server took the account update ({type(e).__name__})") from None
    try:
        answer = json.loads(msg.data)
    except ValueError:
        raise PushError("the server's answer to the account update is not JSON") from None
    if "error" in answer:
        error = answer["error"]
        raise PushError(f"the server refused the account update: {error.get('description', error)}")
