"""`ragplane serve` in production shape: an external database URL for the
application role only, RS256 tokens from a JWKS file, no dev mode."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jwt
import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.conftest import PgCluster

RAGPLANE = str(Path(sys.executable).with_name("ragplane"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(base: str, proc: subprocess.Popen[bytes], deadline_s: float = 60) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited early with {proc.returncode}")
        try:
            if httpx.get(f"{base}/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("serve did not become ready")


@pytest.fixture
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def test_serve_with_database_url_connects_only_as_the_app_role(
    pg: PgCluster, tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key()))
    jwk["kid"] = "prod-1"
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [jwk]}))
    port = _free_port()
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("RAGPLANE_") and k != "DATABASE_URL"
    }
    env.update(
        DATABASE_URL=pg.app,
        RAGPLANE_AUTH__JWKS_FILE=str(jwks),
        RAGPLANE_AUTH__ISSUER="https://auth.example.test/",
        RAGPLANE_DATA_DIR=str(tmp_path / "data"),
        RAGPLANE_LOG_LEVEL="warning",
    )
    proc = subprocess.Popen(
        [RAGPLANE, "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(base, proc)
        now = int(time.time())
        token = jwt.encode(
            {
                "iss": "https://auth.example.test/",
                "aud": "ragplane",
                "exp": now + 300,
                "sub": "user-1",
                "tenant_id": "tnt_beta",
                "roles": ["agent"],
            },
            rsa_key,
            algorithm="RS256",
            headers={"kid": "prod-1"},
        )
        r = httpx.get(f"{base}/v1/whoami", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200, r.text
        assert r.json()["tenant_id"] == "tnt_beta"
        assert r.json()["roles"] == ["agent"]
        # not dev mode: no anonymous tenant naming
        r = httpx.get(f"{base}/v1/whoami", headers={"X-Tenant-Id": "tnt_beta"})
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "missing_credentials"
        # every connection the service holds is the application role's
        with psycopg.connect(pg.superuser_url, autocommit=True) as conn:
            roles = {
                row[0]
                for row in conn.execute(
                    "SELECT usename FROM pg_stat_activity WHERE application_name LIKE 'ragplane-%'"
                )
            }
        assert roles == {"ragplane_app"}
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out.decode()
