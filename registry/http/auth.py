"""Who may speak for a worker over HTTP: the identities `registry auth` mints.

Open mode (no `--auth-dir`) checks nothing, as the open NATS mode does; the
gateway then listens on loopback only unless told otherwise. Secured mode takes
as a worker's token the user JWT of its agent credentials (`registry auth mint
--role agent --worker-id ID`: the line between the JWT markers of ID.creds, never
the seed): the register request's `auth_token`, and `Authorization: Bearer
<jwt>` on its heartbeats and its unregistration. A token is accepted when the
agents' role signing key of this deployment signed it, its name is the worker
id, it has not expired, and it is not revoked (the agents' account JWT is read
again whenever `registry auth revoke` rewrites it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from registry.trust import jwt
from registry.trust.authdir import ACCOUNT_FILES, AuthDir
from registry.trust.creds import TrustError

AGENT_ROLE = "agent"
MAX_CACHED = 100_000


class Refused(PermissionError):
    """No valid token for this worker: 401, with the reason in one line."""


@dataclass(frozen=True)
class _Token:
    name: str
    user: str
    issued_at: int
    expires_at: int | None


class Guard:
    """Checks tokens (secured) or nothing (open)."""

    def __init__(self, auth_dir: Path | None) -> None:
        self.auth_dir = auth_dir
        self._checked: dict[str, _Token] = {}  # token -> what its verified claims said
        self._account_mtime = -1.0
        self._signing: set[str] = set()
        self._revoked: dict[str, int] = {}
        if auth_dir is not None:
            self._load_account()

    @classmethod
    def open(cls) -> Guard:
        return cls(None)

    @property
    def secured(self) -> bool:
        return self.auth_dir is not None

    def check_register(self, worker_id: str, auth_token: str | None) -> None:
        self._check(worker_id, auth_token, "auth_token")

    def check_worker(self, worker_id: str, authorization: str | None) -> None:
        token = None
        if authorization is not None:
            scheme, _, value = authorization.partition(" ")
            token = value.strip() if scheme.lower() == "bearer" else None
        self._check(worker_id, token, "Authorization: Bearer")

    def _check(self, worker_id: str, token: str | None, where: str) -> None:
        if self.auth_dir is None:
            return
        if not token:
            raise Refused(f"secured gateway: {where} with the worker's agent JWT required")
        self._load_account()
        t = self._verified(token)
        if t.name != worker_id:
            raise Refused(f"the token is {t.name!r}'s, not {worker_id!r}'s")
        if t.expires_at is not None and t.expires_at <= time.time():
            raise Refused("the token has expired")
        at = self._revoked.get(t.user)
        if at is not None and t.issued_at <= at:
            raise Refused("the token was revoked")

    def _verified(self, token: str) -> _Token:
        known = self._checked.get(token)
        if known is not None:
            return known
        try:
            claims: dict[str, Any] = jwt.decode(token, verify=True)
        except jwt.JwtError as e:
            raise Refused(f"invalid token: {e}") from None
        if claims.get("iss") not in self._signing:
            raise Refused("the token was not issued to an agent of this deployment")
        exp = claims.get("exp")
        t = _Token(name=str(claims.get("name", "")), user=str(claims.get("sub", "")),
                   issued_at=int(claims.get("iat", 0)),
                   expires_at=int(exp) if exp is not None else None)  # fmt: skip
        if len(self._checked) >= MAX_CACHED:
            self._checked.clear()
        self._checked[token] = t
        return t

    def _load_account(self) -> None:
        """The agents' account JWT: its agent signing key and revocations, when it changed."""
        assert self.auth_dir is not None
        path = self.auth_dir / f"{ACCOUNT_FILES['agents']}.jwt"
        try:
            mtime = path.stat().st_mtime
        except OSError as e:
            raise TrustError(f"{path}: {e.strerror} (made by `registry auth init`)") from None
        if mtime == self._account_mtime:
            return
        auth = AuthDir(self.auth_dir)
        try:
            claims = jwt.decode(auth.account_jwt("agents"), verify=False)
        except jwt.JwtError as e:
            raise TrustError(f"{path}: {e}") from None
        keys = claims.get("nats", {}).get("signing_keys") or []
        self._signing = {k["key"] for k in keys if isinstance(k, dict) and k.get("role") == AGENT_ROLE}
        self._revoked = auth.revocations("agents")
        self._account_mtime = mtime
