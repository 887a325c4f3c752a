"""Configuration (`HERALD_*`), development secrets, and the `herald` command as a user runs it.

The CLI runs as real subprocesses with `HERALD_STATE_DIR` in the test's tmp_path,
and the last test is the README's first command end to end: `herald serve`,
`herald token` in another process, connect, receive a published message.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import jwt
import orjson
import pytest
import websockets
from tornado.httpclient import AsyncHTTPClient

from gateway.config import DEV_SECRETS_FILE, ConfigError, Settings, with_dev_secrets
from gateway.security.auth import Authenticator
from gateway.server import start_gateway
from tests.conftest import API_KEY, free_port
from tests.support import public_pem, rsa_key

BIN = Path(sys.executable).parent / "herald"


def herald_cmd() -> list[str]:
    return [str(BIN)] if BIN.exists() else [sys.executable, "-m", "gateway"]


def clean_env(state_dir: Path, **extra: str) -> dict[str, str]:
    """The caller's environment without any HERALD_* setting, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}
    env["HERALD_STATE_DIR"] = str(state_dir)
    env.update(extra)
    return env


def herald(state_dir: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*herald_cmd(), *args], env=clean_env(state_dir, **extra), capture_output=True,
        text=True, timeout=60,
    )


# -- parsing -----------------------------------------------------------------------


def test_env_values_are_parsed_by_type():
    s = Settings.from_env({
        "HERALD_PORT": "9000", "HERALD_HEARTBEAT": "2.5", "HERALD_ALLOW_QUERY_TOKEN": "no",
        "HERALD_DEMO": "on", "HERALD_ALLOWED_ORIGINS": "https://a.test, https://*.b.test,,",
        "HERALD_JWT_ALGORITHMS": "RS256,ES256", "HERALD_NODE_ID": "gw-9",
        "HERALD_REDIS_URL": "redis://r:6379/0", "HERALD_UNKNOWN_THING": "ignored",
    })
    assert (s.port, s.heartbeat, s.allow_query_token, s.demo) == (9000, 2.5, False, True)
    assert s.allowed_origins == ["https://a.test", "https://*.b.test"]
    assert s.jwt_algorithms == ["RS256", "ES256"]
    assert (s.node_id, s.redis_url) == ("gw-9", "redis://r:6379/0")


def test_defaults():
    s = Settings.from_env({})
    assert (s.host, s.port, s.redis_url, s.auth_timeout) == ("0.0.0.0", 8080, "", 10.0)
    assert s.algorithms == ["HS256"]
    assert s.node_id  # from POD_NAME or the hostname


def test_node_id_defaults_to_pod_name(monkeypatch):
    monkeypatch.setenv("POD_NAME", "herald-7f9c-x2")
    assert Settings.from_env({}).node_id == "herald-7f9c-x2"


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("HERALD_PORT", "eighty", "HERALD_PORT='eighty'"),
        ("HERALD_HEARTBEAT", "fast", "HERALD_HEARTBEAT='fast'"),
        ("HERALD_ALLOW_QUERY_TOKEN", "maybe", "expected true/false"),
        ("HERALD_MAX_SUBSCRIPTIONS", "1.5", "invalid literal"),
        # Well-formed but unusable: a typo'd HERALD_ENV, limits that cannot work.
        ("HERALD_ENV", "prodution", "expected development or production"),
        ("HERALD_PORT", "70000", "expected 0-65535"),
        ("HERALD_MAX_SUBSCRIPTIONS", "0", "must be > 0"),
        ("HERALD_RATE_PER_SECOND", "-1", "must be > 0"),
        ("HERALD_AUTH_TIMEOUT", "0", "must be > 0"),
        ("HERALD_HEARTBEAT", "-5", "must be >= 0"),
    ],
)
def test_bad_values_name_the_variable(name, value, says):
    """A malformed or out-of-range value -> ConfigError naming the variable and why."""
    with pytest.raises(ConfigError) as err:
        Settings.from_env({name: value})
    assert name in str(err.value) and says in str(err.value)


def test_zero_heartbeat_and_drain_are_allowed():
    s = Settings.from_env({"HERALD_HEARTBEAT": "0", "HERALD_DRAIN_SECONDS": "0"})
    assert (s.heartbeat, s.drain_seconds) == (0.0, 0.0)


def test_env_file_is_read_and_environment_wins(tmp_path):
    env_file = tmp_path / "herald.env"
    env_file.write_text(
        '# comment\nHERALD_PORT=9100\nHERALD_API_KEY="from-file"\n\n'
        "export HERALD_HEARTBEAT=7\nHERALD_NODE_ID='gw-\"q\"'\nHERALD_JWT_ISSUER=\"half\n"
    )
    s = Settings.from_env({"HERALD_ENV_FILE": str(env_file), "HERALD_PORT": "9200"})
    assert (s.port, s.api_key, s.heartbeat) == (9200, "from-file", 7.0)
    assert (s.node_id, s.jwt_issuer) == ('gw-"q"', '"half')  # one matching pair removed


@pytest.mark.parametrize("line", ["not a line", "HERALD PORT=1", "=s3cret", "9X=1"])
def test_env_file_bad_line_names_file_and_line(tmp_path, line):
    """A line that is not NAME=value stops start-up; it is not echoed (it may hold a secret)."""
    env_file = tmp_path / "herald.env"
    env_file.write_text(f"HERALD_PORT=9100\n{line}\n")
    with pytest.raises(ConfigError) as err:
        Settings.from_env({"HERALD_ENV_FILE": str(env_file)})
    assert f"{env_file}, line 2: expected NAME=value" in str(err.value)
    assert line not in str(err.value)


def test_public_key_defaults_to_asymmetric_algorithms():
    assert Settings(jwt_public_key="pem").algorithms == ["RS256", "ES256"]
    assert Settings(jwt_jwks_url="http://idp/jwks").algorithms == ["RS256", "ES256"]


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        ({"jwt_algorithms": ["none"]}, "must not contain 'none'"),
        ({"jwt_algorithms": ["HS256", "None"]}, "must not contain 'none'"),
        ({"jwt_algorithms": ["RS265"]}, "unknown algorithm 'RS265'"),
        ({"jwt_algorithms": ["HS256", "RS256"], "jwt_public_key": "pem"}, "HS256 cannot be used"),
        ({"jwt_algorithms": ["HS384"], "jwt_jwks_url": "http://idp/jwks"}, "HS384 cannot"),
    ],
)
def test_dangerous_algorithm_settings_are_refused(overrides, says):
    """`none`, typos and HS* next to a public key -> ConfigError at start-up."""
    with pytest.raises(ConfigError, match=says):
        Authenticator(Settings(jwt_secret="s" * 32, **overrides))


# -- development secrets ----------------------------------------------------------------


def test_dev_secrets_are_generated_once_and_private(tmp_path):
    settings = Settings(state_dir=str(tmp_path))
    first, generated = with_dev_secrets(settings)
    assert generated and len(first.jwt_secret) >= 32 and len(first.api_key) >= 32
    path = tmp_path / DEV_SECRETS_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    second, _ = with_dev_secrets(settings)
    assert (second.jwt_secret, second.api_key) == (first.jwt_secret, first.api_key)


def test_configured_secrets_are_kept(tmp_path):
    settings = Settings(state_dir=str(tmp_path), jwt_secret="mine" * 8, api_key="key")
    assert with_dev_secrets(settings) == (settings, False)
    assert not (tmp_path / DEV_SECRETS_FILE).exists()


@pytest.mark.parametrize(
    ("overrides", "missing", "not_missing"),
    [
        ({}, ["HERALD_JWT_SECRET", "HERALD_API_KEY"], []),
        ({"jwt_secret": "x" * 32}, ["HERALD_API_KEY"], ["HERALD_JWT_SECRET"]),
        ({"jwt_public_key": "pem"}, ["HERALD_API_KEY"], ["HERALD_JWT_SECRET"]),
        ({"api_key": "k"}, ["HERALD_JWT_SECRET"], ["HERALD_API_KEY"]),
    ],
)
def test_production_refuses_generated_secrets(tmp_path, overrides, missing, not_missing):
    settings = Settings(env="production", state_dir=str(tmp_path), **overrides)
    with pytest.raises(ConfigError) as err:
        with_dev_secrets(settings)
    needs = str(err.value).partition("needs")[2].partition(";")[0]
    for name in missing:
        assert name in needs
    for name in not_missing:
        assert name not in needs
    assert "refusing to start" in str(err.value)
    assert not (tmp_path / DEV_SECRETS_FILE).exists()


def test_production_with_secrets_starts(tmp_path):
    settings = Settings(env="production", jwt_secret="x" * 32, api_key="k")
    assert with_dev_secrets(settings) == (settings, False)


# -- the herald command ------------------------------------------------------------------


def test_serve_in_production_without_secrets_exits_with_reason(tmp_path):
    result = herald(tmp_path, "serve", "--port", "0", HERALD_ENV="production")
    assert result.returncode != 0
    assert "refusing to start" in result.stderr and "HERALD_API_KEY" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ({"HERALD_PORT": "eighty"}, "HERALD_PORT='eighty'"),
        ({"HERALD_NAMESPACES": "{oops"}, "HERALD_NAMESPACES is not valid"),
        ({"HERALD_JWT_ALGORITHMS": "none"}, "must not contain 'none'"),
        ({"HERALD_ENV": "prodution"}, "expected development or production"),
        ({"HERALD_EVENT_LOOP": "tokio"}, "HERALD_EVENT_LOOP='tokio': expected one of auto"),
    ],
)
def test_serve_with_bad_setting_exits_with_one_line(tmp_path, extra, says):
    result = herald(tmp_path, "serve", "--port", "0", **extra)
    assert result.returncode != 0
    assert says in result.stderr
    assert "Traceback" not in result.stderr


def test_token_and_api_key_share_the_dev_secrets(tmp_path):
    with_dev_secrets(Settings(state_dir=str(tmp_path)))  # what `herald serve` does first
    tok = herald(tmp_path, "token", "--sub", "alice", "--role", "admin",
                 "--channels", "job:42, dashboard:*", "--ttl", "120")
    assert tok.returncode == 0, tok.stderr
    stored = json.loads((tmp_path / DEV_SECRETS_FILE).read_text())
    claims = jwt.decode(tok.stdout.strip(), stored["jwt_secret"], algorithms=["HS256"])
    assert claims["sub"] == "alice"
    assert claims["roles"] == ["admin"]
    assert claims["channels"] == ["job:42", "dashboard:*"]
    assert 100 <= claims["exp"] - claims["iat"] <= 120
    key = herald(tmp_path, "api-key")
    assert key.returncode == 0 and key.stdout.strip() == stored["api_key"]


def test_token_uses_configured_secret_and_claim_names(tmp_path):
    secret = "configured-secret-0123456789abcdefgh"
    tok = herald(tmp_path, "token", "--sub", "bob", "--role", "ops",
                 HERALD_JWT_SECRET=secret, HERALD_JWT_ROLES_CLAIM="perms")
    claims = jwt.decode(tok.stdout.strip(), secret, algorithms=["HS256"])
    assert claims["perms"] == ["ops"] and "roles" not in claims


def test_token_without_a_secret_explains(tmp_path):
    """Only a public key configured -> `herald token` cannot sign, and says why."""
    result = herald(tmp_path, "token", "--sub", "a",
                    HERALD_JWT_PUBLIC_KEY=public_pem(rsa_key()).replace("\n", "\\n"))
    assert result.returncode != 0 and "HERALD_JWT_SECRET" in result.stderr


@pytest.mark.parametrize("command", [["token", "--sub", "a"], ["api-key"], ["check-token", "x"]])
def test_reading_secrets_from_an_empty_state_dir_refuses(tmp_path, command):
    """Another HERALD_STATE_DIR with no secrets: refuse, never mint with fresh secrets that no
    running server shares; nothing is written there."""
    result = herald(tmp_path, *command)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip() == (
        f"herald: no development secrets in {tmp_path / DEV_SECRETS_FILE}: start `herald serve` "
        "with this HERALD_STATE_DIR first (or set HERALD_JWT_SECRET and HERALD_API_KEY)"
    )
    assert not (tmp_path / DEV_SECRETS_FILE).exists()


def test_version(tmp_path):
    from gateway import __version__

    result = herald(tmp_path, "--version")
    assert (result.returncode, result.stdout.strip()) == (0, f"herald {__version__}")


def test_serve_on_a_port_in_use_exits_with_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = herald(tmp_path, "serve", "--host", "127.0.0.1", "--port", str(port))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"herald: cannot listen on 127.0.0.1:{port}: Address already in use "
        "(choose another with --port or HERALD_PORT)"
    )
    assert "Traceback" not in result.stderr
    assert "DEVELOPMENT mode" not in result.stderr  # no banner for a server that never ran


@pytest.mark.parametrize("command", [["serve", "--port", "0"], ["check-config"], ["api-key"]])
def test_missing_env_file_is_one_line(tmp_path, command):
    missing = tmp_path / "nope.env"
    result = herald(tmp_path, *command, HERALD_ENV_FILE=str(missing))
    assert result.returncode == 1
    assert result.stderr == f"herald: HERALD_ENV_FILE={str(missing)!r}: No such file or directory\n"


def test_check_config_prints_effective_settings_masked(tmp_path):
    """Env file (with `export`), environment over it, defaults; secrets never printed."""
    env_file = tmp_path / "herald.env"
    env_file.write_text(
        "export HERALD_PORT=18090\nHERALD_API_KEY=file-key-123456\n"
        "HERALD_REDIS_URL=redis://app:hunter22@redis.test:6379/0\nHERALD_HEARTBEAT=9\n"
    )
    result = herald(tmp_path, "check-config", HERALD_ENV_FILE=str(env_file),
                    HERALD_HEARTBEAT="4", HERALD_JWT_SECRET="env-secret-abcdefghijklmnop")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "configuration is valid; engine: redis" in out.splitlines()[0]
    rows = {line.split("=", 1)[0]: line for line in out.splitlines()[1:]}
    assert rows["HERALD_PORT"].split() == ["HERALD_PORT=18090", f"({env_file})"]
    assert rows["HERALD_HEARTBEAT"].split() == ["HERALD_HEARTBEAT=4.0", "(environment)"]
    assert rows["HERALD_API_KEY"].split() == ["HERALD_API_KEY=****", f"({env_file})"]
    assert rows["HERALD_JWT_SECRET"].split() == ["HERALD_JWT_SECRET=****", "(environment)"]
    assert rows["HERALD_REDIS_URL"].split()[0] == "HERALD_REDIS_URL=redis://app:****@redis.test:6379/0"
    assert rows["HERALD_AUTH_TIMEOUT"].split() == ["HERALD_AUTH_TIMEOUT=10.0", "(default)"]
    for secret in ("file-key-123456", "hunter22", "env-secret-abcdefghijklmnop"):
        assert secret not in out + result.stderr
    assert not (tmp_path / DEV_SECRETS_FILE).exists()  # checking writes nothing


def test_check_config_names_development_secrets_without_creating_them(tmp_path):
    fresh = herald(tmp_path, "check-config")
    assert fresh.returncode == 0, fresh.stderr
    assert "engine: durable" in fresh.stdout.splitlines()[0]
    rows = dict(line.split("=", 1) for line in fresh.stdout.splitlines()[1:])
    note = f"(herald serve generates it into {tmp_path / DEV_SECRETS_FILE})"
    assert rows["HERALD_API_KEY"].strip() == rows["HERALD_JWT_SECRET"].strip() == note
    assert not (tmp_path / DEV_SECRETS_FILE).exists()
    stored, _ = with_dev_secrets(Settings(state_dir=str(tmp_path)))
    again = herald(tmp_path, "check-config")
    assert f"(development secret in {tmp_path / DEV_SECRETS_FILE})" in again.stdout
    assert stored.api_key not in again.stdout and stored.jwt_secret not in again.stdout


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ({"HERALD_ENGINE": "sqlite"}, "HERALD_ENGINE='sqlite': expected one of durable, memory"),
        ({"HERALD_DURABLE_SYNC": "off"}, "HERALD_DURABLE_SYNC='off': expected normal or full"),
        ({"HERALD_ENGINE": "redis"}, "HERALD_ENGINE=redis needs HERALD_REDIS_URL"),
        ({"HERALD_ENGINE": "memory", "HERALD_REDIS_URL": "redis://r"}, "contradicts"),
        ({"HERALD_NAMESPACES": "{oops"}, "HERALD_NAMESPACES is not valid"),
    ],
)
def test_check_config_refuses_what_serve_refuses(tmp_path, extra, says):
    result = herald(tmp_path, "check-config", **extra)
    assert result.returncode == 1 and result.stdout == ""
    assert says in result.stderr and len(result.stderr.splitlines()) == 1


def test_check_token_says_accepted_or_why_not(tmp_path):
    settings, _ = with_dev_secrets(Settings(state_dir=str(tmp_path)))
    good = herald(tmp_path, "token", "--sub", "dana", "--role", "admin",
                  "--channels", "job:42", "--ttl", "600").stdout.strip()
    ok = subprocess.run([*herald_cmd(), "check-token", "-"], input=good + "\n",
                        env=clean_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    lines = ok.stdout.splitlines()
    assert lines[0] == "accepted: sub=dana"
    assert "roles: admin" in ok.stdout and "channels claim: job:42" in ok.stdout
    assert 590 <= int(lines[1].split()[2]) <= 600
    expired = jwt.encode({"sub": "dana", "exp": 1000}, settings.jwt_secret, algorithm="HS256")
    forged = jwt.encode({"sub": "dana", "exp": 2**40}, "not-the-secret" * 4, algorithm="HS256")
    no_sub = jwt.encode({"exp": 2**40}, settings.jwt_secret, algorithm="HS256")
    for token, why in [
        (expired, "token_expired: token has expired"),
        (forged, "unauthorized: token signature is invalid"),
        (no_sub, "unauthorized: token lacks claim 'sub'"),
        ("garbage", "unauthorized: token is not a JWT"),
    ]:
        result = herald(tmp_path, "check-token", token)
        assert (result.returncode, result.stderr) == (1, f"herald: rejected: {why}\n")


def test_token_requires_sub(tmp_path):
    result = herald(tmp_path, "token")
    assert result.returncode == 2 and "--sub" in result.stderr


async def test_token_from_cli_is_accepted_by_the_server(tmp_path, ws_client):
    """`herald token` output verifies against a server using the same state dir."""
    settings, _ = with_dev_secrets(Settings(host="127.0.0.1", port=0, state_dir=str(tmp_path)))
    tok = herald(tmp_path, "token", "--sub", "carol", "--role", "admin",
                 "--channels", "dashboard:*")
    gw = await start_gateway(dataclasses.replace(settings, node_id="gw-cli"))
    try:
        client = await ws_client(gw, tok.stdout.strip(), handshake=False)
        assert (await client.expect("connected"))["user"] == "carol"
        await client.expect("subscribed")
        for channel in ("admin:metrics", "dashboard:sales"):  # role and claim both carried
            reply = await client.request({"type": "subscribe", "channel": channel})
            assert reply["type"] == "subscribed", reply
        await client.close()
    finally:
        await gw.stop()


# -- the README's first command, end to end -----------------------------------------------


async def wait_healthy(url: str, proc: asyncio.subprocess.Process) -> None:
    client = AsyncHTTPClient()
    for _ in range(300):
        assert proc.returncode is None, "herald serve exited early"
        try:
            resp = await client.fetch(url + "/healthz", raise_error=False)
            if resp.code == 200:
                return
        except OSError:
            pass
        await asyncio.sleep(0.1)
    pytest.fail("herald serve did not become healthy")


async def test_herald_serve_end_to_end(tmp_path):
    """Fresh state dir: `herald serve` starts with generated secrets and says how to mint
    a token; a `herald token` from another process connects and receives a publication."""
    port = free_port()
    env = clean_env(tmp_path)
    proc = await asyncio.create_subprocess_exec(
        *herald_cmd(), "serve", "--host", "127.0.0.1", "--port", str(port),
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_healthy(url, proc)
        tok = (await asyncio.to_thread(herald, tmp_path, "token", "--sub", "user-123")).stdout
        key = (await asyncio.to_thread(herald, tmp_path, "api-key")).stdout.strip()
        async with websockets.connect(
            f"ws://127.0.0.1:{port}/ws",
            additional_headers={"Authorization": f"Bearer {tok.strip()}"},
        ) as conn:
            assert orjson.loads(await conn.recv())["type"] == "connected"
            assert orjson.loads(await conn.recv())["channel"] == "user:user-123"
            body = {"channel": "user:user-123", "event": "hello", "data": {"n": 1}}
            resp = await AsyncHTTPClient().fetch(
                url + "/api/v1/publish", method="POST", body=orjson.dumps(body),
                headers={"Authorization": f"apikey {key}"},
            )
            assert resp.code == 200
            msg = orjson.loads(await asyncio.wait_for(conn.recv(), 10))
            assert (msg["type"], msg["event"], msg["data"]) == ("message", "hello", {"n": 1})
        # The discouraged query-string token works, and is not written to the access log.
        async with websockets.connect(f"ws://127.0.0.1:{port}/ws?token={tok.strip()}") as conn:
            assert orjson.loads(await conn.recv())["type"] == "connected"
        # A second server on the same state directory would share the durable engine's file.
        second = await asyncio.to_thread(herald, tmp_path, "serve", "--port", str(free_port()))
        assert second.returncode == 1 and "Traceback" not in second.stderr
        assert second.stderr.strip().splitlines()[-1] == (
            f"herald: {tmp_path / 'engine.sqlite3'} is in use by another herald process: give "
            "this one its own HERALD_STATE_DIR, or HERALD_ENGINE=memory"
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = await asyncio.wait_for(proc.communicate(), 20)
        except TimeoutError:
            proc.kill()
            _, err = await proc.communicate()
    stderr = err.decode()
    assert proc.returncode == 0, stderr
    assert "DEVELOPMENT mode" in stderr and "herald token --sub" in stderr
    secrets_file = tmp_path / DEV_SECRETS_FILE
    assert stat.S_IMODE(secrets_file.stat().st_mode) == 0o600
    assert "GET /ws?token=[redacted]" in stderr  # the access log saw that request...
    assert tok.strip() not in stderr  # ...without the token
    assert json.loads(secrets_file.read_text())["api_key"] not in stderr  # no secret in logs


@pytest.mark.parametrize(("setting", "loop"), [(None, "uvloop"), ("asyncio", "asyncio"),
                                               ("uvloop", "uvloop")])
async def test_serve_runs_on_uvloop_unless_told_otherwise(spawn_gateway, setting, loop):
    """uvloop is a dependency on Linux: `herald serve` uses it by default, the stock loop
    on request, and says which one it runs in its figures."""
    env = {"HERALD_EVENT_LOOP": setting} if setting else {}
    gw = spawn_gateway(f"gw-loop-{loop}", **env)
    resp = await AsyncHTTPClient().fetch(
        gw.url + "/api/v1/stats", headers={"Authorization": f"apikey {API_KEY}"}
    )
    assert orjson.loads(resp.body)["event_loop"] == loop
