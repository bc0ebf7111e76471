"""Times people type (`1h`, `90s`, RFC 3339) and ages people read (`3s`, `2m`). PURE.

No clock: callers pass `now`, so tests pass numbers instead of sleeping.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Final

_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_MAX_SECONDS: Final = 100 * 365 * 86400.0
_PART: Final = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_DURATION: Final = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h|d|w))+")
_CLOCK: Final = re.compile(r"([01]?\d|2[0-3]):([0-5]\d)(?::([0-5]\d))?")


class TimeParseError(ValueError):
    """A time or range that cannot be understood; the message is one line for people."""


def parse_duration(text: str) -> float:
    """`90s`, `15m`, `1h30m`, `2d`, `500ms` or plain seconds (`90`) -> seconds."""
    s = text.strip()
    try:
        seconds = float(s)
    except ValueError:
        if not _DURATION.fullmatch(s):
            raise TimeParseError(
                f"invalid duration {text!r}: use e.g. 90s, 15m, 1h30m, 2d"
            ) from None
        seconds = sum(float(n) * _UNITS[u] for n, u in _PART.findall(s))
    if not math.isfinite(seconds) or not 0 <= seconds <= _MAX_SECONDS:
        raise TimeParseError(f"invalid duration {text!r}: must be between 0 and 100 years")
    return seconds


def parse_instant(text: str) -> datetime:
    """An RFC 3339 timestamp (`2024-05-01T12:00:00Z`) -> an aware UTC datetime."""
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise TimeParseError(
            f"invalid time {text!r}: use RFC 3339 (2024-05-01T12:00:00Z) or an age (1h, 30m)"
        ) from None
    if when.tzinfo is None:
        raise TimeParseError(f"time {text!r} has no timezone: add Z or an offset like +02:00")
    return when.astimezone(UTC)


def parse_when(text: str, now: datetime) -> datetime:
    """An age before `now` (`1h` = one hour ago) or an RFC 3339 timestamp."""
    try:
        return now - timedelta(seconds=parse_duration(text))
    except TimeParseError:
        return parse_instant(text)


def parse_at(text: str, now: datetime, local: tzinfo | None = None) -> datetime:
    """A moment in the past: an age (`10m` ago), RFC 3339, or with `local` a wall-clock
    time `HH:MM[:SS]` in that zone, the latest one not after `now` (today's, or
    yesterday's when today's is still to come). A moment after `now` is an error."""
    clock = _CLOCK.fullmatch(text.strip()) if local is not None else None
    if clock is not None:
        hour, minute, second = (int(g or 0) for g in clock.groups())
        today = now.astimezone(local).replace(hour=hour, minute=minute, second=second,
                                              microsecond=0)  # fmt: skip
        when = today if today <= now else today - timedelta(days=1)
        return when.astimezone(UTC)
    try:
        when = parse_when(text, now)
    except TimeParseError as e:
        if local is None or not str(e).startswith("invalid time"):
            raise
        raise TimeParseError(f"{e}, or a time of day (14:05)") from None
    if when > now:
        raise TimeParseError(
            f"time {format_instant(when)} is in the future (now {format_instant(now)})"
        )
    return when


def parse_range(
    since: str | None, until: str | None, now: datetime
) -> tuple[datetime | None, datetime | None]:
    """Both ends of a window; `since` after `until` is an error."""
    start = parse_when(since, now) if since else None
    end = parse_when(until, now) if until else None
    if start is not None and end is not None and start > end:
        start_s, end_s = format_instant(start), format_instant(end)
        raise TimeParseError(f"bad time range: --since {start_s} is after --until {end_s}")
    return start, end


def format_instant(when: datetime) -> str:
    """RFC 3339 in UTC with milliseconds: `2024-05-01T12:00:00.123Z`."""
    return when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def format_age(seconds: float) -> str:
    """How long ago, kubectl style: `0s`, `42s`, `3m`, `5h`, `2d`; `-` for the future."""
    if seconds < -1.0:
        return "-"
    s = max(0, int(seconds))
    if s < 120:
        return f"{s}s"
    if s < 2 * 3600:
        return f"{s // 60}m"
    if s < 2 * 86400:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def format_seconds(seconds: float) -> str:
    """A duration for sentences: `15s`, `1.5s`, `2m30s`, `3h`."""
    if seconds < 60:
        return f"{seconds:g}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs}s" if secs else f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes}m" if minutes else f"{hours}h"
