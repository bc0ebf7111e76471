"""The trust material, without a server: JWTs signed and checked, what init writes,
what a minted credential carries, revocations, and what our clients read from it."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from agent.settings import AgentSettings
from registry.cli import main
from registry.connect import Auth
from registry.trust import jwt
from registry.trust.authdir import AuthDir
from registry.trust.creds import TrustError, creds_claims, creds_text
from registry.trust.roles import ROLES


def test_a_signed_token_verifies_and_a_changed_one_does_not() -> None:
    seed, public = jwt.new_key("account")
    token = jwt.encode({"sub": public, "name": "x", "nats": {"type": "account"}}, seed)
    claims = jwt.decode(token)
    assert (claims["iss"], claims["sub"], claims["name"]) == (public, public, "x")
    header, _, signature = token.split(".")
    forged = jwt.encode({"sub": public, "name": "y"}, jwt.new_key("account")[0]).split(".")[1]
    with pytest.raises(jwt.JwtError):
        jwt.decode(f"{header}.{forged}.{signature}")
    with pytest.raises(jwt.JwtError):
        jwt.decode("not.a.token")
    assert jwt.decode(f"{header}.{forged}.{signature}", verify=False)["name"] == "y"


@pytest.fixture
def auth(tmp_path: Path) -> AuthDir:
    return AuthDir.init(tmp_path / "auth")


def test_init_writes_secret_seeds_and_an_account_with_one_scoped_key_per_role(
    auth: AuthDir,
) -> None:
    for seed in ["operator.nk", "system.nk", "account.nk", "agents.nk", "registry.creds", "admin.creds",
                 "system-user.creds", *(f"signing/{r}.nk" for r in ROLES)]:  # fmt: skip
        assert stat.S_IMODE((auth.root / seed).stat().st_mode) == 0o600, seed
    account = jwt.decode(auth.account_jwt())
    operator = jwt.decode((auth.root / "operator.jwt").read_text())
    assert account["iss"] == operator["sub"] and account["sub"] == auth.account
    agents = jwt.decode(auth.account_jwt("agents"))
    assert agents["iss"] == operator["sub"] and agents["sub"] == auth.agents_account
    scopes = {k["role"]: k for a in (account, agents) for k in a["nats"]["signing_keys"]}
    assert set(scopes) == set(ROLES) and all(k["kind"] == "user_scope" for k in scopes.values())
    assert [k["role"] for k in agents["nats"]["signing_keys"]] == ["agent"]  # agents apart
    # agents reach the registry's account only through these imports
    imported = {(i["subject"], i["type"]) for i in agents["nats"]["imports"]}
    assert imported == {
        ("worker.register.*", "service"),
        ("worker.heartbeat.*", "service"),
        ("worker.unregister.*", "service"),
        ("worker.control.*", "stream"),
    }
    assert (
        "jetstream" not in json.dumps(agents["nats"]["limits"])
        and "disk_storage" not in agents["nats"]["limits"]
    )
    agent = scopes["agent"]["template"]
    assert agent["pub"]["allow"] == [
        f"worker.{k}.{{{{name()}}}}" for k in ("register", "heartbeat", "unregister")
    ]
    assert agent["sub"]["allow"] == ["worker.control.{{name()}}", "_INBOX_{{name()}}.>"]
    conf = (auth.root / "auth.conf").read_text()
    assert auth.account in conf and auth.system_account in conf and "type: full" in conf
    for which, key in (("registry", auth.account), ("agents", auth.agents_account)):
        assert (auth.root / "resolver" / f"{key}.jwt").read_text() == auth.account_jwt(which)
    with pytest.raises(TrustError):
        AuthDir.init(auth.root)  # never overwrites without force


def test_a_minted_agent_carries_its_name_and_no_permissions_of_its_own(auth: AuthDir) -> None:
    claims = creds_claims(auth.mint("agent", "gpu-1"))
    account = jwt.decode(auth.account_jwt("agents"))
    agent_key = next(k["key"] for k in account["nats"]["signing_keys"] if k["role"] == "agent")
    assert claims["name"] == "gpu-1" and claims["iss"] == agent_key
    assert claims["nats"]["issuer_account"] == auth.agents_account
    # a user of a scoped key with permissions or limits of its own is refused by the server
    assert not {"pub", "sub", "subs", "data", "payload"} & set(claims["nats"])
    assert [i.name for i in auth.issued()] == ["registry", "admin", "gpu-1"]
    with pytest.raises(TrustError):
        auth.mint("agent", "two.tokens")
    with pytest.raises(TrustError):
        auth.mint("superuser", "x")
    # one name, one identity (replies come to _INBOX_<name>): no router named like the registry
    with pytest.raises(TrustError):
        auth.mint("router", "registry")
    auth.mint("agent", "registry")  # agents live in their own account: no clash there


def test_revoking_a_name_revokes_every_credential_issued_to_it(auth: AuthDir) -> None:
    auth.mint("agent", "w1")
    auth.mint("agent", "w1")
    auth.mint("agent", "w2")
    iat = jwt.decode(auth.account_jwt("agents"))["iat"]
    revoked = auth.revoke("w1")
    assert len(revoked) == 2 and set(auth.revocations()) == {i.user for i in revoked}
    assert set(auth.revocations("agents")) == set(auth.revocations())  # in the agents' account
    assert jwt.decode(auth.account_jwt("agents"))["iat"] > iat  # servers keep the newer account
    assert [i.name for i in auth.issued() if auth.is_revoked(i)] == ["w1", "w1"]
    assert (
        f'{auth.agents_account}: "{auth.account_jwt("agents")}"'
        in (auth.root / "auth.conf").read_text()
    )
    with pytest.raises(TrustError):
        auth.revoke("nobody")


def test_clients_read_replies_on_their_own_inbox_and_agents_take_their_id(auth: AuthDir) -> None:
    path = auth.root / "w1.creds"
    path.write_text(auth.mint("agent", "w1"))
    a = Auth(creds=str(path))
    assert (a.identity, a.role, a.kwargs()["inbox_prefix"]) == ("w1", "agent", "_INBOX_w1")
    assert AgentSettings(name="x", creds=str(path)).own_worker_id == "w1"
    with pytest.raises(ValueError, match="w1"):
        AgentSettings(name="x", worker_id="w2", creds=str(path))
    admin = Auth(creds=str(auth.root / "admin.creds"))
    assert admin.role == "admin"
    assert (
        AgentSettings(name="x", worker_id="w2", creds=str(auth.root / "admin.creds")).own_worker_id
        == "w2"
    )
    bad = auth.root / "bad.creds"
    bad.write_text("not a credentials file")
    with pytest.raises(ValueError):
        Auth(creds=str(bad))
    with pytest.raises(ValueError):  # a directory: a usage error, not a traceback
        Auth(creds=str(auth.root))
    # credentials made elsewhere (no role tag): the library's default inbox, not a guess
    foreign = auth.root / "foreign.creds"
    token = jwt.encode({"sub": jwt.new_key("user")[1], "name": "alice", "nats": {"type": "user"}},
                       jwt.new_key("account")[0])  # fmt: skip
    foreign.write_text(creds_text(token, jwt.new_key("user")[0]))
    assert "inbox_prefix" not in Auth(creds=str(foreign)).kwargs()


def test_auth_commands_say_what_is_wrong_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = str(tmp_path / "auth")
    assert main(["auth", "mint", "--dir", d, "--role", "router"]) == 1  # nothing there yet
    assert "registry auth init" in capsys.readouterr().err
    assert main(["auth", "init", "--dir", d]) == 0
    assert main(["auth", "init", "--dir", d]) == 1
    assert main(["auth", "mint", "--dir", d, "--role", "agent"]) == 2
    assert main(["auth", "mint", "--dir", d, "--role", "agent", "--worker-id", "a b"]) == 2
    assert main(["auth", "mint", "--dir", d, "--role", "router", "--worker-id", "w1"]) == 2
    assert main(["auth", "mint", "--dir", d, "--role", "router", "--expires", "soon"]) == 2
    capsys.readouterr()
    assert (
        main(["auth", "mint", "--dir", d, "--role", "router", "--name", "r1", "--expires", "1h"])
        == 0
    )
    claims = creds_claims(capsys.readouterr().out)
    assert claims["name"] == "r1" and 3500 < claims["exp"] - claims["iat"] <= 3600
    out = tmp_path / "r2.creds"
    out.write_text("")
    out.chmod(0o644)  # an existing file with a wider mode: the secret must not stay readable
    assert (
        main(["auth", "mint", "--dir", d, "--role", "router", "--name", "r2", "--out", str(out)])
        == 0
    )
    assert (
        stat.S_IMODE(out.stat().st_mode) == 0o600 and creds_claims(out.read_text())["name"] == "r2"
    )
    (tmp_path / "auth" / "agents.jwt").write_text("garbage")
    assert main(["auth", "list", "--dir", d]) == 1  # one line, no traceback
    err = capsys.readouterr().err
    assert "Traceback" not in err


def test_revoking_a_worker_id_leaves_a_router_of_that_name(auth: AuthDir) -> None:
    auth.mint("agent", "edge")
    auth.mint("router", "edge")  # another account: no clash
    assert [i.role for i in auth.revoke("edge", role="agent")] == ["agent"]
    assert [i.role for i in auth.issued() if auth.is_revoked(i)] == ["agent"]


def test_an_auth_dir_from_an_older_version_is_signed_again_with_the_grown_roles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from registry.trust import roles

    older = dict(roles.TEMPLATES)
    operator = json.loads(json.dumps(older["operator"]))
    operator["pub"]["allow"] = [s for s in operator["pub"]["allow"] if "cordon" not in s
                                and "drain" not in s]  # fmt: skip
    monkeypatch.setitem(roles.TEMPLATES, "operator", operator)
    auth = AuthDir.init(tmp_path / "auth")
    auth.mint("agent", "w1")
    auth.revoke(name="w1")
    revoked = auth.revocations()
    monkeypatch.setitem(roles.TEMPLATES, "operator", older["operator"])

    assert auth.refresh() == ["registry"]
    claims = jwt.decode(auth.account_jwt("registry"), verify=False)
    (key,) = [k for k in claims["nats"]["signing_keys"] if k["role"] == "operator"]
    assert "worker.cordon.*" in key["template"]["pub"]["allow"]
    assert auth.revocations() == revoked  # kept
    assert auth.refresh() == []  # nothing more to do
