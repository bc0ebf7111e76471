"""`agent run` and `agent probe`: parse, validate into settings, call the agent.

Every flag falls back to an environment variable (`NATS_URL`, `AGENT_*`). Bad
input is one line on stderr and exit code 2, before anything connects.
Exit codes: 0 clean shutdown, 1 crash or refused registration, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, NoReturn, TextIO

import msgspec
import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agent.agent import Agent, AgentError
from agent.probe import Prober
from agent.settings import AgentSettings, describe, existing_path
from registry import protocol
from registry.connect import AUTH_OPTIONS

log = structlog.get_logger("agent.cli")

# settings field -> (flag, environment variable)
OPTIONS: dict[str, tuple[str, str]] = {
    "nats_url": ("--nats", "NATS_URL"),
    "name": ("--name", "AGENT_NAME"),
    "capability": ("--capability", "AGENT_CAPABILITY"),
    "worker_id": ("--worker-id", "AGENT_WORKER_ID"),
    "max_concurrent_tasks": ("--max-tasks", "AGENT_MAX_TASKS"),
    "content_types": ("--content-types", "AGENT_CONTENT_TYPES"),
    "tags": ("--tag", "AGENT_TAGS"),
    "heartbeat_interval_s": ("--heartbeat-interval", "AGENT_HEARTBEAT_INTERVAL"),
    "disk_path": ("--disk-path", "AGENT_DISK_PATH"),
    "port": ("--port", "AGENT_PORT"),
    **{field: (flag, env) for field, (flag, env, _) in AUTH_OPTIONS.items()},
}
HELP: dict[str, str] = {
    "nats_url": "server URL; comma-separate several (default nats://127.0.0.1:4222)",
    "max_concurrent_tasks": "tasks this worker runs at once (default 1)",
    "port": "the worker's service port, reported in its location (default 8000)",
    "capability": "gpu, cpu or hybrid (default: gpu when a GPU is found, else cpu)",
    "worker_id": "stable id (default: derived from --name and the hostname)",
    "content_types": "comma-separated (default: the capability's types)",
    "tags": "key=value, repeatable",
    "heartbeat_interval_s": "seconds between heartbeats (default 5)",
    "disk_path": "path whose filesystem the worker uses (default .)",
    **{field: text for field, (_, _, text) in AUTH_OPTIONS.items()},
}
RUN_FIELDS = tuple(OPTIONS)
PROBE_FIELDS = ("disk_path", "port")
LOG_LEVELS = ("debug", "info", "warning", "error")


class UsageError(Exception):
    """Bad command-line input; the message is one line for people."""


class ProbeSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    disk_path: str = "."
    port: int = Field(default=8000, ge=0, le=65535)

    @field_validator("disk_path")
    @classmethod
    def _existing_path(cls, value: str) -> str:
        return existing_path(value)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="agent", description="Worker agent for the worker registry.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("run", help="register this machine and keep it beating")
    probe = commands.add_parser("probe", help="print the detected hardware as JSON (no NATS)")
    commands.add_parser("simulate", help="run a fleet of simulated workers (agent simulate -h)")
    for field in RUN_FIELDS:
        _add_option(run, field)
    for field in PROBE_FIELDS:
        _add_option(probe, field)
    for sub in (run, probe):
        sub.add_argument("--log-level", choices=LOG_LEVELS, help="(env AGENT_LOG_LEVEL, LOG_LEVEL)")
    run.add_argument("--exit-when-drained", action="store_true", default=None,
                     help="unregister and exit 0 once an operator drained this worker "
                          "(registry drain ID) and no task runs (env AGENT_EXIT_WHEN_DRAINED=1)")  # fmt: skip
    return parser


def _add_option(parser: argparse.ArgumentParser, field: str) -> None:
    flag, env = OPTIONS[field]
    action = "append" if field == "tags" else "store"
    metavar = flag.removeprefix("--").upper().replace("-", "_")
    help_text = f"{HELP.get(field, '')} (env {env})".lstrip()
    parser.add_argument(flag, dest=field, action=action, metavar=metavar, help=help_text)


class Parsed(NamedTuple):
    settings: BaseModel
    level: str
    exit_when_drained: bool = False


def parse(argv: Sequence[str] | None, environ: Mapping[str, str]) -> tuple[BaseModel, str]:
    """argv + environment -> (validated settings, log level), or UsageError."""
    parsed = parse_command(argv, environ)
    return parsed.settings, parsed.level


def parse_command(argv: Sequence[str] | None, environ: Mapping[str, str]) -> Parsed:
    """argv + environment -> settings, log level and `run`'s own flags, or UsageError."""
    args = vars(build_parser().parse_args(argv))
    command = args.pop("command")
    exit_when_drained = args.pop("exit_when_drained", None)
    if exit_when_drained is None and command == "run":
        exit_when_drained = _env_flag(environ, "AGENT_EXIT_WHEN_DRAINED")
    level = (args.pop("log_level") or _env_level(environ)).lower()
    if level not in LOG_LEVELS:
        raise UsageError(f"invalid AGENT_LOG_LEVEL {level!r}: use one of {', '.join(LOG_LEVELS)}")
    raw = {field: _value(field, value, environ) for field, value in args.items()}
    model: type[BaseModel] = AgentSettings if command == "run" else ProbeSettings
    try:
        settings = model.model_validate({k: v for k, v in raw.items() if v is not None})
    except ValidationError as e:
        raise UsageError(describe(e, OPTIONS)) from None
    return Parsed(settings, level, bool(exit_when_drained) and command == "run")


def _env_flag(environ: Mapping[str, str], name: str) -> bool:
    value = environ.get(name, "").strip().lower()
    if value in ("", "0", "false", "no"):
        return False
    if value in ("1", "true", "yes"):
        return True
    raise UsageError(f"invalid {name} {environ[name]!r}: use 1 or 0")


def _env_level(environ: Mapping[str, str]) -> str:
    return environ.get("AGENT_LOG_LEVEL") or environ.get("LOG_LEVEL") or "info"


def _value(field: str, value: Any, environ: Mapping[str, str]) -> Any:
    return value if value is not None else environ.get(OPTIONS[field][1]) or None


# ---------------------------------------------------------------- logging


def configure_logging(level: str, stream: TextIO = sys.stderr) -> None:
    """Pretty in a terminal, one JSON object per line otherwise; once, here."""
    tty = stream.isatty()
    renderer: Any = structlog.dev.ConsoleRenderer() if tty else structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            *([] if tty else [structlog.processors.dict_tracebacks]),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )


# ---------------------------------------------------------------- commands


def probe_command(settings: ProbeSettings) -> int:
    prober = Prober(settings.disk_path)
    try:
        time.sleep(0.25)  # cpu_percent measures from the prober's start
        report = {
            "hardware": prober.hardware(),
            "location": prober.location(settings.port),
            "metrics": prober.usage(),
        }
    finally:
        prober.close()
    sys.stdout.write(msgspec.json.format(protocol.encode(report), indent=2).decode() + "\n")
    return 0


async def serve(settings: AgentSettings, exit_when_drained: bool = False) -> None:
    """Run the agent until cancelled (or, with `exit_when_drained`, until an operator's
    drain finds it idle); leaving the block unregisters."""
    async with Agent.from_settings(settings) as agent:
        log.info("agent_running", worker_id=agent.worker_id, incarnation=agent.incarnation)
        if exit_when_drained:
            drained = asyncio.ensure_future(agent.drained())
            ended = asyncio.ensure_future(agent.wait())
            try:
                await asyncio.wait({ended, drained}, return_when=asyncio.FIRST_COMPLETED)
            except BaseException:  # a signal: both go
                ended.cancel()
                raise
            finally:
                drained.cancel()
            if not ended.done():
                ended.cancel()
                log.info("agent_drained", reason=agent.drain_reason)
                await agent.stop(reason="drained")
                return
        await agent.wait()  # until cancelled, or the agent ends by itself (AgentError)
        raise AgentError("the agent stopped by itself")


async def run_until_signal(settings: AgentSettings, exit_when_drained: bool = False) -> int:
    """`serve` until SIGINT/SIGTERM; a signal is a clean shutdown (0), and so is a drain
    with `exit_when_drained`."""
    loop = asyncio.get_running_loop()
    serving = asyncio.create_task(serve(settings, exit_when_drained), name="agent")
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, _on_signal, serving, sig)
    try:
        await serving
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
    except AgentError as e:
        log.error("agent_failed", error=str(e))
        return 1
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
    return 0


def _on_signal(serving: asyncio.Task[None], sig: signal.Signals) -> None:
    log.info("signal_received", signal=sig.name)
    serving.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["simulate"]:
        from agent import simulate  # its own parser: the fleet has flags of its own

        return simulate.main(args[1:])
    try:
        settings, level, exit_when_drained = parse_command(argv, os.environ)
    except UsageError as e:
        print(f"agent: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    configure_logging(level)
    if isinstance(settings, ProbeSettings):
        return probe_command(settings)
    assert isinstance(settings, AgentSettings)
    return asyncio.run(run_until_signal(settings, exit_when_drained))
