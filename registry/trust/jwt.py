"""NATS JWTs (operator, account, user), signed with nkeys.

A NATS JWT is `base64url(header).base64url(claims).base64url(signature)` with
the header `{"typ":"JWT","alg":"ed25519-nkey"}`, the Ed25519 signature by the
issuer's nkey over the first two parts, and a `jti` that is the base32 of the
SHA-512/256 of the claims encoded without it. Small enough to write here: the
PyPI packages that do it are broken for what we need (scoped signing keys,
revocations; see ../shared/research/nats-trust-and-ha.md), and `nkeys` (the
official library) does the signing.

    seed, public = new_key("account")
    token = encode({"sub": public, "name": "REGISTRY", "nats": {...}}, signer=seed)
    claims = decode(token)            # checks the signature against `iss`
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from typing import Any, Final

import nacl.exceptions
import nacl.signing
import nkeys

HEADER: Final = {"typ": "JWT", "alg": "ed25519-nkey"}

_PREFIX: Final = {
    "operator": nkeys.PREFIX_BYTE_OPERATOR,
    "account": nkeys.PREFIX_BYTE_ACCOUNT,
    "user": nkeys.PREFIX_BYTE_USER,
}


class JwtError(ValueError):
    """A token that is not a NATS JWT, or whose signature does not hold."""


def new_key(kind: str) -> tuple[bytes, str]:
    """A fresh (seed, public key) of an operator, account or user."""
    seed: bytes = nkeys.encode_seed(os.urandom(32), _PREFIX[kind])
    return seed, public_key(seed)


def public_key(seed: bytes) -> str:
    kp = nkeys.from_seed(bytearray(seed))
    try:
        return bytes(kp.public_key).decode()
    finally:
        kp.wipe()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _compact(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


def encode(claims: dict[str, Any], signer: bytes, issued_at: int | None = None) -> str:
    """Sign `claims` (sub, name, nats, ...) with the seed `signer`, which becomes `iss`."""
    body = dict(claims, iss=public_key(signer), iat=issued_at or int(time.time()))
    body.pop("jti", None)
    body["jti"] = base64.b32encode(hashlib.new("sha512_256", _compact(body)).digest())
    body["jti"] = body["jti"].decode().rstrip("=")
    signing_input = f"{_b64(_compact(HEADER))}.{_b64(_compact(body))}"
    kp = nkeys.from_seed(bytearray(signer))
    try:
        signature = kp.sign(signing_input.encode())
    finally:
        kp.wipe()
    return f"{signing_input}.{_b64(signature)}"


def decode(token: str, verify: bool = True) -> dict[str, Any]:
    """The claims of a token; with `verify`, its signature is checked against `iss`."""
    try:
        header_b64, claims_b64, signature_b64 = token.strip().split(".")
        header = json.loads(_unb64(header_b64))
        claims: dict[str, Any] = json.loads(_unb64(claims_b64))
        signature = _unb64(signature_b64)
    except ValueError:
        raise JwtError("not a JWT (three base64url parts of JSON expected)") from None
    if header.get("alg") not in ("ed25519-nkey", "ed25519") or not isinstance(claims, dict):
        raise JwtError("not a NATS JWT (alg ed25519-nkey expected)")
    if verify:
        _verify(str(claims.get("iss", "")), f"{header_b64}.{claims_b64}".encode(), signature)
    return claims


def _verify(public: str, signed: bytes, signature: bytes) -> None:
    try:
        raw = base64.b32decode(public + "=" * (-len(public) % 8))
        nacl.signing.VerifyKey(raw[1:33]).verify(signed, signature)
    except (ValueError, nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError):
        raise JwtError("bad signature, or an issuer that is not a public nkey") from None
