"""TLS, tried: a nats-server that requires mutual TLS, our clients with the right
files get in (the registry, an agent, a router, the operator commands), and
plaintext, a missing client certificate or one from another CA are refused."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from agent import Agent
from registry.connect import Auth, NatsOptions, connect
from registry.router import Router
from registry.server.embedded import NatsServer
from registry.server.provision import provision
from tests.conftest import eventually
from tests.integration.registry_helpers import bounded, bucket_records, running_registry
from tests.integration.test_ops import run


@dataclass
class Pki:
    ca: Path
    cert: Path
    key: Path
    rogue_cert: Path  # a client certificate from another CA
    rogue_key: Path

    def auth(self) -> Auth:
        return Auth(tls_ca=str(self.ca), tls_cert=str(self.cert), tls_key=str(self.key))

    def flags(self) -> list[str]:
        return ["--tls-ca", str(self.ca), "--tls-cert", str(self.cert), "--tls-key", str(self.key)]


def _pair(ca: trustme.CA, name: str, folder: Path) -> tuple[Path, Path]:
    issued = ca.issue_cert(name, "127.0.0.1", "localhost")
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    return cert, key


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca, rogue = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    cert, key = _pair(ca, "client", tmp_path)
    rogue_cert, rogue_key = _pair(rogue, "rogue", tmp_path)
    _pair(ca, "server", tmp_path)
    return Pki(tmp_path / "ca.pem", cert, key, rogue_cert, rogue_key)


@pytest.fixture
def tls_server(tmp_path: Path, pki: Pki) -> Iterator[NatsServer]:
    conf = tmp_path / "tls.conf"
    conf.write_text(
        "tls {\n"
        f'  cert_file: "{tmp_path / "server.pem"}"\n  key_file: "{tmp_path / "server.key"}"\n'
        f'  ca_file: "{pki.ca}"\n  verify: true\n'
        "}\n"
    )
    server = NatsServer(tmp_path / "nats", config=conf)
    server.start()
    yield server
    server.kill()


def _url(server: NatsServer) -> str:
    return f"tls://127.0.0.1:{server.port}"


@bounded(60)
async def test_registry_agent_and_router_work_over_mutual_tls(
    tls_server: NatsServer, pki: Pki
) -> None:
    url = _url(tls_server)
    tls = {"tls_ca": str(pki.ca), "tls_cert": str(pki.cert), "tls_key": str(pki.key)}
    nc = await connect(NatsOptions.of(url, "test", auth=pki.auth()))
    try:
        async with running_registry(url, caught_up=True, auth=pki.auth()):
            async with Agent(url, name="tls-box", worker_id="tls-box", heartbeat_interval_s=0.5,
                             **tls):  # fmt: skip
                records = await eventually(lambda: bucket_records(nc.jetstream()), timeout=10.0)
                assert records["tls-box"]["status"] == "online"
                async with await Router.connect(url, **tls) as router:
                    await eventually(lambda: router.get("tls-box"), timeout=10.0)
    finally:
        await nc.close()


@bounded(60)
async def test_operator_commands_take_the_tls_flags(
    tls_server: NatsServer, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    nc = await connect(NatsOptions.of(_url(tls_server), "test", auth=pki.auth()))
    try:
        await provision(nc)
    finally:
        await nc.close()
    code, out, _ = await run(capsys, "workers", "--json", "--nats", _url(tls_server), *pki.flags())
    assert code == 0 and json.loads(out) == []


@bounded(60)
@pytest.mark.parametrize("how", ["plaintext", "no client certificate", "another CA"])
async def test_what_the_server_does_not_trust_is_refused(
    tls_server: NatsServer, pki: Pki, capsys: pytest.CaptureFixture[str], how: str
) -> None:
    url, flags = _url(tls_server), []
    if how == "plaintext":
        url = f"nats://127.0.0.1:{tls_server.port}"
    elif how == "no client certificate":
        flags = ["--tls-ca", str(pki.ca)]
    else:
        flags = ["--tls-ca", str(pki.ca), "--tls-cert", str(pki.rogue_cert),
                 "--tls-key", str(pki.rogue_key)]  # fmt: skip
    code, out, err = await run(capsys, "workers", "--nats", url, *flags)
    assert (code, out) == (1, "") and "cannot reach NATS" in err
    assert len(err.strip().splitlines()) == 1


async def test_tls_files_that_do_not_go_together_are_a_usage_error(
    pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = await run(capsys, "workers", "--tls-cert", str(pki.cert))
    assert code == 2 and "--tls-key" in err
    code, _, err = await run(capsys, "workers", "--tls-ca", str(pki.ca), "--tls-cert",
                             str(pki.cert), "--tls-key", str(pki.rogue_key))  # fmt: skip
    assert code == 2 and "TLS files cannot be used" in err
