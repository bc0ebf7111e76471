"""`registry auth init | mint | revoke | push | list`: the trust material of a deployment.

    registry auth init                                  # ./auth: keys, JWTs, server.conf
    registry auth mint --role agent --worker-id gpu-1 --out gpu-1.creds
    registry auth revoke --worker-id gpu-1              # and tell the running server
    registry auth list

Every failure is one line on stderr: exit 1 at run time, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from registry import timeparse
from registry.connect import AuthError, NatsUrlError, add_auth_arguments
from registry.ops.commands import OpsError, connected
from registry.ops.render import table
from registry.trust.authdir import (
    AuthDir,
    Issued,
    PushError,
    check_name,
    push_account,
    write_private,
)
from registry.trust.creds import TrustError
from registry.trust.jwt import JwtError
from registry.trust.roles import ROLES

DEFAULT_DIR = "./auth"


class _Usage(Exception):
    """A bad combination of flags: exit 2."""


def add_auth(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("auth", help="keys, credentials and revocations of a secured deployment")
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--dir", type=Path, default=Path(os.environ.get("REGISTRY_AUTH_DIR", DEFAULT_DIR)),
                       help=f"the trust material (env REGISTRY_AUTH_DIR, default {DEFAULT_DIR})")  # fmt: skip
    server = argparse.ArgumentParser(add_help=False)
    server.add_argument("--nats", default=os.environ.get("NATS_URL", "nats://127.0.0.1:4222"),
                        help="servers to tell (env NATS_URL, default nats://127.0.0.1:4222)")  # fmt: skip
    add_auth_arguments(server)
    commands = p.add_subparsers(dest="auth_command", required=True)

    init = commands.add_parser(
        "init", parents=[where], help="make keys, JWTs and a server configuration"
    )
    init.add_argument("--force", action="store_true", help="replace existing trust material")
    init.set_defaults(run=_run(_init))

    mint = commands.add_parser("mint", parents=[where], help="a credentials file for one identity")
    mint.add_argument("--role", required=True, choices=ROLES)
    mint.add_argument("--worker-id", help="the worker an agent speaks for (its --name)")
    mint.add_argument("--name", help="the identity's name (routers, operators; default the role)")
    mint.add_argument("--expires", metavar="DURATION", help="e.g. 30d, 12h (default: never)")
    mint.add_argument("--out", type=Path, help="write here (0600) instead of stdout")
    mint.set_defaults(run=_run(_mint))

    revoke = commands.add_parser("revoke", parents=[where, server],
                                 help="revoke every credential issued to a name, and tell the servers")  # fmt: skip
    who = revoke.add_mutually_exclusive_group(required=True)
    who.add_argument("--worker-id", help="an agent's worker id")
    who.add_argument("--name", help="any identity's name")
    who.add_argument("--user", help="one user public key (U...)")
    revoke.add_argument("--no-push", action="store_true",
                        help="only write the files (servers learn at their next start)")  # fmt: skip
    revoke.set_defaults(run=_run(_revoke))

    push = commands.add_parser("push", parents=[where, server],
                               help="send the account (with its revocations) to running servers")  # fmt: skip
    push.set_defaults(run=_run(_push))

    listing = commands.add_parser("list", parents=[where], help="identities issued, and revoked")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(run=_run(_list))


def _run(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            code = fn(args)
        except _Usage as e:
            print(f"registry auth: {e}", file=sys.stderr)
            return 2
        except (TrustError, PushError, AuthError, NatsUrlError, JwtError, OSError) as e:
            print(f"registry auth: {e}", file=sys.stderr)
            return 1
        return code

    return run


def _init(args: argparse.Namespace) -> int:
    auth = AuthDir.init(args.dir, force=args.force)
    d = auth.root
    print(f"trust material written to {d}/ (keep the .nk and .creds files secret)")
    print(f"  server:   nats-server -c {d}/server.conf   (or `include auth.conf` in yours)")
    print(f"  registry: registry up --nats nats://127.0.0.1:4222 --creds {d}/registry.creds")
    print(f"  admin:    {d}/admin.creds")
    print(f"  a worker: registry auth mint --dir {d} --role agent --worker-id ID --out ID.creds")
    return 0


def _mint(args: argparse.Namespace) -> int:
    if args.role == "agent":
        if not args.worker_id or args.name:
            raise _Usage("an agent's credentials need --worker-id (and no --name)")
        name = args.worker_id
    else:
        if args.worker_id:
            raise _Usage(f"--worker-id is for agents; name a {args.role} with --name")
        name = args.name or args.role
    try:
        check_name(name)
    except TrustError as e:
        raise _Usage(str(e)) from None
    expires = None
    if args.expires:
        try:
            expires = timeparse.parse_duration(args.expires)
        except timeparse.TimeParseError as e:
            raise _Usage(str(e)) from None
    creds = AuthDir(args.dir).mint(args.role, name, expires)
    if args.out is None:
        sys.stdout.write(creds)
        return 0
    write_private(args.out, creds.encode())
    print(f"{args.role} {name}: {args.out}", file=sys.stderr)
    return 0


def _revoke(args: argparse.Namespace) -> int:
    auth = AuthDir(args.dir)
    name = args.worker_id or args.name
    hits = auth.revoke(name=name, user=args.user, role="agent" if args.worker_id else None)
    for i in hits:
        print(f"revoked {i.role} {i.name} ({i.user}, issued {_when(i.issued_at)})")
    if args.no_push:
        print("not pushed: running servers learn it when told (registry auth push) or restarted")
        return 0
    return _push(args)


def _push(args: argparse.Namespace) -> int:
    auth = AuthDir(args.dir)
    for which in auth.refresh():  # made by an older version: its roles grew since
        print(f"signed the {which} account again with this version's role permissions")
    system_user = argparse.Namespace(**vars(args))  # the same servers and TLS files
    system_user.creds = args.creds or str(auth.root / "system-user.creds")

    async def send() -> None:
        async with connected(system_user) as nc:
            await push_account(auth, nc)

    try:
        asyncio.run(send())
    except OpsError as e:
        raise PushError(
            f"{e}: the files are updated; run `registry auth push` when a server answers, "
            "or restart the servers"
        ) from None
    print(f"pushed the account to {args.nats}: revoked users are disconnected and refused")
    return 0


def _list(args: argparse.Namespace) -> int:
    auth = AuthDir(args.dir)
    rows, revoked = auth.issued(), auth.revocations()
    if args.json:
        listing = [vars(i) | {"revoked": auth.is_revoked(i, revoked)} for i in rows]
        print(json.dumps(listing, indent=1))
        return 0
    print(table(["NAME", "ROLE", "ISSUED", "EXPIRES", "STATE", "USER"],
                [_row(auth, i, revoked) for i in rows]))  # fmt: skip
    return 0


def _row(auth: AuthDir, i: Issued, revoked: dict[str, int]) -> list[str]:
    expired = i.expires_at is not None and i.expires_at <= time.time()
    state = "revoked" if auth.is_revoked(i, revoked) else "expired" if expired else "valid"
    expires = _when(i.expires_at) if i.expires_at else "never"
    return [i.name, i.role, _when(i.issued_at), expires, state, i.user]


def _when(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
