"""Named keys: the hashed key file (`vlm keys`), its reloads, scopes, names in logs and metrics, the audit line."""

import asyncio
import json
import logging

import grpc
import pytest
from vlm.v1 import vlm_pb2, vlm_pb2_grpc

from gateway import keys, server as gateway_server
from gateway.keys import KeyFileError, KeyRing, env_entries
from gateway.settings import Settings
from tests.unit.gateway.test_servicer import request, run
from vlm_client import cli


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def add_key(path, name, *options) -> str:
    """`vlm keys add` as an operator runs it: the key it prints."""
    return add_key_output(path, name, *options)[0]


def add_key_output(path, name, *options):
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert cli.main(["keys", "--file", str(path), "add", name, *options]) == 0
    return out.getvalue().strip(), err.getvalue()


def identify(ring, key):
    return asyncio.run(ring.identify(key))


def test_the_file_holds_a_salted_scrypt_hash_and_only_the_right_key_matches(tmp_path):
    path = tmp_path / "keys.jsonl"
    key = add_key(path, "ci-bot", "--requests-per-second", "5", "--burst", "10", "--max-concurrent", "4",
                  "--tokens-per-minute", "20000")
    other = add_key(path, "other")
    text = path.read_text()
    assert key not in text and key.split("_", 2)[2] not in text  # no key, nor its secret part
    [entry, _] = [json.loads(line) for line in text.splitlines()]
    assert entry["hash"].startswith("scrypt$16384$8$1$") and entry["name"] == "ci-bot"
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    ring = KeyRing({}, str(path))
    found = identify(ring, key)
    assert (found.name, found.scope) == ("ci-bot", "user")
    assert found.limits == keys.Limits(5, 10, 4, 20000)
    assert identify(ring, other).name == "other"
    key_id = key.split("_")[1]
    assert identify(ring, f"vlm_{key_id}_{'x' * 32}") is None  # the right id, a wrong secret
    assert identify(ring, key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    assert identify(ring, "vlm_0123456789_" + "y" * 32) is None  # no such id
    assert identify(ring, "not-a-key") is None and identify(ring, None) is None


def test_a_key_is_hashed_once_then_found_by_its_digest(tmp_path, monkeypatch):
    path = tmp_path / "keys.jsonl"
    key = add_key(path, "ci-bot")
    ring = KeyRing({}, str(path))
    hashed = []
    real = keys.verify_key
    monkeypatch.setattr(keys, "verify_key", lambda *args: hashed.append(args) or real(*args))
    wrong = key[:-2] + "zz"
    for _ in range(5):
        assert identify(ring, key).name == "ci-bot"
        assert identify(ring, wrong) is None
    assert len(hashed) == 2  # once for the key, once for the wrong secret


def test_environment_keys_keep_working_named_env_n_with_their_scope():
    ring = KeyRing(env_entries(frozenset({"b-key", "a-key", "root"}), frozenset({"root"})))
    assert [(identify(ring, k).name, identify(ring, k).scope) for k in ("a-key", "b-key", "root")] == [
        ("env-1", "user"), ("env-2", "user"), ("env-3", "admin")]
    assert identify(ring, "c-key") is None and identify(ring, "s\u00e9cret") is None


def test_keys_added_rotated_and_revoked_without_a_restart(tmp_path):
    path = tmp_path / "keys.jsonl"
    path.write_text("")
    clock = Clock()
    ring = KeyRing({}, str(path), clock=clock)
    assert identify(ring, add_key(path, "new")).name == "new"  # an unknown id looks at the file at once
    # Rotation: a new key under the same name (it keeps the name's limits), then the old line deleted.
    first = add_key(path, "ci-bot", "--max-concurrent", "3")
    assert identify(ring, first).limits.max_concurrent == 3
    second = add_key(path, "ci-bot")
    assert identify(ring, second).limits == identify(ring, first).limits
    old_id = first.split("_")[1]
    path.write_text("".join(line + "\n" for line in path.read_text().splitlines() if old_id not in line))
    assert identify(ring, first).name == "ci-bot"  # until the next look at the file
    clock.now += keys.RELOAD_POLL_S
    assert identify(ring, first) is None
    assert identify(ring, second).name == "ci-bot"
    path.write_text("")  # revoked
    clock.now += keys.RELOAD_POLL_S
    assert identify(ring, second) is None


def test_a_bad_file_on_reload_keeps_the_last_good_keys_and_says_why(tmp_path, caplog):
    path = tmp_path / "keys.jsonl"
    key = add_key(path, "ci-bot")
    clock = Clock()
    ring = KeyRing({}, str(path), clock=clock)
    with path.open("a") as file:
        file.write("{not json\n")
    clock.now += keys.RELOAD_POLL_S
    with caplog.at_level(logging.ERROR, "gateway.keys"):
        assert identify(ring, key).name == "ci-bot"
    [record] = caplog.records
    assert "not reloaded" in record.getMessage() and "line 2: not a JSON object" in record.fields["error"]


BAD_FILES = [
    ("{not json", "not a JSON object"),
    ('["a list"]', "not a JSON object"),
    ('{"name": "a b", "id": "0123456789", "hash": "scrypt$1$1$1$eA==$eQ=="}', "name 'a b'"),
    ('{"name": "a", "scope": "root", "id": "0123456789", "hash": "scrypt$1$1$1$eA==$eQ=="}', "scope 'root' must be one of user, admin"),
    ('{"name": "a", "id": "0123456789", "hash": "plain"}', "hash must be 'scrypt$N$r$p$<salt>$<digest>'"),
    ('{"name": "a", "id": "0123456789", "hash": "scrypt$1$1$1$%%%$eQ=="}', "hash must be 'scrypt$N$r$p$<salt>$<digest>' (base64 salt and digest)"),
    ('{"name": "a", "id": "X", "hash": "scrypt$1$1$1$eA==$eQ=="}', "id 'X'"),
    ('{"name": "a", "id": "0123456789", "hash": "scrypt$1$1$1$eA==$eQ==", "max_concurrent": 0}', "max_concurrent must be a positive"),
    ('{"name": "a", "id": "0123456789", "hash": "scrypt$1$1$1$eA==$eQ==", "burst": 3}', "burst needs requests_per_second"),
    ('{"name": "a", "id": "0123456789", "hash": "scrypt$1$1$1$eA==$eQ==", "rps": 3}', "unknown field 'rps'"),
    ('{"name": "a", "id": "0123456789", "hash": "scrypt$1$1$1$eA==$eQ=="}\n{"name": "b", "id": "0123456789", '
     '"hash": "scrypt$1$1$1$eA==$eQ=="}', "id 0123456789 is used twice"),
]


@pytest.mark.parametrize("text,problem", BAD_FILES)
def test_a_bad_key_file_stops_the_start_naming_the_line_and_the_field(tmp_path, text, problem):
    path = tmp_path / "keys.jsonl"
    one_line = "\n" not in text
    path.write_text("# comment\n\n" + text + "\n" if one_line else text)
    with pytest.raises(KeyFileError) as caught:
        asyncio.run(gateway_server.start(Settings(api_keys=frozenset({"k"}), api_keys_file=str(path),
                                                  listen_address="127.0.0.1:0", metrics_port=0)))
    assert problem in str(caught.value) and str(path) in str(caught.value)
    if one_line:
        assert "line 3: " + problem in str(caught.value)


def test_a_missing_key_file_stops_the_start_and_the_key_file_alone_is_enough():
    with pytest.raises(KeyFileError, match="cannot read it.*vlm keys add"):
        KeyRing({}, "/nonexistent/keys.jsonl")
    settings = Settings.from_env({"VLM_API_KEYS_FILE": "/etc/vlm/keys.jsonl"})
    assert settings.api_keys == frozenset() and settings.api_keys_file == "/etc/vlm/keys.jsonl"


def test_vlm_keys_list_shows_names_scopes_and_limits_never_keys(tmp_path, capsys):
    path = tmp_path / "keys.jsonl"
    key = add_key(path, "ci-bot", "--requests-per-second", "2.5", "--max-concurrent", "3")
    add_key(path, "ops", "--scope", "admin")
    assert cli.main(["keys", "--file", str(path), "list"]) == 0
    out = capsys.readouterr().out
    assert key not in out
    lines = out.splitlines()
    assert lines[0].startswith("ci-bot\tscope=user\t") and lines[0].endswith("requests_per_second=2.5 max_concurrent=3")
    assert lines[1].startswith("ops\tscope=admin\t") and lines[1].endswith("unlimited")


def test_names_not_keys_in_log_lines_and_metrics_and_scopes_enforced(tmp_path, caplog):
    path = tmp_path / "keys.jsonl"
    user = add_key(path, "ci-bot")
    admin = add_key(path, "ops", "--scope", "admin")

    async def test(stub, backend, gw, channel):
        answer = await stub.Generate(request(), metadata=(("authorization", f"Bearer {user}"),))
        assert answer.text == "Hello"
        admin_stub = vlm_pb2_grpc.ModelAdminServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await admin_stub.ListBackends(vlm_pb2.ListBackendsRequest(), metadata=(("authorization", f"Bearer {user}"),))
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED and "'ci-bot' is user" in caught.value.details()
        await admin_stub.ListBackends(vlm_pb2.ListBackendsRequest(), metadata=(("authorization", f"Bearer {admin}"),))
        await stub.Generate(request(), metadata=(("authorization", "Bearer secret"),))  # VLM_API_KEYS still works
        assert gw.metrics.registry.get_sample_value("vlm_key_requests_total", {"key": "ci-bot", "code": "OK"}) == 1
        assert gw.metrics.registry.get_sample_value("vlm_key_requests_total", {"key": "env-1", "code": "OK"}) == 1

    from gateway.observability import JsonFormatter

    handler = logging.StreamHandler(stream := __import__("io").StringIO())
    handler.setFormatter(JsonFormatter())
    logging.getLogger().addHandler(handler)
    try:
        with caplog.at_level(logging.INFO):
            run(test, api_keys_file=str(path))
    finally:
        logging.getLogger().removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    done = [line for line in lines if line["message"] == "done"]
    assert [line["key"] for line in done] == ["ci-bot", "env-1"]
    assert user not in stream.getvalue() and admin not in stream.getvalue() and "secret" not in stream.getvalue()


def test_load_model_writes_an_audit_line_who_what_result(tmp_path, caplog):
    path = tmp_path / "keys.jsonl"
    admin = add_key(path, "ops", "--scope", "admin")
    user = add_key(path, "ci-bot")

    async def test(stub, backend, gw, channel):
        loads = []

        async def load_model(name):
            loads.append(name)

        backend.load_model = load_model
        admin_stub = vlm_pb2_grpc.ModelAdminServiceStub(channel)
        key = (("authorization", f"Bearer {admin}"),)
        await admin_stub.LoadModel(vlm_pb2.LoadModelRequest(model="pixtral"), metadata=key)
        assert loads
        with pytest.raises(grpc.aio.AioRpcError):
            await admin_stub.LoadModel(vlm_pb2.LoadModelRequest(model="gpt-4o"), metadata=key)
        with pytest.raises(grpc.aio.AioRpcError):
            await admin_stub.LoadModel(vlm_pb2.LoadModelRequest(model="pixtral"),
                                       metadata=(("authorization", f"Bearer {user}"),))
        assert loads == ["pixtral_preprocess", "pixtral_encoder", "pixtral_embed", "pixtral_generate", "pixtral"]

    with caplog.at_level(logging.INFO, "gateway.audit"):
        run(test, api_keys_file=str(path))
    audit = [record.fields for record in caplog.records if record.name == "gateway.audit"]
    assert audit == [{"key": "ops", "rpc": "LoadModel", "model": "pixtral", "result": "OK"},
                     {"key": "ops", "rpc": "LoadModel", "model": "gpt-4o", "result": "NOT_FOUND"},
                     {"key": "ci-bot", "rpc": "LoadModel", "model": "", "result": "PERMISSION_DENIED"}]
