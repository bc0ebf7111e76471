"""registry http: the original plan's REST API over a real registry and nats-server.

The plan's own WorkerClient (tests/integration/plan_client.py) registers, beats
and unregisters through the gateway; what it does lands in the bucket as the
events an agent publishes; bad input is a clear 4xx and reaches no stream.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import nats
from prometheus_client.parser import text_string_to_metric_families

from registry.server.embedded import NatsServer
from registry.trust.authdir import AuthDir
from tests.conftest import eventually
from tests.integration import plan_client as plan
from tests.integration.http_helpers import gateway, http_command, registry_with_gateway
from tests.integration.registry_helpers import bounded, registry_process

INTERVAL_S = 2.0  # what the gateway says HTTP workers promise (its --heartbeat-interval)


def _registration(worker_id: str, **over: Any) -> dict[str, Any]:
    reg = {"worker_id": worker_id, "name": worker_id, "capability": "gpu",
           "hardware": {"cpu_cores": 8, "memory_gb": 32.0, "gpu_count": 1},
           "location": {"hostname": "h", "ip_address": "10.0.0.1"},
           "supported_content_types": ["video"], "max_concurrent_tasks": 2}  # fmt: skip
    reg.update(over)
    return reg


def _beat(worker_id: str, active: int = 0, **over: Any) -> dict[str, Any]:
    body = {"worker_id": worker_id, "status": "online",
            "metrics": {"cpu_usage_percent": 10.0, "memory_usage_percent": 20.0,
                        "active_tasks": active}}  # fmt: skip
    body.update(over)
    return body


async def _events_in_stream(nats_url: str) -> int:
    nc = await nats.connect(nats_url)
    try:
        info = await nc.jetstream().stream_info("WORKER_EVENTS")
        return int(info.state.messages)
    finally:
        await nc.close()


@bounded(90)
async def test_the_plans_worker_client_end_to_end(tmp_path: Path) -> None:
    async with registry_with_gateway(
        tmp_path, http_args=("--heartbeat-interval", str(INTERVAL_S))
    ) as (_, url), aiohttp.ClientSession() as http:
        client = plan.WorkerClient(url, "plan-gpu-1", plan.WorkerCapability.GPU)
        client._heartbeat_interval = 0.5  # the plan's is 30 s
        silent = plan.WorkerClient(url, "plan-cpu-1", plan.WorkerCapability.CPU)
        silent._heartbeat_interval = 0.5
        assert await client.register() and await silent.register()
        assert client.worker_id and silent.worker_id
        await eventually(lambda: client.heartbeats_sent >= 2 and silent.heartbeats_sent >= 2,
                         timeout=20.0)  # fmt: skip
        assert client.heartbeat_failures == 0

        async with http.get(f"{url}/api/v1/workers") as r:
            assert r.status == 200
            listed = {w["registration"]["worker_id"]: w for w in await r.json()}
        assert set(listed) == {client.worker_id, silent.worker_id}
        mine = listed[client.worker_id]
        # the plan's models read what the API answers
        assert plan.WorkerRegistration.model_validate(mine["registration"]) == client.registration
        plan.WorkerMetrics.model_validate(mine["metrics"])
        assert mine["status"] == "online"

        async with http.get(f"{url}/api/v1/workers/stats") as r:
            stats = await r.json()
        assert stats["total"] == 2 and stats["gpu_workers"] == 1 and stats["cpu_workers"] == 1
        async with http.get(f"{url}/api/v1/workers/{client.worker_id}") as r:
            assert r.status == 200 and (await r.json())["registration"]["name"] == "plan-gpu-1"
        async with http.get(f"{url}/api/v1/workers/available",
                            params={"capability": "gpu", "content_type": "video"}) as r:  # fmt: skip
            assert [w["registration"]["worker_id"] for w in await r.json()] == [client.worker_id]

        await silent.stop_heartbeat()  # falls silent: expired like any other worker
        started = time.monotonic()

        async def expired() -> bool:
            async with http.get(f"{url}/api/v1/workers/{silent.worker_id}") as r:
                body = await r.json()
            return bool(body["status"] == "offline" and body["offline_reason"] == "expired")

        await eventually(expired, timeout=30.0, interval=0.2)
        assert time.monotonic() - started >= 3 * INTERVAL_S - 1.0  # not before its timeout

        await client.unregister()
        async with http.get(f"{url}/api/v1/workers/{client.worker_id}") as r:
            body = await r.json()
        assert body["status"] == "offline" and body["offline_reason"] == "unregistered"
        async with http.get(f"{url}/api/v1/workers/stats") as r:
            assert (await r.json())["total"] == 0
        async with http.get(f"{url}/api/v1/workers/{client.worker_id}/history") as r:
            kinds = [e["kind"] for e in (await r.json())["events"]]
        assert kinds[0] == "register" and "heartbeat" in kinds and kinds[-1] == "unregister"


@bounded(60)
async def test_bad_input_is_a_clear_4xx_and_reaches_no_stream(tmp_path: Path) -> None:
    async with registry_with_gateway(tmp_path) as (nats_url, url), aiohttp.ClientSession() as http:
        async with http.post(f"{url}/api/v1/workers/register",
                             json={"registration": _registration("w-1")}) as r:  # fmt: skip
            assert r.status == 200
        before = await _events_in_stream(nats_url)
        bad_slots = {"registration": _registration("w-2", max_concurrent_tasks=10**9)}
        async with http.post(f"{url}/api/v1/workers/register", json=bad_slots) as r:
            assert r.status == 422
            detail = (await r.json())["detail"][0]
        assert detail["loc"] == ["body", "registration", "max_concurrent_tasks"]
        async with http.post(f"{url}/api/v1/workers/register",
                             json={"registration": {"name": "no-capability"}}) as r:  # fmt: skip
            assert r.status == 422
        async with http.post(f"{url}/api/v1/workers/register", data=b"{not json") as r:
            assert r.status == 422
        async with http.post(f"{url}/api/v1/workers/register",
                             data=b'{"registration": "' + b"x" * 2_000_000 + b'"}') as r:  # fmt: skip
            assert r.status == 413
        async with http.post(f"{url}/api/v1/workers/w-1/heartbeat", json=_beat("w-9")) as r:
            assert r.status == 400  # the path and the body name different workers
        async with http.post(f"{url}/api/v1/workers/nobody/heartbeat", json=_beat("nobody")) as r:
            assert r.status == 404
        bad_cpu = _beat("w-1")
        bad_cpu["metrics"]["cpu_usage_percent"] = 250.0
        async with http.post(f"{url}/api/v1/workers/w-1/heartbeat", json=bad_cpu) as r:
            assert r.status == 422
            assert (await r.json())["detail"][0]["loc"][-1] == "cpu_usage_percent"
        async with http.delete(f"{url}/api/v1/workers/nobody") as r:
            assert r.status == 404
        async with http.get(f"{url}/api/v1/workers/nobody") as r:
            assert r.status == 404
        async with http.get(f"{url}/api/v1/workers/not.an.id") as r:
            assert r.status == 422
        async with http.get(f"{url}/api/v1/workers", params={"tag": "no-equals"}) as r:
            assert r.status == 422
        assert await _events_in_stream(nats_url) == before  # nothing reached the stream
        async with http.post(f"{url}/api/v1/workers/w-1/heartbeat", json=_beat("w-1", 1)) as r:
            assert r.status == 200
        assert await _events_in_stream(nats_url) == before + 1


@bounded(60)
async def test_the_live_feed_tells_of_each_change(tmp_path: Path) -> None:
    async with registry_with_gateway(tmp_path) as (_, url), aiohttp.ClientSession() as http:
        seen: list[tuple[str, dict[str, Any]]] = []

        async def follow() -> None:
            async with http.get(f"{url}/api/v1/events") as r:
                assert r.headers["content-type"].startswith("text/event-stream")
                kind = ""
                async for raw in r.content:
                    line = raw.decode().rstrip("\n")
                    if line.startswith("event: "):
                        kind = line[len("event: "):]
                    elif line.startswith("data: "):
                        seen.append((kind, json.loads(line[len("data: "):])))

        reader = asyncio.create_task(follow())
        try:
            await eventually(lambda: any(k == "health" for k, _ in seen), timeout=10.0)
            async with http.post(f"{url}/api/v1/workers/register",
                                 json={"registration": _registration("w-live")}) as r:  # fmt: skip
                assert r.status == 200
            async with http.delete(f"{url}/api/v1/workers/w-live") as r:
                assert r.status == 200

            def states() -> list[str]:
                return [d["record"]["status"] for k, d in seen
                        if k == "worker" and d["worker_id"] == "w-live" and d["record"]]  # fmt: skip

            await eventually(lambda: "offline" in states(), timeout=10.0)
            assert states()[0] == "online"
            health = next(d for k, d in seen if k == "health")
            assert health["status"] in ("ok", "degraded") and health["active"]["epoch"] >= 1
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)


def _jwt(creds: str) -> str:
    return creds.split("-----BEGIN NATS USER JWT-----")[1].split("------END")[0].strip()


@bounded(90)
async def test_a_secured_gateway_lets_a_worker_speak_only_for_itself(tmp_path: Path) -> None:
    auth_dir = tmp_path / "auth"
    async with registry_process(
        ["--secure", "--auth-dir", str(auth_dir), "--port", "0", "--http-port", "0",
         "--data-dir", str(tmp_path / "data")], tmp_path / "registry.log",
    ) as reg, aiohttp.ClientSession() as http:  # fmt: skip
        await reg.first_line(timeout=30.0)  # NATS
        url = await reg.first_line(timeout=30.0)  # HTTP
        auth = AuthDir(auth_dir)
        one, two = _jwt(auth.mint("agent", "w-one")), _jwt(auth.mint("agent", "w-two"))
        register = f"{url}/api/v1/workers/register"

        async def status(method: str, path: str, token: str | None = None,
                         body: Any = None) -> int:  # fmt: skip
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            async with http.request(method, f"{url}{path}", json=body, headers=headers) as r:
                return r.status

        async with http.post(register, json={"registration": _registration("w-one")}) as r:
            assert r.status == 401  # no token
        async with http.post(register, json={"registration": _registration("w-one"),
                                             "auth_token": two}) as r:  # fmt: skip
            assert r.status == 401  # another worker's
        async with http.post(register, json={"registration": _registration("w-one"),
                                             "auth_token": one[:-4] + "AAAA"}) as r:  # fmt: skip
            assert r.status == 401  # forged signature
        async with http.post(register, json={"registration": _registration("w-one"),
                                             "auth_token": one}) as r:  # fmt: skip
            assert r.status == 200
        beat = "/api/v1/workers/w-one/heartbeat"
        assert await status("POST", beat, None, _beat("w-one")) == 401
        assert await status("POST", beat, two, _beat("w-one")) == 401
        assert await status("DELETE", "/api/v1/workers/w-one", two) == 401
        assert await status("POST", beat, one, _beat("w-one")) == 200

        auth.revoke(name="w-one")
        assert await status("POST", beat, one, _beat("w-one")) == 401  # revoked
        async with http.get(f"{url}/api/v1/workers/w-one") as r:
            assert (await r.json())["status"] == "online"  # the refused calls changed nothing

        async with http.get(f"{url}/metrics") as r:  # the gateway's and, beside it, the registry's
            families = {f.name: f for f in text_string_to_metric_families(await r.text())}
        refused = [s for s in families["registry_http_requests"].samples
                   if s.name.endswith("_total") and s.labels["code"] == "401"]  # fmt: skip
        assert sum(s.value for s in refused) >= 6
        for family in ("registry_workers", "registry_gateway_workers"):  # registry's, gateway's
            online = [s for s in families[family].samples
                      if s.labels == {"status": "online", "capability": "gpu"}]  # fmt: skip
            assert online and online[0].value == 1, family


async def test_open_mode_refuses_to_listen_beyond_loopback(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        *http_command(), "--nats", "nats://127.0.0.1:1", "--host", "0.0.0.0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 30.0)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 2
    assert b"Traceback" not in err and b"--allow-open" in err


@bounded(60)
async def test_a_gateway_waiting_for_nats_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    """Started before NATS, it keeps trying (as every client does); SIGTERM ends it, exit 0."""
    with open(tmp_path / "http.log", "wb") as log:  # noqa: ASYNC230 - a local file, at once
        proc = await asyncio.create_subprocess_exec(
            *http_command(), "--nats", "nats://127.0.0.1:1", "--port", "0",
            stdout=asyncio.subprocess.DEVNULL, stderr=log,
        )  # fmt: skip
    try:
        await asyncio.sleep(2.0)
        assert proc.returncode is None
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 15.0) == 0
        assert b"Traceback" not in (tmp_path / "http.log").read_bytes()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@bounded(60)
async def test_sigterm_with_a_live_feed_open_stops_the_gateway_cleanly(tmp_path: Path) -> None:
    args = ["--port", "0", "--data-dir", str(tmp_path / "data")]
    async with registry_process(args, tmp_path / "registry.log") as reg:
        nats_url = await reg.first_line(timeout=30.0)
        async with (
            gateway(nats_url, tmp_path / "http.log") as (url, proc),
            aiohttp.ClientSession() as http,
            http.get(f"{url}/api/v1/events") as feed,
        ):
            assert (await feed.content.readline()).startswith(b"retry:")
            started = time.monotonic()
            assert await proc.terminate(timeout=15.0) == 0
            assert time.monotonic() - started < 10.0
    assert "Traceback" not in (tmp_path / "http.log").read_text()


async def test_a_taken_port_is_one_line_and_exit_1(nats_server: NatsServer, taken_port: int) -> None:
    proc = await asyncio.create_subprocess_exec(
        *http_command(), "--nats", nats_server.url, "--port", str(taken_port),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 30.0)
    finally:
        if proc.returncode is None:  # never leave a gateway behind, even when this fails
            proc.kill()
            await proc.wait()
    assert proc.returncode == 1
    assert b"Traceback" not in err and str(taken_port).encode() in err.splitlines()[-1]
