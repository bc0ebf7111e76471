"""Credentials files: a user JWT and its nkey seed, in the format every NATS client reads."""

from __future__ import annotations

import re
from typing import Any, Final

from registry.trust import jwt

ROLE_TAG: Final = "role:"  # a minted user JWT's tag naming its role (roles.py)


class TrustError(ValueError):
    """Trust material that is missing, malformed or asked for wrongly; one line."""


def creds_text(token: str, seed: bytes) -> str:
    """A `.creds` file as nats-py, the nats CLI and every NATS client read it."""
    return (
        "-----BEGIN NATS USER JWT-----\n"
        f"{token}\n"
        "------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n"
        "NKEYs are sensitive and should be treated as secrets.\n\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{seed.decode()}\n"
        "------END USER NKEY SEED------\n\n"
        "*************************************************************\n"
    )


_CREDS_JWT: Final = re.compile(r"-{3,}BEGIN NATS USER JWT-{3,}\s*(\S+)\s*-{3,}END NATS USER JWT")


def creds_claims(text: str) -> dict[str, Any]:
    """The user JWT's claims in a credentials file's text (signature not checked)."""
    found = _CREDS_JWT.search(text)
    if found is None:
        raise TrustError("not a credentials file (no NATS USER JWT block)")
    try:
        return jwt.decode(found.group(1), verify=False)
    except jwt.JwtError as e:
        raise TrustError(f"credentials file: {e}") from None


def role_of(claims: dict[str, Any]) -> str | None:
    """The role a minted user JWT names in its tags, if any."""
    for tag in claims.get("nats", {}).get("tags") or []:
        if isinstance(tag, str) and tag.startswith(ROLE_TAG):
            return tag[len(ROLE_TAG) :]
    return None
