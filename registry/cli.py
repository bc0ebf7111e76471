"""`registry ...`: argparse only — parse, validate into Settings, call app.

Exit codes: 0 clean shutdown, 1 crash or runtime error, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import signal
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

import pydantic

from registry import logs
from registry.connect import AuthError, add_auth_arguments, auth_from_args
from registry.ops.commands import add_commands
from registry.server.embedded import ServerError
from registry.server.provision import ProvisionError
from registry.server.settings import RegistrySettings
from registry.trust.cli import add_auth
from registry.trust.creds import TrustError


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    try:
        return float(raw) if raw else default
    except ValueError:
        return default


def _env_opt(name: str) -> float | None:
    raw = os.environ.get(name)
    try:
        return float(raw) if raw else None
    except ValueError:
        return None


def add_up(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("up", help="run the registry (embedded nats-server unless --nats)")
    p.add_argument("--nats", default=os.environ.get("NATS_URL"),
                   help="existing NATS server or cluster (env NATS_URL); omit to embed one")
    p.add_argument("--port", type=int, default=int(os.environ.get("REGISTRY_PORT", 4222)),
                   help="embedded server port on 127.0.0.1 (default 4222; 0 picks a free one)")
    p.add_argument("--data-dir", type=Path, default=Path(os.environ.get("REGISTRY_DATA_DIR", "./data")),
                   help="embedded server store (default ./data)")
    p.add_argument("--timeout-floor", type=float, default=_env_float("REGISTRY_TIMEOUT_FLOOR_S", 1.0),
                   help="minimum silence before expiry, seconds (default 1)")
    p.add_argument("--timeout-factor", type=float, default=_env_float("REGISTRY_TIMEOUT_FACTOR", 3.0),
                   help="heartbeat intervals missed before expiry (default 3)")
    p.add_argument("--late-factor", type=float, default=_env_float("REGISTRY_LATE_FACTOR", 1.5),
                   help="intervals missed before a worker is announced late (default 1.5; 0 off)")
    p.add_argument("--outage-grace", type=float,
                   default=_env_float("REGISTRY_OUTAGE_GRACE_S", 10.0),
                   help="after an outage (no answer from the stream, a reconnect), seconds "
                        "before anyone not seen beating is judged (default 10)")
    p.add_argument("--brake-fraction", type=float,
                   default=_env_float("REGISTRY_BRAKE_FRACTION", 0.5),
                   help="hold expiries when more than this share of the fleet goes silent "
                        "(default 0.5; 1 disables)")
    p.add_argument("--brake-hold", type=float, default=_env_opt("REGISTRY_BRAKE_HOLD_S"),
                   metavar="S", help="the brake holds expiries S seconds, then releases them at "
                   "--brake-release-rate (default: 3 timeouts of the held workers)")
    p.add_argument("--brake-release-rate", type=float,
                   default=_env_opt("REGISTRY_BRAKE_RELEASE_PER_S"), metavar="N",
                   help="expiries per second after a hold (default: 1%% of the fleet, at least 1)")
    p.add_argument("--retention", type=float, default=_env_float("REGISTRY_RETENTION_S", 86400.0),
                   help="seconds an offline record stays in the bucket (default 86400); then it "
                        "is purged, and routers forget the worker")
    p.add_argument("--purge-marker-ttl", type=int,
                   default=_env_int("REGISTRY_PURGE_MARKER_TTL_S") or 3600,
                   help="seconds a purged worker's bucket marker and `purged` availability "
                        "message stay before the server removes them (default 3600)")
    p.add_argument("--replicas", type=int, default=int(os.environ.get("REGISTRY_REPLICAS", 1)),
                   help="stream and bucket replicas on a cluster (default 1)")
    p.add_argument("--instance", default=os.environ.get("REGISTRY_INSTANCE"),
                   help="this process's name among registries (default host-pid-random)")
    p.add_argument("--lease-ttl", type=int, default=int(os.environ.get("REGISTRY_LEASE_TTL_S", 3)),
                   help="seconds a silent active registry keeps the lease before a standby "
                        "takes over (default 3)")
    p.add_argument("--metrics-port", type=int,
                   default=os.environ.get("REGISTRY_METRICS_PORT") or None,
                   help="serve Prometheus metrics on http://HOST:PORT/metrics "
                        "(env REGISTRY_METRICS_PORT; default off; 0 picks a free port)")
    p.add_argument("--metrics-host", default=os.environ.get("REGISTRY_METRICS_HOST", "127.0.0.1"),
                   help="address for --metrics-port (env REGISTRY_METRICS_HOST; default 127.0.0.1)")
    p.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "info"),
                   choices=["debug", "info", "warning", "error"])
    p.add_argument("--secure", action="store_true",
                   help="embedded server with per-role permissions from --auth-dir "
                        "(made on first use); the registry connects as its role")
    p.add_argument("--auth-dir", type=Path, default=Path(os.environ.get("REGISTRY_AUTH_DIR", "./auth")),
                   help="trust material for --secure (env REGISTRY_AUTH_DIR, default ./auth)")
    p.add_argument("--http-port", type=int, default=_env_int("REGISTRY_HTTP_PORT"),
                   help="also serve the HTTP API and dashboard on this port (default off)")
    p.add_argument("--http-host", default=os.environ.get("REGISTRY_HTTP_HOST", "127.0.0.1"),
                   help="address for --http-port (default 127.0.0.1)")
    add_auth_arguments(p)
    p.set_defaults(run=run_up)


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    return int(raw) if raw and raw.isdigit() else None


def add_http(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("http", help="serve the HTTP API, metrics and dashboard (stateless)")
    p.add_argument("--nats", default=os.environ.get("NATS_URL", "nats://127.0.0.1:4222"),
                   help="NATS server or cluster (comma-separated; env NATS_URL)")
    p.add_argument("--host", default=os.environ.get("REGISTRY_HTTP_HOST", "127.0.0.1"),
                   help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=_env_int("REGISTRY_HTTP_PORT") or 8080,
                   help="port (default 8080; 0 picks a free one)")
    p.add_argument("--auth-dir", type=Path, default=os.environ.get("REGISTRY_AUTH_DIR"),
                   help="secured: workers' tokens are checked against this trust material")
    p.add_argument("--allow-open", action="store_true",
                   help="open mode (no tokens) on an address other than loopback")
    p.add_argument("--heartbeat-interval", type=float, default=30.0,
                   help="seconds between an HTTP worker's heartbeats, when its registration "
                        "does not say (default 30, the original plan's client)")
    p.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "info"),
                   choices=["debug", "info", "warning", "error"])
    add_auth_arguments(p)
    p.set_defaults(run=run_http)


def run_http(args: argparse.Namespace) -> int:
    from registry.http.gateway import GatewaySettings
    from registry.http.serve import HttpSettings, OpenToTheWorld, serve_http

    try:
        if not 0 <= args.port <= 65535:
            raise _Usage(f"--port {args.port} is not a port")
        if not 0 < args.heartbeat_interval <= 3600:
            raise _Usage("--heartbeat-interval must be above 0 and at most 3600")
        if args.auth_dir is not None and not Path(args.auth_dir).is_dir():
            raise _Usage(f"--auth-dir {args.auth_dir}: no such directory")
        settings = HttpSettings(
            nats_url=args.nats, host=args.host, port=args.port, auth=auth_from_args(args),
            auth_dir=Path(args.auth_dir) if args.auth_dir else None, allow_open=args.allow_open,
            gateway=GatewaySettings(heartbeat_interval_s=args.heartbeat_interval),
        )  # fmt: skip
        settings.check()
    except (AuthError, _Usage, OpenToTheWorld) as e:
        print(f"registry http: {e}", file=sys.stderr)
        return 2
    logs.configure(args.log_level)

    def ready(url: str) -> None:
        print(url, flush=True)

    with contextlib.suppress(ImportError):  # uvloop: a faster event loop where installed
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        return _run_until_signal(serve_http(settings, on_ready=ready))
    except (OSError, SystemExit, TrustError) as e:
        print(f"registry http: {e}", file=sys.stderr)
        return 1


def settings_from(args: argparse.Namespace) -> RegistrySettings:
    server_config = None
    if getattr(args, "secure", False):
        server_config = _secured(args)
    return RegistrySettings(
        nats_url=args.nats, port=args.port, data_dir=args.data_dir,
        server_config=server_config,
        timeout_floor_s=args.timeout_floor, timeout_factor=args.timeout_factor,
        late_factor=args.late_factor, brake_fraction=args.brake_fraction,
        brake_hold_s=args.brake_hold, brake_release_per_s=args.brake_release_rate,
        outage_grace_s=args.outage_grace,
        retention_s=args.retention, purge_marker_ttl_s=args.purge_marker_ttl,
        replicas=args.replicas, auth=auth_from_args(args),
        instance=args.instance, lease_ttl_s=args.lease_ttl,
        metrics_port=args.metrics_port, metrics_host=args.metrics_host,
    )  # fmt: skip


def _secured(args: argparse.Namespace) -> Path:
    """--secure: the auth directory (made when missing), its server configuration,
    and the registry's own credentials unless others were given."""
    from registry.trust.authdir import AuthDir

    if args.nats:
        raise _Usage("--secure starts a secured embedded server; with --nats, pass --creds")
    if not AuthDir.holds(args.auth_dir):
        AuthDir.init(args.auth_dir)
        print(f"registry: trust material written to {args.auth_dir}/", file=sys.stderr)
    auth = AuthDir(args.auth_dir)
    auth.write_server_config()  # the packaged settings of this version, the latest account
    if not args.creds and not args.nkey:
        args.creds = str(args.auth_dir / "registry.creds")
    print(
        f"registry: secured; mint a worker's credentials with\n"
        f"  registry auth mint --dir {args.auth_dir} --role agent --worker-id ID --out ID.creds",
        file=sys.stderr,
    )
    return Path(args.auth_dir) / "server.conf"


class _Usage(ValueError):
    """Flags that do not go together: exit 2."""


def run_up(args: argparse.Namespace) -> int:
    try:
        settings = settings_from(args)
    except pydantic.ValidationError as e:
        return _bad_args(e)
    except (AuthError, _Usage) as e:
        print(f"registry: {e}", file=sys.stderr)
        return 2
    except TrustError as e:
        print(f"registry: {e}", file=sys.stderr)
        return 1
    if args.http_port is not None and not 0 <= args.http_port <= 65535:
        print(f"registry: --http-port {args.http_port} is not a port", file=sys.stderr)
        return 2
    logs.configure(args.log_level)
    from registry.server.metrics import MetricsError

    try:
        return _run_until_signal(_up(settings, args))
    except (ServerError, ProvisionError, MetricsError) as e:
        print(f"registry: {e}", file=sys.stderr)
        return 1
    except BaseExceptionGroup as group:  # the registry and the gateway ran side by side
        first = group.exceptions[0]
        if isinstance(first, (ServerError, ProvisionError, MetricsError, OSError, SystemExit)):
            print(f"registry: {first}", file=sys.stderr)  # the HTTP port taken, say
            return 1
        raise


async def _up(settings: RegistrySettings, args: argparse.Namespace) -> None:
    """The registry; with --http-port, the gateway beside it once the registry is up.
    Prints the NATS URL, then (with --http-port) the HTTP one."""
    from registry.server.app import Registry, serve

    nats_url: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def ready(url: str) -> None:
        print(url, flush=True)
        if not nats_url.done():
            nats_url.set_result(url)

    if args.http_port is None:
        await serve(settings, on_ready=ready)
        return
    from registry.http.serve import HttpSettings, serve_http

    from registry.server.metrics import collector_registry

    started: asyncio.Future[Registry] = asyncio.get_running_loop().create_future()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(serve(settings, on_ready=ready, on_started=started.set_result),
                       name="registry")  # fmt: skip
        url = await nats_url
        secured = args.auth_dir if getattr(args, "secure", False) else None
        auth = settings.auth
        if secured is not None:  # the registry's role may not speak for workers; admin may
            auth = dataclasses.replace(auth, creds=str(Path(secured) / "admin.creds"))
        http = HttpSettings(nats_url=url, host=args.http_host, port=args.http_port, auth=auth,
                            auth_dir=Path(secured) if secured else None)  # fmt: skip
        metrics = collector_registry(await started)  # the gateway's /metrics shows them too
        tg.create_task(serve_http(http, on_ready=lambda u: print(u, flush=True),
                                  extra_metrics=metrics), name="http")  # fmt: skip


def _run_until_signal(coro: Coroutine[Any, Any, None]) -> int:
    """Run until done or SIGINT/SIGTERM (which cancel it); 0 either way."""

    async def main() -> None:
        task = asyncio.ensure_future(coro)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            pass

    asyncio.run(main())
    return 0


def _bad_args(e: pydantic.ValidationError) -> int:
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    print(f"registry: invalid {where}: {err['msg']}", file=sys.stderr)
    return 2


def add_check(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("check", help="exit 0 when connected, provisioned, caught up and answering")
    p.add_argument("--nats", default=os.environ.get("NATS_URL", "nats://127.0.0.1:4222"))
    p.add_argument("--max-lag", type=int, default=1000,
                   help="most events the projector may be behind (default 1000)")
    p.add_argument("--timeout", type=float, default=2.0, help="seconds per step (default 2)")
    add_auth_arguments(p)
    p.set_defaults(run=run_check)


def run_check(args: argparse.Namespace) -> int:
    from registry.ops.check import Unhealthy, check

    try:
        auth = auth_from_args(args)
    except AuthError as e:
        print(f"registry check: {e}", file=sys.stderr)
        return 2
    try:
        print(asyncio.run(check(args.nats, args.max_lag, args.timeout, auth=auth)))
    except Unhealthy as e:
        print(f"registry check: {e}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="registry", description="Event-sourced worker registry over NATS JetStream"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    add_up(sub)
    add_http(sub)
    add_check(sub)
    add_commands(sub)
    add_auth(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.run(args)
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
