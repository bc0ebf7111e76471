"""`agent simulate`'s command line: flags, else environment variables, then run."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from typing import Any, Final, NoReturn

import nats.errors
from pydantic import ValidationError

from agent.settings import describe
from agent.simulate.run import run_until_signal
from agent.simulate.settings import SimSettings
from registry import logs
from registry.connect import AUTH_OPTIONS
from registry.protocol import encode

# settings field -> (flag, environment variable)
OPTIONS: Final = {
    "nats_url": ("--nats", "NATS_URL"),
    "count": ("--count", "SIM_COUNT"),
    "heartbeat_interval_s": ("--heartbeat-interval", "SIM_HEARTBEAT_INTERVAL"),
    "churn": ("--churn", "SIM_CHURN"),
    "duration_s": ("--duration", "SIM_DURATION"),
    "seed": ("--seed", "SIM_SEED"),
    "id_prefix": ("--id-prefix", "SIM_ID_PREFIX"),
    "ramp_s": ("--ramp", "SIM_RAMP"),
    "kill": ("--kill", "SIM_KILL"),
    "kill_after_s": ("--kill-after", "SIM_KILL_AFTER"),
    "kill_within_s": ("--kill-within", "SIM_KILL_WITHIN"),
    "window": ("--window", "SIM_WINDOW"),
    **{field: (flag, env) for field, (flag, env, _) in AUTH_OPTIONS.items()},
}
_HELP: Final = {
    "nats_url": "NATS server URL(s), comma-separated (default nats://127.0.0.1:4222)",
    "count": "number of simulated workers (default 200)",
    "heartbeat_interval_s": "seconds between a worker's heartbeats (default 5)",
    "churn": "fraction of the fleet per minute that restarts or dies silently (default 0)",
    "duration_s": "stop after this many seconds (default: until SIGINT/SIGTERM)",
    "seed": "seed for the fleet's make-up and behaviour (default: random)",
    "id_prefix": "worker ids are PREFIX-<n> (default sim)",
    "ramp_s": "spread the registrations over this many seconds (default 0: at once)",
    "kill": "this many workers die silently for good, at random moments (default 0)",
    "kill_after_s": "the kills start this many seconds after registering (default 0)",
    "kill_within_s": "...and are spread over this many seconds (default 10)",
    "window": "most publishes awaiting their PubAck (default 4096)",
    **{field: text for field, (_, _, text) in AUTH_OPTIONS.items()},
}
LOG_LEVELS: Final = ("debug", "info", "warning", "error")


class UsageError(Exception):
    """Bad command-line input; the message is one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def add_arguments(p: argparse.ArgumentParser) -> None:
    for field, (flag, env) in OPTIONS.items():
        p.add_argument(flag, dest=field, help=f"{_HELP[field]} (env {env})")
    p.add_argument(
        "--no-unregister",
        action="store_true",
        help="leave without unregistering (the registry expires the fleet)",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--log-level", choices=LOG_LEVELS, help="(env LOG_LEVEL, default info)")


def settings_from(args: argparse.Namespace, environ: dict[str, str] | None = None) -> SimSettings:
    """Flags, else environment variables, validated; UsageError names the flag."""
    env = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    for field, (_, var) in OPTIONS.items():
        value = getattr(args, field, None)
        if value is None:
            value = env.get(var) or None
        if value is not None:
            raw[field] = value
    raw["unregister"] = not getattr(args, "no_unregister", False)
    try:
        return SimSettings.model_validate(raw)
    except ValidationError as e:
        raise UsageError(describe(e, OPTIONS)) from None


def run_command(args: argparse.Namespace) -> int:
    """Run from parsed arguments: 0 after a clean stop, 1 if NATS fails, 2 on bad input."""
    try:
        settings = settings_from(args)
    except UsageError as e:
        print(f"agent simulate: {e}", file=sys.stderr)
        return 2
    logs.configure(args.log_level or os.environ.get("LOG_LEVEL") or "info")
    try:
        report = asyncio.run(run_until_signal(settings))
    except (OSError, TimeoutError, nats.errors.Error) as e:
        why = "not reachable within 10 s" if isinstance(e, TimeoutError) else str(e)
        print(f"agent simulate: cannot use NATS at {settings.nats_url}: {why}", file=sys.stderr)
        return 1
    print(encode(report).decode() if args.json else report.line(), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(prog="agent simulate", description="Run a fleet of simulated workers.")
    add_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        print(f"agent simulate: {e}", file=sys.stderr)
        return 2
    return run_command(args)
