"""The trust material of one deployment, kept in one directory.

    auth = AuthDir.init(Path("auth"))            # operator, accounts, role keys, server config
    creds = auth.mint("agent", "gpu-box-1")       # a credentials file's text
    auth.revoke("gpu-box-1")                      # every credential issued to that name
    await push_account(auth, nc_of_system_user)   # tell running servers (or restart them)

Layout (seeds are 0600, the directory 0700):

    operator.nk  operator.jwt      the operator: trusted by the server configuration
    system.nk    system.jwt        the system account (the server's own; revocations travel on it)
    account.nk   account.jwt       the registry's account: streams, bucket, registry, routers,
                                   operators, admins
    agents.nk    agents.jwt        the agents' account: no JetStream; it imports the three event
                                   subjects (as services: each publish gets its acknowledgement,
                                   and a reply subject an agent names cannot reach the registry's
                                   account) and worker.control.* (as a stream) from the registry's
    signing/<role>.nk              one scoped signing key per role (roles.py), in its account
    system-user.creds              a system-account user, to push account updates
    registry.creds admin.creds     minted at init for the registry process and for people
    issued.jsonl                   every identity minted (a JSON line each): name, role, user key, times
    auth.conf                      operator, system account, resolver: include it in a config
    server.conf                    a whole nats-server configuration that includes auth.conf
    resolver/                      the server's account store (type full: keeps pushed updates)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import nats.errors
from nats.aio.client import Client

from registry import definitions
from registry.protocol import InvalidWorkerId, validate_worker_id
from registry.trust import jwt
from registry.trust.creds import ROLE_TAG, TrustError, creds_text
from registry.trust.roles import ROLES, template

ACCOUNT_NAME: Final = "REGISTRY"
AGENTS_NAME: Final = "AGENTS"
SYSTEM_NAME: Final = "SYS"
ACCOUNT_FILES: Final = {"registry": "account", "agents": "agents"}  # -> <file>.nk, <file>.jwt
_EVENT_SUBJECTS: Final = ("worker.register.*", "worker.heartbeat.*", "worker.unregister.*")
_CONTROL_SUBJECTS: Final = "worker.control.*"


def account_of(role: str) -> str:
    """Which account a role's users live in: agents apart from everyone else."""
    return "agents" if role == "agent" else "registry"


LEDGER: Final = "issued.jsonl"

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
    """An identity's name is a worker-id token (it names subjects and inboxes)."""
    try:
        return validate_worker_id(name)
    except InvalidWorkerId as e:
        raise TrustError(str(e).replace("worker id", "name", 1)) from None


class AuthDir:
    """One deployment's keys, JWTs and ledger (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        if not self.holds(root):
            raise TrustError(f"{root}: no trust material here (run `registry auth init`)")

    @staticmethod
    def holds(root: Path) -> bool:
        """Whether `root` already holds a deployment's trust material."""
        return (root / "account.nk").is_file()

    # ------------------------------------------------------------ creating

    @classmethod
    def init(cls, root: Path, force: bool = False) -> AuthDir:
        """Make every key, sign the JWTs, write the server configuration and mint
        `registry.creds` and `admin.creds`."""
        if cls.holds(root) and not force:
            raise TrustError(f"{root} already holds trust material (--force replaces it)")
        root.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o700)
        (root / "signing").mkdir(exist_ok=True)
        (root / "resolver").mkdir(exist_ok=True)
        operator_seed, operator = jwt.new_key("operator")
        system_seed, system = jwt.new_key("account")
        _write_secret(root / "operator.nk", operator_seed)
        _write_secret(root / "system.nk", system_seed)
        for name in ACCOUNT_FILES.values():
            _write_secret(root / f"{name}.nk", jwt.new_key("account")[0])
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
        for which in ACCOUNT_FILES:
            auth._sign_account(which, {})
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

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One writer at a time (two `registry auth` commands at once lose nothing)."""
        with open(self.root / ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def mint(self, role: str, name: str, expires_s: float | None = None) -> str:
        """A credentials file's text for `name` (the worker id, for an agent) in `role`."""
        with self._locked():
            return self._mint(role, name, expires_s)

    def _mint(self, role: str, name: str, expires_s: float | None) -> str:
        if role not in ROLES:
            raise TrustError(f"unknown role {role!r}: one of {', '.join(ROLES)}")
        check_name(name)
        account = account_of(role)
        if account != "agents":  # one name, one identity: replies come to _INBOX_<name>
            # (the agents' account has one role, so a clash needs no reading of the
            # ledger, which holds a line per worker)
            clash = {
                i.role for i in self.issued() if i.name == name and account_of(i.role) == account
            }
            if clash - {role}:
                raise TrustError(
                    f"{name!r} is already a {', '.join(sorted(clash))}: pick another name"
                )
        seed, user = jwt.new_key("user")
        now = int(time.time())
        claims: dict[str, Any] = {
            "sub": user, "name": name,
            "nats": {
                "type": "user", "version": 2, "issuer_account": self.account_key(account),
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

    def revoke(
        self, name: str | None = None, user: str | None = None, role: str | None = None
    ) -> list[Issued]:
        """Revoke every credential issued to `name` so far (in `role`, or any), or the one
        user key: the account JWT gains revocations and is signed again. Returns what
        was revoked."""
        with self._locked():
            return self._revoke(name, user, role)

    def _revoke(self, name: str | None, user: str | None, role: str | None) -> list[Issued]:
        issued = self.issued()
        hits = [
            i for i in issued
            if ((name is not None and i.name == name) or i.user == user)
            and role in (None, i.role)
        ]  # fmt: skip
        if not hits:
            raise TrustError(f"nothing issued to {name or user!r} (see `registry auth list`)")
        now = int(time.time())
        for which in {account_of(i.role) for i in hits}:
            revocations = self.revocations(which)
            revocations.update({i.user: now for i in hits if account_of(i.role) == which})
            self._sign_account(which, revocations)
        self.write_server_config()
        return hits

    def refresh(self) -> list[str]:
        """Sign an account again where its roles' permissions differ from this version's
        (roles.py: an upgrade may grow them, e.g. the operator's cordon and drain), with
        its revocations kept. Returns the accounts signed again; then push or restart."""
        with self._locked():
            changed = []
            for which in ACCOUNT_FILES:
                claims = jwt.decode(self.account_jwt(which), verify=False)
                keys = claims["nats"].get("signing_keys") or []
                have = {k.get("role"): k.get("template") for k in keys if isinstance(k, dict)}
                want = {role: template(role) for role in ROLES if account_of(role) == which}
                if have != want:
                    self._sign_account(which, self.revocations(which))
                    changed.append(which)
            if changed:
                self.write_server_config()
            return changed

    # ------------------------------------------------------------ reading

    @property
    def account(self) -> str:
        """The registry's account (streams, bucket, every role but agents)."""
        return self.account_key("registry")

    @property
    def agents_account(self) -> str:
        return self.account_key("agents")

    def account_key(self, which: str) -> str:
        return jwt.public_key(self._seed(f"{ACCOUNT_FILES[which]}.nk"))

    @property
    def system_account(self) -> str:
        return jwt.public_key(self._seed("system.nk"))

    def account_jwt(self, which: str = "registry") -> str:
        path = self.root / f"{ACCOUNT_FILES[which]}.jwt"
        try:
            return path.read_text().strip()
        except OSError as e:
            raise TrustError(f"{path}: {e.strerror}") from None

    def account_jwts(self) -> dict[str, str]:
        """Account public key -> its current JWT, for every account users live in."""
        return {self.account_key(which): self.account_jwt(which) for which in ACCOUNT_FILES}

    def revocations(self, which: str | None = None) -> dict[str, int]:
        """User key -> revocation time, of one account or (None) of both."""
        out: dict[str, int] = {}
        for w in [which] if which else list(ACCOUNT_FILES):
            try:
                claims = jwt.decode(self.account_jwt(w), verify=False)
            except jwt.JwtError as e:
                raise TrustError(f"{ACCOUNT_FILES[w]}.jwt: {e}") from None
            out.update(claims["nats"].get("revocations") or {})
        return out

    def issued(self) -> list[Issued]:
        path = self.root / LEDGER
        try:
            with path.open() as f:
                return [Issued(**json.loads(line)) for line in f if line.strip()]
        except (OSError, ValueError, TypeError) as e:
            raise TrustError(f"{path}: unreadable ledger ({e})") from None

    def is_revoked(self, i: Issued, revocations: dict[str, int] | None = None) -> bool:
        at = (self.revocations() if revocations is None else revocations).get(i.user)
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
            + "".join(f'  {key}: "{token}"\n' for key, token in self.account_jwts().items())
            + "}\n"
        )

    def write_server_config(self) -> None:
        """auth.conf, and server.conf: the packaged configuration plus `include auth.conf`.
        The account JWT also goes into the resolver's store, so a restarted server
        starts from the latest revocations."""
        _write_atomically(self.root / "auth.conf", self.auth_conf())
        base = definitions.ROOT.joinpath(definitions.SERVER_CONF).read_text()
        _write_atomically(self.root / "server.conf", f"{base}\ninclude auth.conf\n")
        for key, token in self.account_jwts().items():
            _write_atomically(self.root / "resolver" / f"{key}.jwt", token)

    # ------------------------------------------------------------ internals

    def _seed(self, relative: str) -> bytes:
        try:
            return (self.root / relative).read_bytes().strip()
        except OSError as e:
            raise TrustError(f"{self.root / relative}: {e.strerror}") from None

    def _sign_account(self, which: str, revocations: dict[str, int]) -> None:
        """(Re)issue one account's JWT: its roles' scoped signing keys, the exports and
        imports that join the two accounts, and its revocations."""
        roles = [role for role in ROLES if account_of(role) == which]
        signing_keys: list[Any] = [
            {"kind": "user_scope", "key": jwt.public_key(self._seed(f"signing/{role}.nk")),
             "role": role, "template": template(role)}
            for role in roles
        ]  # fmt: skip
        nats: dict[str, Any] = {
            "type": "account", "version": 2, "signing_keys": signing_keys,
            "default_permissions": {"pub": {}, "sub": {}},
        }  # fmt: skip
        if which == "registry":
            nats["limits"] = _UNLIMITED | _JETSTREAM
            nats["exports"] = [
                *({"name": s, "subject": s, "type": "service", "response_type": "Singleton"}
                  for s in _EVENT_SUBJECTS),
                {"name": _CONTROL_SUBJECTS, "subject": _CONTROL_SUBJECTS, "type": "stream"},
            ]  # fmt: skip
        else:
            registry = self.account_key("registry")
            nats["limits"] = _UNLIMITED
            nats["imports"] = [
                *({"name": s, "subject": s, "account": registry, "type": "service"}
                  for s in _EVENT_SUBJECTS),
                {"name": _CONTROL_SUBJECTS, "subject": _CONTROL_SUBJECTS, "account": registry,
                 "type": "stream"},
            ]  # fmt: skip
        if revocations:
            nats["revocations"] = revocations
        name = ACCOUNT_NAME if which == "registry" else AGENTS_NAME
        claims = {"sub": self.account_key(which), "name": name, "nats": nats}
        # a server keeps the newer of two account JWTs: issue each one later than the last
        path = self.root / f"{ACCOUNT_FILES[which]}.jwt"
        issued_at = int(time.time())
        if path.is_file():
            try:
                previous = int(jwt.decode(path.read_text(), verify=False)["iat"])
            except (jwt.JwtError, KeyError, ValueError, TypeError):
                previous = 0  # unreadable: this one replaces it
            issued_at = max(issued_at, previous + 1)
        _write_atomically(path, jwt.encode(claims, self._seed("operator.nk"), issued_at=issued_at))

    def _record(self, issued: Issued) -> None:
        """One line per identity, appended: minting stays O(1) at 100,000 workers."""
        with (self.root / LEDGER).open("a") as f:
            f.write(json.dumps(vars(issued)) + "\n")


def _limits() -> dict[str, int]:
    return {"subs": -1, "data": -1, "payload": -1}


def _write_secret(path: Path, data: bytes) -> None:
    write_private(path, data)


def write_private(path: Path, data: bytes) -> None:
    """Write a file only its owner can read, even one that existed with a wider mode."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_atomically(path: Path, text: str) -> None:
    """Another name first, then a rename: a crash leaves the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


class PushError(RuntimeError):
    """The servers could not be told of the account's new JWT; one line."""


async def push_account(auth: AuthDir, nc: Client, timeout_s: float = 5.0) -> None:
    """Send the account JWT (with its revocations) to the running servers, over a
    connection of the system-account user (`system-user.creds`). A full resolver
    stores it and passes it on to the rest of a cluster; connections of revoked
    users close at once."""
    for account, token in auth.account_jwts().items():
        subject = f"$SYS.REQ.ACCOUNT.{account}.CLAIMS.UPDATE"
        try:
            msg = await nc.request(subject, token.encode(), timeout=timeout_s)
        except (nats.errors.Error, TimeoutError) as e:
            raise PushError(f"no server took the account update ({type(e).__name__})") from None
        try:
            answer = json.loads(msg.data)
        except ValueError:
            raise PushError("the server's answer to the account update is not JSON") from None
        if "error" in answer:
            error = answer["error"]
            raise PushError(
                f"the server refused the account update: {error.get('description', error)}"
            )
