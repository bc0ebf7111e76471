"""Trust, tried: against a nats-server in the secured mode (`registry auth init`'s
configuration: operator, accounts, one scoped signing key per role), each role
attempts what it must not do, and each attempt fails because the server refuses
it. Every refusal is judged by its effect (nothing stored, nothing received,
nothing deleted), never by an error's wording; and beside each refusal the same
client does what it may, so a test cannot pass just because nothing works.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from agent import Agent, AgentCutOff
from registry import definitions, protocol
from registry.cli import main as registry_main
from registry.connect import FAIL_FAST, Auth, NatsOptions
from registry.eventlog import EventQuery, read_events
from registry.router import Router
from registry.server.embedded import NatsServer
from registry.trust.authdir import AuthDir, push_account
from tests.conftest import eventually
from tests.integration.registry_helpers import (
    bounded,
    heartbeat_body,
    new_incarnation,
    register_body,
    registry_process,
    running_registry,
    unregister_body,
)
from tests.integration.test_agent_process import agent_process
from tests.integration.test_ops import run

NO_ANSWER_S = 0.5  # a refused publish is dropped by the server: no ack, no reply, ever


@pytest.fixture
def auth(tmp_path: Path) -> AuthDir:
    return AuthDir.init(tmp_path / "auth")


@pytest.fixture
def secured(tmp_path: Path, auth: AuthDir) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "nats", config=auth.root / "server.conf")
    server.start()
    yield server
    server.kill()


def creds(auth: AuthDir, role: str, name: str) -> Path:
    path = auth.root / f"{role}-{name}.creds"
    path.write_text(auth.mint(role, name))
    return path


class Client_:
    """A connection as one identity, the way our clients make it (Auth: inbox prefix
    from the credentials); records the server's asynchronous errors."""

    def __init__(self, nc: Client, errors: list[Exception]) -> None:
        self.nc, self.errors = nc, errors

    @property
    def js(self) -> JetStreamContext:
        return self.nc.jetstream()


async def connect_as(url: str, path: Path, **extra: Any) -> Client_:
    errors: list[Exception] = []

    async def remember(e: Exception) -> None:
        errors.append(e)

    options = NatsOptions.of(
        url, f"test {path.stem}", reconnect=FAIL_FAST, auth=Auth(creds=str(path))
    )
    nc = Client()
    await nc.connect(**options.kwargs(error_cb=remember, **extra))
    return Client_(nc, errors)


async def register_as(url: str, auth: AuthDir, wid: str, inc: str | None = None) -> str:
    """Worker `wid` registered by an agent connection with its own credentials; its
    incarnation."""
    inc = inc or new_incarnation()
    c = await connect_as(url, creds(auth, "agent", wid))
    try:
        await c.js.publish(f"worker.register.{wid}", json.dumps(register_body(wid, inc)).encode())
    finally:
        await c.nc.close()
    return inc


@pytest.fixture
async def admin(secured: NatsServer, auth: AuthDir) -> AsyncIterator[Client_]:
    c = await connect_as(secured.url, auth.root / "admin.creds")
    yield c
    await c.nc.close()


@pytest.fixture
async def registry(secured: NatsServer, auth: AuthDir) -> AsyncIterator[Any]:
    """The registry process's role, in-process: it provisions, folds, answers."""
    registry_auth = Auth(creds=str(auth.root / "registry.creds"))
    async with running_registry(secured.url, caught_up=True, auth=registry_auth) as r:
        yield r


async def stored_on(js: JetStreamContext, subject: str) -> int:
    """How many messages WORKER_EVENTS (or the stream owning `subject`) holds on it."""
    stream = await js.find_stream_name_by_subject(subject)
    info = await js.stream_info(stream, subjects_filter=subject)
    return int((info.state.subjects or {}).get(subject, 0))


async def refused_publish(c: Client_, subject: str, body: dict[str, Any]) -> bool:
    """True when a JetStream publish got no acknowledgement (the server dropped it)."""
    try:
        await c.js.publish(subject, json.dumps(body).encode(), timeout=NO_ANSWER_S)
    except nats.errors.TimeoutError:
        return True
    return False


async def receives(
    c: Client_, subject: str, publisher: Client, on: str, wait_s: float = 0.5
) -> bool:
    """Does a subscription of `c` to `subject` get a message `publisher` sends on `on`?"""
    got: list[Msg] = []

    async def take(msg: Msg) -> None:
        got.append(msg)

    sub = await c.nc.subscribe(subject, cb=take)
    await c.nc.flush()
    await publisher.publish(on, b"{}")
    await publisher.flush()
    await asyncio.sleep(wait_s)
    await sub.unsubscribe() if not c.nc.is_closed else None
    return bool(got)


async def does_receive(c: Client_, subject: str, publisher: Client, on: str) -> bool:
    """`receives`, for what must arrive: sent again until it does (a busy machine may
    take longer than a refusal test waits), at most 10 s."""
    got: list[Msg] = []

    async def take(msg: Msg) -> None:
        got.append(msg)

    sub = await c.nc.subscribe(subject, cb=take)
    await c.nc.flush()
    deadline = time.monotonic() + 10.0
    while not got and time.monotonic() < deadline:
        await publisher.publish(on, b"{}")
        await publisher.flush()
        await asyncio.sleep(0.1)
    await sub.unsubscribe()
    return bool(got)


async def js_api_refused(c: Client_, call: str, body: dict[str, Any] | None = None) -> bool:
    """A JetStream API request that gets no answer at all: the server dropped it."""
    try:
        await c.nc.request(f"$JS.API.{call}", json.dumps(body or {}).encode(), timeout=NO_ANSWER_S)
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
        return True
    return False


# ---------------------------------------------------------------- agents


@bounded(60)
async def test_an_agent_speaks_only_for_its_own_worker(
    secured: NatsServer, auth: AuthDir, admin: Client_, registry: Any
) -> None:
    w1 = await connect_as(secured.url, creds(auth, "agent", "w1"))
    w2 = await connect_as(secured.url, creds(auth, "agent", "w2"))
    try:
        inc1, inc2 = new_incarnation(), new_incarnation()
        await w1.js.publish("worker.register.w1", json.dumps(register_body("w1", inc1)).encode())
        await w2.js.publish("worker.register.w2", json.dumps(register_body("w2", inc2)).encode())
        await eventually(lambda: "w2" in registry.records() and "w1" in registry.records())
        before = registry.records()["w2"]

        # w1 as w2: register a takeover, beat, leave; each refused, nothing folded
        assert await refused_publish(
            w1, "worker.register.w2", register_body("w2", new_incarnation())
        )
        assert await refused_publish(w1, "worker.heartbeat.w2", heartbeat_body("w2", inc2))
        assert await refused_publish(w1, "worker.unregister.w2", unregister_body("w2", inc2))
        for kind in ("register", "heartbeat", "unregister"):
            assert await stored_on(admin.js, f"worker.{kind}.w2") == (
                1 if kind == "register" else 0
            )
        after = registry.records()["w2"]
        assert (after.incarnation, after.live, after.event_seq) == (inc2, True, before.event_seq)

        # the registry's subjects: verdicts, availability, control
        await w1.js.publish("worker.heartbeat.w1", json.dumps(heartbeat_body("w1", inc1)).encode())
        last = registry.records()["w1"].last_heartbeat
        verdict = {"v": 1, "worker_id": "w2", "last_heartbeat": last.isoformat(),
                   "timeout_s": 0.1, "detected_at": last.isoformat()}  # fmt: skip
        assert await refused_publish(w1, "worker.expired.w2", verdict)
        assert await refused_publish(w1, "worker.late.w2", verdict | {"late_after_s": 0.1})
        assert await stored_on(admin.js, "worker.expired.w2") == 0
        assert await stored_on(admin.js, "worker.late.w2") == 0
        forged = {"worker_id": "w1", "available": True, "max_concurrent_tasks": 4096}
        assert await refused_publish(w1, "worker.available.w1", forged)
        # w2's agent, listening on its control subject, hears nothing w1 says there
        assert not await receives(w2, "worker.control.w2", w1.nc, "worker.control.w2")
        assert registry.records()["w2"].live
    finally:
        await w1.nc.close()
        await w2.nc.close()


@bounded(60)
async def test_workers_minted_while_the_server_runs_get_in_without_a_restart_or_reload(
    secured: NatsServer, auth: AuthDir, admin: Client_, registry: Any
) -> None:
    assert secured.process is not None
    pid, conf = secured.process.pid, (auth.root / "server.conf").read_bytes()
    for i in range(20):
        await register_as(secured.url, auth, f"late-{i}")
    await eventually(lambda: all(f"late-{i}" in registry.records() for i in range(20)))
    assert secured.process.pid == pid and secured.process.poll() is None  # never restarted
    assert (auth.root / "server.conf").read_bytes() == conf  # nor its configuration changed


@bounded(60)
async def test_an_agent_reads_only_its_control_subject_and_its_replies(
    secured: NatsServer, auth: AuthDir, admin: Client_, registry: Any
) -> None:
    w1 = await connect_as(secured.url, creds(auth, "agent", "w1"))
    try:
        # allowed: its own control subject (the proof that this test can see a delivery)
        assert await does_receive(w1, "worker.control.w1", admin.nc, "worker.control.w1")
        for subject, on in [
            (">", "worker.control.w2"),
            ("worker.control.w2", "worker.control.w2"),
            ("worker.control.*", "worker.control.w2"),
            ("worker.available.>", "worker.available.w2"),
            ("worker.heartbeat.*", "worker.heartbeat.w2"),
            ("_INBOX.>", "_INBOX.someone.1"),  # another client's replies
            ("_INBOX_w2.>", "_INBOX_w2.abc.1"),  # another worker's replies
            ("$JS.API.>", "$JS.API.INFO"),
        ]:
            assert not await receives(w1, subject, admin.nc, on, wait_s=0.3), subject
        # and its own replies work: a JetStream publish is acknowledged
        ack = await w1.js.publish("worker.heartbeat.w1", b"{}")
        assert ack.stream == protocol.EVENTS_STREAM
    finally:
        await w1.nc.close()


@bounded(60)
async def test_agents_and_routers_cannot_delete_purge_or_write_the_bucket(
    secured: NatsServer, auth: AuthDir, admin: Client_, registry: Any
) -> None:
    kv = await admin.js.key_value(protocol.BUCKET)
    await kv.put("w9", b"{}")  # a key to try deleting (admin may; the others may not)
    for who in (creds(auth, "agent", "w1"), creds(auth, "router", "r1")):
        c = await connect_as(secured.url, who)
        try:
            for stream in (protocol.EVENTS_STREAM, protocol.AVAILABILITY_STREAM, "KV_workers"):
                assert await js_api_refused(c, f"STREAM.DELETE.{stream}"), (who.stem, stream)
                assert await js_api_refused(c, f"STREAM.PURGE.{stream}"), (who.stem, stream)
            assert await js_api_refused(
                c, f"CONSUMER.DELETE.{protocol.EVENTS_STREAM}.{protocol.PROJECTOR_CONSUMER}"
            )
            assert await js_api_refused(
                c, "STREAM.CREATE.EVIL", {"name": "EVIL", "subjects": ["evil"]}
            )
            assert await refused_publish(c, "$KV.workers.w1", {"forged": True})
            assert await refused_publish(c, "$KV.workers.w9", {})
        finally:
            await c.nc.close()
    names = await admin.js.streams_info()
    assert {s.config.name for s in names} >= {protocol.EVENTS_STREAM, protocol.AVAILABILITY_STREAM}
    assert "EVIL" not in {s.config.name for s in names}
    assert await admin.js.consumer_info(protocol.EVENTS_STREAM, protocol.PROJECTOR_CONSUMER)
    assert (await kv.get("w9")).value == b"{}"
    with pytest.raises(nats.js.errors.KeyNotFoundError):
        await kv.get("w1")


@bounded(60)
async def test_only_the_registry_role_may_take_or_drop_the_active_standby_lease(
    secured: NatsServer, auth: AuthDir, admin: Client_, registry: Any
) -> None:
    """A forged lease would make every registry stand by (nobody projects or sweeps);
    a dropped one would start a second active registry."""
    await eventually(lambda: registry.active, timeout=10.0)
    lease_stream, key = f"KV_{protocol.LEASE_BUCKET}", f"$KV.{protocol.LEASE_BUCKET}.{protocol.LEASE_KEY}"
    held = await admin.js.get_last_msg(lease_stream, key)
    forged = {"holder": "evil", "epoch": 1, "since": "2026-01-01T00:00:00Z", "ttl_s": 60}
    for who in (creds(auth, "agent", "w1"), creds(auth, "router", "r1"), creds(auth, "operator", "o1")):
        c = await connect_as(secured.url, who)
        try:
            assert await refused_publish(c, key, forged), who.stem
            for call in (f"STREAM.PURGE.{lease_stream}", f"STREAM.DELETE.{lease_stream}",
                         f"STREAM.MSG.DELETE.{lease_stream}"):  # fmt: skip
                assert await js_api_refused(c, call, {"seq": held.seq}), (who.stem, call)
        finally:
            await c.nc.close()
    now = await admin.js.get_last_msg(lease_stream, key)
    assert json.loads(now.data or b"{}")["holder"] == registry.lease()["instance"]
    assert registry.active and registry.counters()["terms"] == 1  # never lost it


@bounded(60)
async def test_an_agent_with_its_credentials_registers_and_beats(
    secured: NatsServer, auth: AuthDir, registry: Any
) -> None:
    path = creds(auth, "agent", "gpu-box-1")
    async with Agent(
        secured.url, name="gpu box", creds=str(path), heartbeat_interval_s=0.5
    ) as agent:
        assert agent.worker_id == "gpu-box-1"  # the id the credentials speak for
        record = await eventually(lambda: registry.records().get("gpu-box-1"))
        seq = record.last_heartbeat_seq
        await eventually(lambda: registry.records()["gpu-box-1"].last_heartbeat_seq > seq)
    await eventually(lambda: not registry.records()["gpu-box-1"].live)  # its unregister too


async def test_agent_credentials_for_another_worker_id_are_a_usage_error(auth: AuthDir) -> None:
    from agent.cli import main as agent_main

    path = creds(auth, "agent", "w1")
    code = await asyncio.to_thread(
        agent_main, ["run", "--name", "x", "--worker-id", "w2", "--creds", str(path)]
    )
    assert code == 2


# ---------------------------------------------------------------- routers and operators


@bounded(60)
async def test_a_router_follows_availability_and_asks_the_service_and_nothing_more(
    secured: NatsServer, auth: AuthDir, admin: Client_, registry: Any
) -> None:
    await register_as(secured.url, auth, "w1")
    await eventually(lambda: "w1" in registry.records())
    path = creds(auth, "router", "r1")
    router = await Router.connect(secured.url, creds=str(path))
    try:
        await router.ready()
        await eventually(lambda: router.pick() is not None)
        assert router.pick().worker_id == "w1"  # type: ignore[union-attr]
        nc = router.nc
        for endpoint, body in (("pick", {}), ("list", {}), ("get", {"worker_id": "w1"})):
            reply = await nc.request(f"registry.{endpoint}", json.dumps(body).encode(), timeout=5)
            assert b"w1" in reply.data, endpoint
        c = Client_(nc, [])
        for endpoint in ("stats", "history"):
            with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
                await nc.request(
                    f"registry.{endpoint}", b'{"worker_id": "w1"}', timeout=NO_ANSWER_S
                )
        # no events: neither published nor read
        assert await refused_publish(c, "worker.heartbeat.w1", {})
        assert await js_api_refused(c, f"CONSUMER.CREATE.{protocol.EVENTS_STREAM}",
                                    {"stream_name": protocol.EVENTS_STREAM, "config": {}})  # fmt: skip
        assert await js_api_refused(c, "STREAM.INFO.KV_workers")
        assert not await receives(c, "worker.>", admin.nc, "worker.heartbeat.w1", wait_s=0.3)
    finally:
        await router.close()


@bounded(60)
async def test_an_operator_reads_events_and_the_bucket_and_deletes_nothing(
    secured: NatsServer, auth: AuthDir, admin: Client_, registry: Any
) -> None:
    await register_as(secured.url, auth, "w1")
    await eventually(lambda: "w1" in registry.records())
    path = creds(auth, "operator", "ops1")
    flags = ["--json", "--nats", secured.url, "--creds", str(path)]
    workers = await command("workers", *flags)
    assert [w["registration"]["worker_id"] for w in workers] == ["w1"]
    events = await command("events", "--worker", "w1", *flags)
    assert [e["kind"] for e in events] == ["register"]
    assert (await command("stats", *flags))["total"] == 1
    at = await command("workers", "--at", "0s", *flags)  # the whole stream, read as an operator
    assert [w["registration"]["worker_id"] for w in at["workers"]] == ["w1"]

    c = await connect_as(secured.url, path)
    try:
        events = await read_events(c.nc, EventQuery(worker_id="w1"), protocol.EVENTS_STREAM)
        assert [e.kind for e in events] == ["register"]
        # what the README's `nats --creds alice.creds --inbox-prefix _INBOX_alice ...` does
        kv = await c.js.key_value(protocol.BUCKET)  # STREAM.INFO, then a direct get
        assert (await kv.get("w1")).value
        assert {s.config.name for s in await c.js.streams_info()} >= {protocol.EVENTS_STREAM}
        at = await c.nc.request("registry.at", b'{"at": "0s"}', timeout=5)  # the service folds
        assert [w["registration"]["worker_id"] for w in json.loads(at.data)["workers"]] == ["w1"]
        ping = await c.nc.request("$SRV.PING.worker-registry", b"", timeout=5)  # nats micro ls
        assert json.loads(ping.data)["name"] == "worker-registry"
        for stream in (protocol.EVENTS_STREAM, protocol.AVAILABILITY_STREAM, "KV_workers"):
            assert await js_api_refused(c, f"STREAM.DELETE.{stream}")
            assert await js_api_refused(c, f"STREAM.PURGE.{stream}")
            assert await js_api_refused(c, f"STREAM.MSG.DELETE.{stream}", {"seq": 1})
        checkpoint = f"{protocol.EVENTS_STREAM}.{protocol.PROJECTOR_CONSUMER}"
        assert await js_api_refused(c, f"CONSUMER.DELETE.{checkpoint}")
        assert await refused_publish(c, "$KV.workers.w1", {})
        assert await refused_publish(c, "worker.heartbeat.w1", {})
        assert await refused_publish(c, "worker.expired.w1", {})
    finally:
        await c.nc.close()
    assert registry.records()["w1"].live
    assert await stored_on(admin.js, "worker.register.w1") == 1


@bounded(60)
async def test_only_operators_cordon_uncordon_and_drain(
    secured: NatsServer, auth: AuthDir, admin: Client_, registry: Any
) -> None:
    await register_as(secured.url, auth, "w1")
    await eventually(lambda: "w1" in registry.records())
    action = {"v": 1, "worker_id": "w1", "by": "mallory", "reason": "x",
              "sent_at": "2026-01-01T00:00:00Z"}  # fmt: skip
    w1 = await connect_as(secured.url, creds(auth, "agent", "w1"))
    router = await connect_as(secured.url, creds(auth, "router", "r1"))
    try:
        for c in (w1, router):  # not even an agent for its own worker
            for kind in protocol.OPERATOR_KINDS:
                assert await refused_publish(c, f"worker.{kind}.w1", action)
                assert await stored_on(admin.js, f"worker.{kind}.w1") == 0
            with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
                await c.nc.request("registry.brake", b'{"action": "release"}', timeout=NO_ANSWER_S)
    finally:
        await w1.nc.close()
        await router.nc.close()
    assert registry.records()["w1"].cordon is None

    flags = ["--json", "--nats", secured.url, "--creds", str(creds(auth, "operator", "ops1"))]
    done = await command("cordon", "w1", "--reason", "rack move", *flags)
    assert done["record"]["cordon"]["by"] == "ops1"  # the name in the credentials
    assert not registry.records()["w1"].available
    await command("uncordon", "w1", *flags)
    assert registry.records()["w1"].cordon is None
    assert (await command("brake", "release", *flags))["action"] == "release"
    assert registry.sweeper.operator_releases == 1  # the operator's, not the others'


async def command(*argv: str) -> Any:
    """`registry ARGV` in a child process (the in-process registry logs to our stdout)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "registry.cli", *argv,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    return json.loads(out)


@bounded(60)
async def test_without_credentials_nobody_gets_in(
    secured: NatsServer, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(nats.errors.Error):
        await nats.connect(secured.url, allow_reconnect=False, max_reconnect_attempts=1,
                           connect_timeout=2, error_cb=_quiet)  # fmt: skip
    code, out, err = await run(capsys, "workers", "--nats", secured.url)
    assert (code, out) == (1, "") and "not authorized" in err


async def _quiet(e: Exception) -> None:
    pass


# ---------------------------------------------------------------- revocation


@bounded(90)
async def test_a_revoked_agent_is_cut_off_refused_and_stays_refused_after_a_restart(
    secured: NatsServer, auth: AuthDir
) -> None:
    w1_path, w2_path = creds(auth, "agent", "w1"), creds(auth, "agent", "w2")
    lost = asyncio.Event()

    async def on_lost() -> None:
        lost.set()

    w1 = await connect_as(secured.url, w1_path, disconnected_cb=on_lost, closed_cb=on_lost)
    w2 = await connect_as(secured.url, w2_path)
    system = await connect_as(secured.url, auth.root / "system-user.creds")
    try:
        assert [i.name for i in auth.revoke("w1")] == ["w1"]
        started = time.monotonic()
        await push_account(auth, system.nc)
        await asyncio.wait_for(lost.wait(), 5.0)  # the live connection, closed within 5 s
        assert time.monotonic() - started < 5.0
        await asyncio.sleep(0.2)
        assert w2.nc.is_connected  # the others stay
        await w2.nc.flush(timeout=2)
    finally:
        for c in (w1, w2, system):
            await c.nc.close()
    await _refused(secured.url, w1_path)
    secured.restart()  # the store keeps the pushed account: still refused
    await _refused(secured.url, w1_path)
    again = await connect_as(secured.url, w2_path)
    await again.nc.close()
    fresh = await connect_as(secured.url, creds(auth, "agent", "w1"))  # re-admitted by a new mint
    await fresh.nc.close()


async def _refused(url: str, path: Path) -> None:
    with pytest.raises((nats.errors.Error, OSError, TimeoutError)):
        c = await connect_as(url, path)
        await c.nc.close()


@bounded(90)
async def test_revoke_from_the_command_line_tells_the_server(
    secured: NatsServer, auth: AuthDir, capsys: pytest.CaptureFixture[str]
) -> None:
    w1_path = creds(auth, "agent", "w1")
    lost = asyncio.Event()

    async def on_lost() -> None:
        lost.set()

    w1 = await connect_as(secured.url, w1_path, disconnected_cb=on_lost, closed_cb=on_lost)
    try:
        code = await asyncio.to_thread(
            registry_main,
            ["auth", "revoke", "--dir", str(auth.root), "--worker-id", "w1", "--nats", secured.url],
        )
        assert code == 0
        await asyncio.wait_for(lost.wait(), 5.0)
    finally:
        await w1.nc.close()
    capsys.readouterr()
    code = await asyncio.to_thread(
        registry_main, ["auth", "list", "--dir", str(auth.root), "--json"]
    )
    listed = {row["name"]: row["revoked"] for row in json.loads(capsys.readouterr().out)}
    assert code == 0 and listed == {"registry": False, "admin": False, "w1": True}


# ---------------------------------------------------------------- the laptop try


@bounded(90)
async def test_registry_up_secure_then_an_agent_with_minted_credentials(tmp_path: Path) -> None:
    args = ["--secure", "--port", "0", "--data-dir", str(tmp_path / "data"),
            "--auth-dir", str(tmp_path / "auth")]  # fmt: skip
    async with registry_process(args, tmp_path / "up.log") as up:
        url = await up.first_line()
        assert url.startswith("nats://127.0.0.1:")
        minted = tmp_path / "demo.creds"
        mint = ["auth", "mint", "--dir", str(tmp_path / "auth"), "--role", "agent",
                "--worker-id", "demo", "--out", str(minted)]  # fmt: skip
        assert await asyncio.to_thread(registry_main, mint) == 0
        async with Agent(url, name="demo", creds=str(minted), heartbeat_interval_s=0.5):
            admin = ["--json", "--nats", url, "--creds", str(tmp_path / "auth" / "admin.creds")]
            workers = await eventually(lambda: command("workers", *admin), timeout=10)
            assert [w["registration"]["worker_id"] for w in workers] == ["demo"]
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "registry.cli", "workers", "--nats", url,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            _, err = await proc.communicate()
            assert proc.returncode == 1 and b"not authorized" in err
        assert await up.terminate() == 0


def test_secure_is_for_the_embedded_server(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = registry_main(["up", "--secure", "--nats", "nats://127.0.0.1:4222",
                          "--auth-dir", str(tmp_path / "auth")])  # fmt: skip
    assert code == 2 and "--creds" in capsys.readouterr().err
    assert not (tmp_path / "auth").exists()


@bounded(60)
async def test_a_revoked_agent_run_exits_non_zero_saying_why_and_its_worker_expires(
    secured: NatsServer, auth: AuthDir, registry: Any, tmp_path: Path
) -> None:
    path = creds(auth, "agent", "w1")
    args = [
        "--nats",
        secured.url,
        "--name",
        "w1",
        "--creds",
        str(path),
        "--heartbeat-interval",
        "0.5",
    ]
    async with agent_process(args, tmp_path / "agent.log") as agent:
        await eventually(lambda: agent.logged("worker_registered"), timeout=20)
        await eventually(lambda: registry.records()["w1"].live)
        system = await connect_as(secured.url, auth.root / "system-user.creds")
        try:
            auth.revoke("w1")
            await push_account(auth, system.nc)
        finally:
            await system.nc.close()
        code = await asyncio.wait_for(agent.proc.wait(), 5.0)
    assert code == 1
    cut = [e for e in agent.log_events() if e.get("event") == "agent_cut_off"]
    assert len(cut) == 1 and cut[0]["level"] == "error"
    assert "Traceback" not in agent.log_path.read_text()
    await eventually(lambda: not registry.records()["w1"].live, timeout=10.0)


@bounded(60)
async def test_an_embedded_agent_learns_it_was_cut_off(
    secured: NatsServer, auth: AuthDir, registry: Any
) -> None:
    agent = Agent(secured.url, name="w1", creds=str(creds(auth, "agent", "w1")))
    await agent.start()
    try:
        auth.revoke("w1")
        system = await connect_as(secured.url, auth.root / "system-user.creds")
        try:
            await push_account(auth, system.nc)
        finally:
            await system.nc.close()
        with pytest.raises(AgentCutOff):
            await asyncio.wait_for(agent.wait(), 5.0)
    finally:
        await agent.stop()


# ---------------------------------------------------------------- reply subjects
#
# A request names its reply subject, and whoever answers publishes there with its
# own rights: JetStream acknowledging an agent's event, the JetStream API answering
# a router, the query service answering anyone. None of these may become a way to
# write the registry's account.


async def footprint(admin: Client_) -> dict[str, Any]:
    """What a redirected reply could change: stream sizes, w2's record and availability."""
    js = admin.js
    sizes = {s.config.name: (s.state.messages, s.state.last_seq) for s in await js.streams_info()
             if s.config.name != f"KV_{protocol.LEASE_BUCKET}"}  # renewed every second  # fmt: skip
    kv = await js.key_value(protocol.BUCKET)
    w2 = await kv.get("w2")
    available = await js.get_last_msg(protocol.AVAILABILITY_STREAM, "worker.available.w2")
    checkpoint = await js.consumer_info(protocol.EVENTS_STREAM, protocol.PROJECTOR_CONSUMER)
    return {"streams": sizes, "w2": (w2.revision, w2.value), "available": available.seq,
            "consumer": checkpoint.config}  # fmt: skip


async def settled_footprint(admin: Client_) -> dict[str, Any]:
    """The footprint once the registry's writes for what it has folded (bucket puts,
    announcements, acknowledged after the fold) have landed: two reads a moment apart
    agree."""
    last: dict[str, Any] | None = None
    for _ in range(100):
        try:
            now = await footprint(admin)
        except nats.js.errors.NotFoundError:  # w2's record or announcement not there yet
            now = None
        if now is not None and now == last:
            return now
        last = now
        await asyncio.sleep(0.3)
    raise AssertionError("the registry's writes did not settle in 30 s")


async def two_workers(url: str, auth: AuthDir, registry: Any) -> dict[str, str]:
    """w1 and w2 registered; their incarnations."""
    incs = {wid: await register_as(url, auth, wid) for wid in ("w1", "w2")}
    await eventually(lambda: {"w1", "w2"} <= set(registry.records()))
    await eventually(lambda: registry.counters()["pending"] == 0)
    return incs


TARGETS = [
    "$JS.API.STREAM.DELETE.WORKER_EVENTS", "$JS.API.STREAM.PURGE.KV_workers",
    "$JS.API.STREAM.PURGE.WORKER_EVENTS", "$KV.workers.w2", "worker.available.w2",
    "worker.expired.w2", f"$JS.API.CONSUMER.DELETE.WORKER_EVENTS.{protocol.PROJECTOR_CONSUMER}",
]  # fmt: skip


@bounded(90)
async def test_an_agent_cannot_aim_its_acknowledgements_at_the_registry(
    secured: NatsServer, auth: AuthDir, admin: Client_, registry: Any
) -> None:
    await two_workers(secured.url, auth, registry)
    before = await settled_footprint(admin)
    w1 = await connect_as(secured.url, creds(auth, "agent", "w1"))
    try:
        for target in TARGETS:  # its own subject, with a reply of its choosing
            await w1.nc.publish("worker.heartbeat.w1", b"{}", reply=target)
        await w1.nc.flush()
        await asyncio.sleep(1.0)
    finally:
        await w1.nc.close()
    after = await footprint(admin)
    grew = {
        n: after["streams"][n]
        for n in after["streams"]
        if after["streams"][n] != before["streams"][n]
    }
    assert set(grew) == {protocol.EVENTS_STREAM}  # the heartbeats themselves, nothing else
    assert after["w2"] == before["w2"] and after["available"] == before["available"]
    assert after["consumer"] == before["consumer"] and registry.records()["w2"].live


@bounded(90)
async def test_the_query_service_answers_only_to_inboxes(
    secured: NatsServer, auth: AuthDir, admin: Client_, registry: Any
) -> None:
    await two_workers(secured.url, auth, registry)
    router = await connect_as(secured.url, creds(auth, "router", "r1"))
    operator = await connect_as(secured.url, creds(auth, "operator", "ops1"))
    before = await settled_footprint(admin)
    try:
        for target in TARGETS:
            for who, subject, body in (
                (router, "registry.get", b"not json"),  # an error answer: an empty body
                (router, "registry.get", b'{"worker_id": "w1"}'),
                (router, "registry.list", b"{}"),
                (operator, "registry.stats", b"{}"),
                (operator, "$SRV.PING", b""),
                (operator, "$SRV.INFO.worker-registry", b""),
            ):
                await who.nc.publish(subject, body, reply=target)
        for c in (router, operator):
            await c.nc.flush()
        await asyncio.sleep(1.0)
        # the same requests with an inbox are answered (the service is up and listening)
        reply = await router.nc.request("registry.get", b'{"worker_id": "w1"}', timeout=5)
        assert b"w1" in reply.data
    finally:
        for c in (router, operator):
            await c.nc.close()
    after = await footprint(admin)
    assert after == before
    assert {"w1", "w2"} <= {w for w, r in registry.records().items() if r.live}


@bounded(60)
async def test_an_operator_cannot_take_over_or_drain_the_projectors_consumer(
    secured: NatsServer, auth: AuthDir, admin: Client_, registry: Any
) -> None:
    await two_workers(secured.url, auth, registry)
    operator = await connect_as(secured.url, creds(auth, "operator", "ops1"))
    before = await settled_footprint(admin)
    config = dict(before["consumer"].as_dict()) | {"filter_subject": "worker.nothing.*",
                                                     "max_ack_pending": 1}  # fmt: skip
    stream = protocol.EVENTS_STREAM
    try:
        # the old create subject carries the name in the body, where no permission looks
        body = {"stream_name": stream, "config": config | {"name": protocol.PROJECTOR_CONSUMER}}
        assert await js_api_refused(operator, f"CONSUMER.CREATE.{stream}", body)
        # a named create must name it in the subject: denied; another name in the subject
        # with the projector's in the body: the server refuses the mismatch
        assert await js_api_refused(
            operator, f"CONSUMER.CREATE.{stream}.{protocol.PROJECTOR_CONSUMER}", body
        )
        answer = await operator.nc.request(
            f"$JS.API.CONSUMER.CREATE.{stream}.other", json.dumps(body).encode(), timeout=5
        )
        assert "error" in json.loads(answer.data)
        # pulling from it would take events the projector then never sees
        inbox = operator.nc.new_inbox()
        pulled = await operator.nc.subscribe(inbox)
        await operator.nc.publish(
            f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{protocol.PROJECTOR_CONSUMER}",
            b'{"batch": 10, "expires": 1000000000}', reply=inbox,
        )  # fmt: skip
        await register_as(secured.url, auth, "w3")
        await eventually(lambda: "w3" in registry.records())  # folded, not stolen
        with pytest.raises(nats.errors.TimeoutError):
            await pulled.next_msg(timeout=0.5)
    finally:
        await operator.nc.close()
    assert (await footprint(admin))["consumer"] == before["consumer"]


@bounded(90)
async def test_jetstream_answers_aimed_at_a_record_are_repaired_and_routers_see_through_them(
    secured: NatsServer, auth: AuthDir, admin: Client_, registry: Any
) -> None:
    """NATS sends a JetStream API answer wherever the request's reply subject says, and
    a router may ask the API (to follow availability): so a router can make JetStream
    write its answer into w2's bucket key and availability subject. Neither sticks."""
    incs = await two_workers(secured.url, auth, registry)
    resyncs = registry.counters()["resyncs"]
    r1 = await connect_as(secured.url, creds(auth, "router", "r1"))
    try:
        for target in ("$KV.workers.w2", "worker.available.w2"):
            await r1.nc.publish("$JS.API.INFO", b"", reply=target)
        await r1.nc.flush()
        kv = await admin.js.key_value(protocol.BUCKET)
        await eventually(lambda: _not_a_record(kv, "w2"))  # the garbage is there
    finally:
        await r1.nc.close()
    # a router that starts now reads garbage as w2's last availability: it asks the registry
    router = await Router.connect(secured.url, creds=str(creds(auth, "router", "r2")))
    try:
        await router.ready()
        assert router.rejected >= 1
        await eventually(lambda: router.get("w2") is not None and router.get("w2").available)
    finally:
        await router.close()
    # w2's next event: the registry overwrites the foreign value, no resync
    w2 = await connect_as(secured.url, creds(auth, "agent", "w2"))
    try:
        await w2.js.publish(
            "worker.heartbeat.w2", json.dumps(heartbeat_body("w2", incs["w2"])).encode()
        )
    finally:
        await w2.nc.close()
    await eventually(lambda: registry.counters()["foreign_writes_repaired"] >= 1)
    assert registry.counters()["resyncs"] == resyncs
    value = (await kv.get("w2")).value
    assert protocol.WORKER_INFO_DECODER.decode(value or b"").live
    last = await admin.js.get_last_msg(protocol.AVAILABILITY_STREAM, "worker.available.w2")
    assert protocol.AVAILABILITY_DECODER.decode(last.data).worker_id == "w2"


async def _not_a_record(kv: Any, key: str) -> bool:
    value = (await kv.get(key)).value or b""
    try:
        protocol.WORKER_INFO_DECODER.decode(value)
    except Exception:  # noqa: BLE001 - any failure to decode is what we wait for
        return True
    return False


@bounded(60)
async def test_the_registry_role_upgrades_old_streams_and_purges_and_routers_forget(
    secured: NatsServer, auth: AuthDir, admin: Client_
) -> None:
    """An older deployment's streams (no per-message TTLs) are upgraded in place by the
    registry role; a purged worker's TTL'd markers are written by it, a router role
    drops the worker, and the server removes the markers."""
    for name, file in ((protocol.AVAILABILITY_STREAM, "streams/WORKER_AVAILABILITY.json"),
                       ("KV_workers", "kv/workers.json")):  # fmt: skip
        old = {k: v for k, v in definitions.load(file).items() if k != "allow_msg_ttl"}
        answer = await admin.nc.request(f"$JS.API.STREAM.CREATE.{name}", json.dumps(old).encode(),
                                        timeout=5.0)  # fmt: skip
        assert "error" not in json.loads(answer.data)
    registry_auth = Auth(creds=str(auth.root / "registry.creds"))
    async with running_registry(secured.url, caught_up=True, auth=registry_auth,
                                retention_s=0.5, purge_marker_ttl_s=1) as reg:  # fmt: skip
        inc = await register_as(secured.url, auth, "w1")
        router = await Router.connect(secured.url, creds=str(creds(auth, "router", "r1")))
        try:
            await router.ready()
            await eventually(lambda: router.get("w1") is not None)
            c = await connect_as(secured.url, creds(auth, "agent", "w1"))
            await c.js.publish("worker.unregister.w1", json.dumps(unregister_body("w1", inc)).encode())
            await c.nc.close()
            await eventually(lambda: reg.counters()["offline_purged"] == 1, timeout=10)
            await eventually(lambda: router.get("w1") is None and router.forgotten == 1)
        finally:
            await router.close()
        for stream in (protocol.AVAILABILITY_STREAM, "KV_workers"):
            info = await admin.js.stream_info(stream)
            assert info.config.allow_msg_ttl is True, stream

            async def empty(stream: str = stream) -> bool:
                return (await admin.js.stream_info(stream)).state.messages == 0

            await eventually(empty, timeout=10)
