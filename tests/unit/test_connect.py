"""registry.connect: one builder of connection options for every client."""

from __future__ import annotations

import pytest

from registry.connect import FAIL_FAST, NatsOptions, NatsUrlError, Reconnect, redact, split_servers


def test_several_servers_are_split_on_commas() -> None:
    assert split_servers(" nats://a:4222, tls://b:4223 ,") == ["nats://a:4222", "tls://b:4223"]
    assert split_servers(["nats://a:1"]) == ["nats://a:1"]
    assert split_servers("localhost:4222") == ["localhost:4222"]  # nats-py adds nats://


@pytest.mark.parametrize("bad", ["", " , ", "http://a:4222", "nats://a:4222,ftp://b", "nats://:4222",
                                 "nats://a:0", "nats://a:notaport"])  # fmt: skip
def test_a_bad_server_list_is_refused_naming_the_bad_url(bad: str) -> None:
    with pytest.raises(NatsUrlError) as info:
        split_servers(bad)
    assert isinstance(info.value, ValueError)  # pydantic validators report it as such
    named = [u.strip() for u in bad.split(",") if u.strip() and not u.startswith("nats://a:4222")]
    assert not named or repr(named[0]) in str(info.value)


def test_redact_drops_credentials() -> None:
    assert redact("nats://user:secret@host:4333") == "nats://host:4333"
    assert redact("host") == "nats://host:4222"


def test_long_running_clients_reconnect_forever_with_jitter() -> None:
    options = NatsOptions.of("nats://a:1,nats://b:2", "worker-agent x",
                             reconnect=Reconnect(wait_s=2.0, jitter_s=1.0), ping_interval_s=10)  # fmt: skip
    kw = options.kwargs(drain_timeout=2)
    assert kw["servers"] == ["nats://a:1", "nats://b:2"] and kw["name"] == "worker-agent x"
    assert kw["allow_reconnect"] and kw["max_reconnect_attempts"] == -1
    assert kw["ping_interval"] == 10 and kw["drain_timeout"] == 2

    class Server:
        def __init__(self, reconnects: int) -> None:
            self.reconnects = reconnects

    servers = [Server(3), Server(1), Server(2)]
    for _ in range(50):
        server, delay = kw["reconnect_to_server_handler"](servers, {})
        assert server is servers[1] and 2.0 <= delay <= 3.0


def test_one_shot_commands_fail_fast() -> None:
    kw = NatsOptions.of("nats://a:1", "registry-ops", reconnect=FAIL_FAST).kwargs()
    assert kw["allow_reconnect"] is False and "reconnect_to_server_handler" not in kw
    assert "ping_interval" not in kw  # the library's default
