"""Bad input, fuzzed: over 10,000 hostile events against ONE running registry.

Hypothesis generates the cases (random bytes, truncated and deeply nested
JSON, invalid UTF-8, wrong types, NaN/Infinity tokens and 1e999, negative
counters, out-of-range values, unknown schema versions, ids that differ from
the subject's, subject ids that are not ids, missing fields, oversized bodies,
hostile JetStream headers and reused Nats-Msg-Ids); they are published in
batches, interleaved with valid heartbeats of registered workers, to one
registry (in this process) on one server. Each case is bad *by construction*,
from the wire contract, not by asking the registry's own decoder. The PubAck
says whether the stream stored it. Then:

- every stored bad event is counted as rejected exactly once, and nothing else is;
- every stored valid event is applied (the bucket holds each worker's last
  counter, and `version` counts exactly its stored valid events);
- the projector never resyncs, and is current within seconds of the last publish;
- the registry's memory stays bounded.

The other tests show what the stream itself refuses: unknown event kinds (no
stream captures them), roll-ups, per-message TTLs, message deletes and purges.
"""

from __future__ import annotations

import asyncio
import gc
import json
import random
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any

import nats.errors
import nats.js.errors
import psutil
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client
from nats.js import JetStreamContext

from registry.server.app import Registry
from registry.server.embedded import NatsServer
from registry.server.provision import api, provision
from tests.conftest import eventually
from tests.integration.registry_helpers import (
    EVENTS,
    bounded,
    bucket_records,
    heartbeat_body,
    new_incarnation,
    publish,
    register_body,
    running_registry,
    unregister_body,
)

BAD_CASES = 10_500
OVERSIZED = 24
BATCH = 400
WORKERS = [f"fz-{i:02d}" for i in range(16)]
MAX_EVENT_BYTES = 64 * 1024  # README: a body over 64 KiB is rejected
MAX_MSG_BYTES = 1024 * 1024  # nats/streams/WORKER_EVENTS.json max_msg_size, server max_payload
RSS_GROWTH_LIMIT = 16 * 2**20


@dataclass(frozen=True)
class Case:
    """One publish: subject kind and id, raw body, extra headers; bad or valid."""

    what: str
    kind: str
    wid: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    reuse_msg_id: bool = False


# ---------------------------------------------------------------- strategies

ID_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"
ids = st.text(ID_CHARS, min_size=1, max_size=24)
targets = st.one_of(st.sampled_from(WORKERS), ids)
# subject tokens that are not worker ids: no '.', '*', '>' or whitespace (those
# are no NATS subject token at all), too long, or characters outside the id set
not_ids = st.one_of(
    st.text(st.sampled_from("!@#$%^&()+=~'\",;:?/\\|[]{}éüß中ж☃"), min_size=1, max_size=12).map(
        lambda s: "w" + s
    ),
    st.integers(129, 300).map(lambda n: "a" * n),
)
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20),
)  # fmt: skip
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)  # fmt: skip
extras = st.dictionaries(st.text("abcdefgh", min_size=1, max_size=8).map(lambda k: "x_" + k),
                         json_values, max_size=3)  # fmt: skip
percent = st.floats(0.0, 100.0)
active = st.integers(0, 1_000_000)  # docs/wire.md, "Bounds"
count = st.integers(0, 10**12)
statuses = st.sampled_from(["online", "offline", "busy", "error", "maintenance"])
sent_ats = st.datetimes(timezones=st.just(UTC)).map(lambda d: d.isoformat())


valid_metrics = st.builds(
    lambda fields, more: {**fields, **more},
    st.fixed_dictionaries({
        "cpu_usage_percent": percent, "memory_usage_percent": percent, "gpu_usage_percent": percent,
        "active_tasks": active, "failed_tasks": count, "avg_task_duration_seconds": st.floats(0.0, 1e9),
    }),
    extras,
)  # fmt: skip
# everything of a valid heartbeat but ids and completed_tasks (set when it is sent)
valid_heartbeat_parts = st.builds(
    lambda status, sent_at, metrics, more: {"status": status, "sent_at": sent_at, "metrics": metrics, **more},
    statuses, sent_ats, valid_metrics, extras,
)


def _hb(wid: str) -> dict[str, Any]:
    return heartbeat_body(wid, new_incarnation())


def _reg(wid: str) -> dict[str, Any]:
    return register_body(wid, new_incarnation())


def _set(body: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    body = json.loads(json.dumps(body))
    node = body
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return body


def _drop(body: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    body = json.loads(json.dumps(body))
    node = body
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return body


def _raw(body: dict[str, Any], path: tuple[str, ...], token: bytes) -> bytes:
    """The body with the JSON text `token` at `path` (NaN, 1e999, invalid UTF-8...)."""
    marker = "@@" + secrets.token_hex(4) + "@@"
    return json.dumps(_set(body, path, marker)).encode().replace(f'"{marker}"'.encode(), token)


# (kind, path, type expected there): wrong types are drawn from the others
HB_FIELDS = [
    (("worker_id",), "str"), (("incarnation",), "str"), (("sent_at",), "time"),
    (("status",), "str"), (("metrics",), "object"), (("v",), "int"),
    (("metrics", "cpu_usage_percent"), "float"), (("metrics", "memory_usage_percent"), "float"),
    (("metrics", "gpu_usage_percent"), "float"), (("metrics", "active_tasks"), "int"),
    (("metrics", "completed_tasks"), "int"), (("metrics", "failed_tasks"), "int"),
    (("metrics", "avg_task_duration_seconds"), "float"),
]  # fmt: skip
REG_FIELDS = [
    (("heartbeat_interval_s",), "float"), (("registration",), "object"),
    (("registration", "name"), "str"), (("registration", "capability"), "str"),
    (("registration", "max_concurrent_tasks"), "int"), (("registration", "hardware"), "object"),
    (("registration", "hardware", "cpu_cores"), "int"), (("registration", "hardware", "memory_gb"), "float"),
    (("registration", "hardware", "gpu_models"), "list"), (("registration", "location"), "object"),
    (("registration", "location", "port"), "int"), (("registration", "supported_content_types"), "list"),
    (("registration", "tags"), "object"),
]  # fmt: skip
WRONG = {
    "str": st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(), st.none(), st.lists(st.integers(), max_size=2)),
    "time": st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(), st.none(), st.just("yesterday"), st.just("2024-13-45T99:99:99Z")),
    "int": st.one_of(st.floats(allow_nan=False).filter(lambda f: not f.is_integer()), st.just(1.0), st.booleans(), st.none(), st.text(max_size=5), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)),
    "float": st.one_of(st.booleans(), st.none(), st.text(max_size=5), st.lists(st.floats(allow_nan=False), max_size=2)),
    "object": st.one_of(st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=3), st.booleans(), st.none()),
    "list": st.one_of(st.integers(), st.text(max_size=5), st.booleans(), st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2)),
}  # fmt: skip
NUMERIC = [(k, p) for k, fields in (("heartbeat", HB_FIELDS), ("register", REG_FIELDS))
           for p, t in fields if t in ("int", "float")]  # fmt: skip


def _body(kind: str, wid: str) -> dict[str, Any]:
    if kind == "unregister":
        return unregister_body(wid, new_incarnation())
    return _reg(wid) if kind == "register" else _hb(wid)


def _case(what: str) -> Callable[..., Case]:
    def make(kind: str, wid: str, data: bytes) -> Case:
        return Case(what, kind, wid, data)

    return make


def _truncated(kind: str, wid: str, fraction: float) -> Case:
    data = json.dumps(_body(kind, wid)).encode()
    return Case("truncated json", kind, wid, data[: int(fraction * (len(data) - 1))])


def _nested(wid: str, depth: int, brackets: tuple[str, str], whole: bool) -> Case:
    deep = (brackets[0] * depth + "1" + brackets[1] * depth).encode()
    data = deep if whole else _raw(_hb(wid), ("metrics",), deep)  # where an object belongs
    return Case("deeply nested json", "heartbeat", wid, data)


def _utf8(bad: bytes, wid: str, where: tuple[str, tuple[str, ...]]) -> Case:
    kind, path = where
    return Case("invalid utf-8", kind, wid, _raw(_body(kind, wid), path, b'"x' + bad + b'y"'))


def _replaced(what: str) -> Callable[..., Case]:
    def make(wid: str, where: tuple[str, tuple[str, ...], Any]) -> Case:
        kind, path, value = where
        label = "negative counter" if what == "out of range" and isinstance(value, int) and value < 0 else what
        return Case(label, kind, wid, json.dumps(_set(_body(kind, wid), path, value)).encode())

    return make


def _token(wid: str, where: tuple[str, tuple[str, ...]], token: bytes) -> Case:
    kind, path = where
    return Case("nan/infinity", kind, wid, _raw(_body(kind, wid), path, token))


def _mismatched(wid: str, other: str, register: bool) -> Case:
    other = other if other != wid else other + "x"
    if not register:
        return Case("id != subject id", "heartbeat", wid, json.dumps(_hb(other)).encode())
    body = _set(_reg(wid), ("registration", "worker_id"), other)
    return Case("id != subject id", "register", wid, json.dumps(body).encode())


def _missing(wid: str, where: tuple[str, tuple[str, ...]]) -> Case:
    kind, path = where
    return Case("missing field", kind, wid, json.dumps(_drop(_body(kind, wid), path)).encode())


def _hostile(case: Case, roll: int, headers: dict[str, str]) -> Case:
    if roll < 12:
        return Case(case.what, case.kind, case.wid, case.body, headers)
    if roll < 16:
        return Case(case.what, case.kind, case.wid, case.body, reuse_msg_id=True)
    return case


def _oversized(wid: str, size: int) -> Case:
    body = json.dumps({**_hb(wid), "x_padding": ""}).encode()
    return Case("oversized", "heartbeat", wid, body[:-2] + b"x" * (size - len(body)) + b'"}')


KINDS = st.sampled_from(["heartbeat", "register", "unregister"])
UTF8_SPOTS = [
    ("heartbeat", ("status",)), ("heartbeat", ("incarnation",)), ("unregister", ("reason",)),
    ("register", ("registration", "name")), ("register", ("registration", "tags", "zone")),
]  # fmt: skip
WRONG_TYPED = st.one_of(
    [st.tuples(st.just(kind), st.just(path), WRONG[expected])
     for kind, fields in (("heartbeat", HB_FIELDS), ("register", REG_FIELDS)) for path, expected in fields]
)  # fmt: skip
OUT_OF_RANGE = st.one_of(
    st.tuples(st.just("heartbeat"), st.sampled_from([("metrics", "active_tasks"), ("metrics", "completed_tasks"),
              ("metrics", "failed_tasks")]), st.integers(max_value=-1)),
    st.tuples(st.just("heartbeat"), st.sampled_from([("metrics", "cpu_usage_percent"), ("metrics", "memory_usage_percent"),
              ("metrics", "gpu_usage_percent")]),
              st.floats(100.0, exclude_min=True, allow_infinity=False) | st.floats(max_value=0.0, exclude_max=True, allow_infinity=False)),
    st.tuples(st.just("heartbeat"), st.just(("metrics", "completed_tasks")), st.integers(10**12 + 1, 2**64)),
    st.tuples(st.just("heartbeat"), st.just(("metrics", "active_tasks")), st.integers(1_000_001, 2**64)),
    st.tuples(st.just("register"), st.just(("heartbeat_interval_s",)),
              st.floats(max_value=0.0, allow_infinity=False) | st.floats(3600.0, exclude_min=True, allow_infinity=False)),
    st.tuples(st.just("register"), st.just(("registration", "max_concurrent_tasks")), st.integers(max_value=0) | st.integers(4097)),
    st.tuples(st.just("register"), st.just(("registration", "hardware", "cpu_cores")), st.integers(max_value=-1) | st.integers(65537)),
    st.tuples(st.just("register"), st.just(("registration", "hardware", "memory_gb")), st.floats(2.0**30, exclude_min=True, allow_infinity=False)),
    st.tuples(st.just("register"), st.just(("registration", "location", "port")), st.integers(65536) | st.integers(max_value=-1)),
)  # fmt: skip
VERSIONS = st.tuples(st.just("heartbeat"), st.just(("v",)),
                     st.one_of(st.integers().filter(lambda n: n != 1), st.just("1"), st.just(1.5), st.none()))  # fmt: skip
MISSING = st.sampled_from([
    ("heartbeat", ("worker_id",)), ("heartbeat", ("incarnation",)), ("heartbeat", ("sent_at",)),
    ("heartbeat", ("status",)), ("heartbeat", ("metrics",)), ("heartbeat", ("metrics", "cpu_usage_percent")),
    ("register", ("registration",)), ("register", ("heartbeat_interval_s",)),
    ("register", ("registration", "capability")), ("register", ("registration", "hardware", "cpu_cores")),
    ("register", ("registration", "location", "ip_address")),
])  # fmt: skip
TOKENS = st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999", b"nan", b"inf"])
INVALID_UTF8 = st.sampled_from([b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe2\x82", b"\xf8\x88\x80\x80\x80", b"\x80"])

bad_bodies = st.one_of(
    st.builds(_case("random bytes"), KINDS | st.just("expired"), targets, st.binary(max_size=400)),
    st.builds(_truncated, KINDS, targets, st.floats(0.0, 1.0)),
    st.builds(_nested, targets, st.integers(2, 40_000), st.sampled_from([("[", "]"), ('{"a":', "}")]), st.booleans()),
    st.builds(_utf8, INVALID_UTF8, st.sampled_from(WORKERS), st.sampled_from(UTF8_SPOTS)),
    st.builds(_replaced("wrong type"), targets, WRONG_TYPED),
    st.builds(_token, targets, st.sampled_from(NUMERIC), TOKENS),
    st.builds(_replaced("out of range"), targets, OUT_OF_RANGE),
    st.builds(_replaced("unknown version"), targets, VERSIONS),
    st.builds(_mismatched, st.sampled_from(WORKERS), ids, st.booleans()),
    st.builds(lambda wid, kind: Case("subject id not an id", kind, wid, json.dumps(_hb(wid)).encode()),
              not_ids, st.sampled_from(["heartbeat", "register"])),
    st.builds(_missing, targets, MISSING),
)  # fmt: skip
hostile_headers = st.one_of(
    st.fixed_dictionaries({"Nats-Rollup": st.sampled_from(["sub", "all", "everything"])}),
    st.fixed_dictionaries({"Nats-TTL": st.sampled_from(["1s", "never", "0", "-1", "99999h"])}),
    st.fixed_dictionaries({"Nats-Expected-Stream": st.sampled_from([EVENTS, "KV_workers", "OTHER"])}),
    st.fixed_dictionaries({"Nats-Expected-Last-Sequence": st.integers(0, 10**6).map(str)}),
    st.fixed_dictionaries({"Nats-Expected-Last-Subject-Sequence": st.integers(0, 10**6).map(str)}),
    st.fixed_dictionaries({"Nats-Expected-Last-Msg-Id": st.text("abcdef0123456789", min_size=1, max_size=32)}),
    st.fixed_dictionaries({"X-Anything": st.text("abcxyz", min_size=1, max_size=8)}),
)
bad_cases = st.builds(_hostile, bad_bodies, st.integers(0, 99), hostile_headers)
oversized = st.builds(_oversized, st.sampled_from(WORKERS), st.integers(MAX_EVENT_BYTES + 1, MAX_MSG_BYTES + 4096))


def collect(strategy: st.SearchStrategy[Any], n: int, per_example: int = 10) -> list[Any]:
    """`n` examples of `strategy` (drawn `per_example` at a time: Hypothesis's own
    cost is per example), the same ones on every run (derandomized)."""
    out: list[Any] = []

    @settings(max_examples=-(-n // per_example), database=None, derandomize=True, deadline=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(st.lists(strategy, min_size=per_example, max_size=per_example))
    def gather(examples: list[Any]) -> None:
        out.extend(examples)

    gather()
    return out[:n]


# ---------------------------------------------------------------- publishing and accounting


@dataclass
class Tally:
    stored_bad: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0
    stored_valid: Counter[str] = field(default_factory=Counter)  # per worker
    last_valid: dict[str, tuple[int, int]] = field(default_factory=dict)  # wid -> (seq, completed)
    msg_ids: list[str] = field(default_factory=list)


class Feeder:
    """Publishes cases and valid heartbeats in pipelined batches; counts what was stored."""

    def __init__(self, js: JetStreamContext, incarnations: dict[str, str], templates: list[dict[str, Any]]) -> None:
        self.js, self.incarnations, self.templates = js, incarnations, templates
        self.rng = random.Random(6)
        self.tally = Tally()
        self.completed = dict.fromkeys(incarnations, 0)
        self._pending: list[tuple[asyncio.Future[Any] | None, Case, int, Exception | None]] = []

    def valid(self) -> tuple[Case, int]:
        wid = self.rng.choice(list(self.incarnations))
        self.completed[wid] += 1
        body = {**self.rng.choice(self.templates), "v": 1, "worker_id": wid, "incarnation": self.incarnations[wid]}
        body["metrics"] = {**body["metrics"], "completed_tasks": self.completed[wid]}
        headers = {"Nats-Expected-Stream": EVENTS} if self.rng.random() < 0.05 else {}
        return Case("valid", "heartbeat", wid, json.dumps(body).encode(), headers), self.completed[wid]

    async def send(self, case: Case, completed: int = 0) -> None:
        reused = case.reuse_msg_id and self.tally.msg_ids
        msg_id = self.rng.choice(self.tally.msg_ids) if reused else secrets.token_hex(16)
        self.tally.msg_ids.append(msg_id)
        headers = {"Nats-Msg-Id": msg_id, **case.headers}
        subject = f"worker.{case.kind}.{case.wid}"
        if case.headers or len(case.body) > MAX_EVENT_BYTES:
            # may be refused: nats-py 2.16's publish_async never resolves a future
            # whose answer is an API error (its reply handler raises), so wait here
            self._pending.append(await self._publish(subject, case, completed, headers))
            return
        try:
            fut = await self.js.publish_async(subject, case.body, headers=headers)
        except nats.errors.Error as e:
            self._pending.append((None, case, completed, e))
            return
        self._pending.append((fut, case, completed, None))

    async def _publish(self, subject: str, case: Case, completed: int, headers: dict[str, str]) -> Any:
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        try:
            done.set_result(await self.js.publish(subject, case.body, timeout=10.0, headers=headers))
        except (nats.errors.Error, ValueError) as e:  # refused by the stream, or over max_payload
            return (None, case, completed, e)
        return (done, case, completed, None)

    async def flush(self) -> None:
        for fut, case, completed, error in self._pending:
            ack = None
            if fut is not None:
                try:
                    ack = await asyncio.wait_for(fut, 10.0)
                except nats.js.errors.Error as e:
                    error = e
            self._count(case, case.wid, completed, ack, error)
        self._pending.clear()

    def _count(self, case: Case, wid: str, completed: int, ack: Any, error: Exception | None) -> None:
        t = self.tally
        if ack is None:
            t.refused[case.what] += 1
        elif ack.duplicate:
            t.duplicates += 1
        elif case.what == "valid":
            t.stored_valid[wid] += 1
            t.last_valid[wid] = (ack.seq, completed)
        else:
            t.stored_bad[case.what] += 1


def rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


async def _current(js: JetStreamContext, registry: Registry) -> bool:
    last = (await js.stream_info(EVENTS)).state.last_seq
    return registry.counters()["last_seq"] >= last


@bounded(120)
async def test_fuzzed_bad_events_are_each_rejected_once_and_valid_ones_applied(
    nats_server: NatsServer, nc: Client
) -> None:
    js = nc.jetstream()
    started = time.monotonic()
    cases = collect(bad_cases, BAD_CASES) + collect(oversized, OVERSIZED, per_example=1)
    cases += [_oversized(WORKERS[0], n) for n in (MAX_EVENT_BYTES + 1, MAX_MSG_BYTES - 512, MAX_MSG_BYTES + 1)]
    templates = collect(valid_heartbeat_parts, 300)
    random.Random(6).shuffle(cases)
    generated_s = time.monotonic() - started
    incarnations = {wid: new_incarnation() for wid in WORKERS}
    async with running_registry(nats_server.url, caught_up=True) as registry:
        feeder = Feeder(js, incarnations, templates)
        for wid, inc in incarnations.items():
            ack = await publish(js, "register", wid, register_body(wid, inc, heartbeat_interval_s=3600.0))
            feeder.tally.stored_valid[wid] += 1
            feeder.tally.last_valid[wid] = (ack.seq, 0)
        rss_start = 0
        for i in range(0, len(cases), BATCH):
            for case in cases[i : i + BATCH]:
                await feeder.send(case)
                if feeder.rng.random() < 0.5:
                    await feeder.send(*feeder.valid())
            await feeder.flush()
            assert registry.counters()["resyncs"] == 0, "the projector fell over (see projector_resync)"
            if i == BATCH * 4:  # warmed up: caches, buffers, the first records
                await eventually(lambda: _current(js, registry), timeout=30.0, interval=0.05)
                rss_start = rss()
        last_publish = time.monotonic()
        await eventually(lambda: _current(js, registry), timeout=30.0, interval=0.05)
        caught_up_s = time.monotonic() - last_publish
        rss_growth = rss() - rss_start
        counters = registry.counters()
        records = await bucket_records(js)
    tally = feeder.tally

    assert len(cases) >= 10_000 and sum(tally.stored_bad.values()) >= 8_000
    assert set(tally.stored_bad) >= {
        "random bytes", "truncated json", "deeply nested json", "invalid utf-8", "wrong type",
        "nan/infinity", "negative counter", "out of range", "unknown version", "id != subject id",
        "subject id not an id", "missing field", "oversized",
    }  # fmt: skip
    assert tally.refused["oversized"] and tally.duplicates  # over max_msg_size; reused msg ids
    assert sum(tally.refused.values()) >= 500  # hostile headers
    assert counters["events_rejected"] == sum(tally.stored_bad.values())
    assert counters["events_applied"] == sum(tally.stored_valid.values())
    assert (counters["events_ignored"], counters["events_unregistered"], counters["resyncs"]) == (0, 0, 0)
    for wid in WORKERS:
        seq, completed = tally.last_valid[wid]
        rec = records[wid]
        assert (rec["event_seq"], rec["metrics"]["completed_tasks"]) == (seq, completed)
        assert rec["version"] == tally.stored_valid[wid] and rec["offline_reason"] is None
    assert caught_up_s < 5.0, f"the projector needed {caught_up_s:.1f} s to catch up"
    assert rss_growth < RSS_GROWTH_LIMIT, f"RSS grew {rss_growth / 2**20:.0f} MiB"
    assert time.monotonic() - started < 90, f"took {time.monotonic() - started:.0f} s (generating: {generated_s:.0f} s)"


# ---------------------------------------------------------------- what the stream refuses


async def _stored_total(js: JetStreamContext) -> int:
    return (await js.stream_info(EVENTS)).state.messages


@bounded(20)
async def test_unknown_event_kinds_get_no_stream_ack_and_nothing_lands(
    nats_server: NatsServer, nc: Client
) -> None:
    js = nc.jetstream()
    await provision(nc)
    before = await _stored_total(js)
    for subject in ["worker.bogus.w1", "worker.reboot.w1", "worker.Heartbeat.w1",
                    "worker.heartbeat.w1.extra", "worker.heartbeat", "workers.heartbeat.w1"]:  # fmt: skip
        with pytest.raises((nats.js.errors.NoStreamResponseError, nats.errors.NoRespondersError)):
            await js.publish(subject, json.dumps(heartbeat_body("w1", "inc")).encode())
    assert await _stored_total(js) == before


@bounded(20)
async def test_stream_refuses_rollups_ttls_deletes_and_purges(
    nats_server: NatsServer, nc: Client
) -> None:
    js = nc.jetstream()
    async with running_registry(nats_server.url, caught_up=True) as registry:
        inc = new_incarnation()
        reg = await publish(js, "register", "w1", register_body("w1", inc))
        body = json.dumps(heartbeat_body("w1", inc)).encode()
        refusals: dict[str, Callable[[], Any]] = {
            "rollup sub": lambda: js.publish("worker.heartbeat.w1", body, headers={"Nats-Rollup": "sub"}),
            "rollup all": lambda: js.publish("worker.heartbeat.w1", body, headers={"Nats-Rollup": "all"}),
            "ttl": lambda: js.publish("worker.heartbeat.w1", body, headers={"Nats-TTL": "1s"}),
        }
        for attempt in refusals.values():
            with pytest.raises(nats.js.errors.APIError):
                await attempt()
        deleted = await api(nc, f"STREAM.MSG.DELETE.{EVENTS}", {"seq": reg.seq})
        erased = await api(nc, f"STREAM.MSG.DELETE.{EVENTS}", {"seq": reg.seq, "no_erase": False})
        purged = await api(nc, f"STREAM.PURGE.{EVENTS}", {})
        purged_one = await api(nc, f"STREAM.PURGE.{EVENTS}", {"filter": "worker.register.w1"})
        kept = await js.get_msg(EVENTS, reg.seq)
        counters = registry.counters()
    assert "error" in deleted and "error" in erased and "error" in purged and "error" in purged_one
    assert await _stored_total(js) == 1 and kept.subject == "worker.register.w1"
    assert counters["events_rejected"] == 0 and counters["events_applied"] == 1


@bounded(20)
async def test_invalid_utf8_in_a_free_text_field_is_rejected_and_does_not_stall_the_projector(
    nats_server: NatsServer, nc: Client
) -> None:
    """A body that is valid JSON but for one invalid UTF-8 byte in a string."""
    js = nc.jetstream()
    async with running_registry(nats_server.url, caught_up=True) as registry:
        inc = new_incarnation()
        await publish(js, "register", "w1", register_body("w1", inc))
        bad = json.dumps(unregister_body("w1", inc, reason="@@")).encode().replace(b"@@", b"\xff")
        await publish(js, "unregister", "w1", bad)
        ack = await publish(js, "heartbeat", "w1", heartbeat_body("w1", inc, completed_tasks=5))
        await eventually(lambda: registry.counters()["last_seq"] >= ack.seq, timeout=5.0)
        counters = registry.counters()
    assert counters["events_rejected"] == 1 and counters["resyncs"] == 0
