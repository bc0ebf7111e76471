"""--nkey, tried: a nats-server whose configuration lists nkey users lets in a client
that holds one of their seeds, and refuses one without, or with another seed."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import nkeys
import pytest

from registry.connect import Auth, NatsOptions, connect
from registry.server.embedded import NatsServer
from registry.server.provision import provision
from tests.integration.registry_helpers import bounded
from tests.integration.test_ops import run


def _user(folder: Path, name: str) -> tuple[Path, str]:
    """A user nkey: the seed in a file, and the public key."""
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    path = folder / f"{name}.nk"
    path.write_bytes(seed)
    return path, nkeys.from_seed(bytearray(seed)).public_key.decode()


@pytest.fixture
def users(tmp_path: Path) -> dict[str, Path]:
    known, public = _user(tmp_path, "operator")
    stranger, _ = _user(tmp_path, "stranger")
    return {"known": known, "public": Path(public), "stranger": stranger}


@pytest.fixture
def nkey_server(tmp_path: Path, users: dict[str, Path]) -> Iterator[NatsServer]:
    conf = tmp_path / "nkey.conf"
    conf.write_text(f'authorization {{ users: [ {{ nkey: "{users["public"]}" }} ] }}\n')
    server = NatsServer(tmp_path / "nats", config=conf)
    server.start()
    yield server
    server.kill()


@bounded(30)
async def test_an_nkey_user_gets_in_and_others_are_refused(
    nkey_server: NatsServer, users: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    nc = await connect(NatsOptions.of(nkey_server.url, "test", auth=Auth(nkey=str(users["known"]))))
    try:
        await provision(nc)
    finally:
        await nc.close()
    code, out, _ = await run(capsys, "workers", "--json", "--nats", nkey_server.url,
                             "--nkey", str(users["known"]))  # fmt: skip
    assert code == 0 and json.loads(out) == []
    for flags in ([], ["--nkey", str(users["stranger"])]):
        code, out, err = await run(capsys, "workers", "--nats", nkey_server.url, *flags)
        assert (code, out) == (1, "") and "cannot reach NATS" in err
