"""The files under nats/ are what the `nats` CLI takes, and the registry uses them as they are.

The tests read them where a user of the CLI does, through the repository's
top-level nats/, which is a link to the copy the package ships (registry/nats/).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from nats.aio.client import Client

from registry import definitions
from registry.server.embedded import find_binary
from registry.server.provision import api, provision

REPO_NATS = Path(__file__).resolve().parents[2] / "nats"


def definition(rel: str) -> dict[str, object]:
    return json.loads((REPO_NATS / rel).read_text())


def test_the_repository_nats_folder_is_the_packaged_one_not_a_copy() -> None:
    assert REPO_NATS.is_symlink(), "nats/ must link to registry/nats/, not hold a second copy"
    assert REPO_NATS.resolve() == Path(str(definitions.ROOT)).resolve()
    files = definitions.listing()
    assert {"server.conf", "streams/WORKER_EVENTS.json", "kv/workers.json"} <= set(files)
    for rel in files:
        assert (REPO_NATS / rel).read_bytes() == definitions.ROOT.joinpath(*rel.split("/")).read_bytes()


async def test_stream_files_are_accepted_verbatim_by_the_jetstream_api(nc: Client) -> None:
    # `nats stream add --config FILE` sends the file as the STREAM.CREATE body.
    for rel in ("streams/WORKER_EVENTS.json", "streams/WORKER_AVAILABILITY.json", "kv/workers.json"):
        cfg = definition(rel)
        resp = await api(nc, f"STREAM.CREATE.{cfg['name']}", cfg)
        assert "error" not in resp, resp
        assert {k: resp["config"][k] for k in cfg} == cfg


async def test_consumer_file_is_accepted_verbatim(nc: Client) -> None:
    await provision(nc)
    cfg = definition("consumers/registry-projector.json")
    body = {"stream_name": "WORKER_EVENTS", "config": cfg}
    resp = await api(nc, f"CONSUMER.CREATE.WORKER_EVENTS.{cfg['durable_name']}", body)
    assert "error" not in resp, resp
    assert resp["config"]["ack_policy"] == "all"


async def test_bucket_is_a_standard_kv_bucket(nc: Client) -> None:
    await provision(nc)
    info = await api(nc, "STREAM.INFO.KV_workers")
    assert info["config"]["subjects"] == ["$KV.workers.>"]
    kv = await nc.jetstream().key_value("workers")  # what `nats kv get workers ID` binds to
    await kv.put("w1", b"{}")
    assert (await kv.get("w1")).value == b"{}"
    assert (await kv.status()).bucket == "workers"


async def test_events_stream_captures_only_the_event_subjects(nc: Client) -> None:
    await provision(nc)
    info = await api(nc, "STREAM.INFO.WORKER_EVENTS")
    assert info["config"]["subjects"] == [
        "worker.register.*", "worker.heartbeat.*", "worker.unregister.*", "worker.expired.*",
        "worker.late.*", "worker.cordon.*", "worker.uncordon.*", "worker.drain.*",
    ]  # fmt: skip
    avail = await api(nc, "STREAM.INFO.WORKER_AVAILABILITY")
    assert avail["config"]["subjects"] == ["worker.available.*"]
    assert avail["config"]["max_msgs_per_subject"] == 1


def test_server_conf_is_a_valid_nats_server_config(tmp_path: Path) -> None:
    result = subprocess.run(
        [find_binary(), "-c", str(REPO_NATS / "server.conf"), "-t"],
        capture_output=True, text=True, timeout=10, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
