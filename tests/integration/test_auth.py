"""Edge authentication over HTTP (ASGI) and the real database.

JWTs are verified against a JWKS the test writes itself (RSA and EC keys made
here with ``cryptography``); HS256 only in dev mode with the dev secret. API
keys are created in control.api_keys through the owner role. Every refusal is
asserted by status, stable error code and the request id in body and header.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any

import httpx
import jwt
import psycopg
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fastapi import Depends, FastAPI
from pydantic import BaseModel
from typer.testing import CliRunner

from ragplane.cli import app as cli_app
from ragplane.config import AuthSettings
from ragplane.control.apikeys import create_api_key, revoke_api_key
from ragplane.data import Database
from ragplane.edge.auth import UrlKeySource
from ragplane.edge.context import TenantContext
from ragplane.edge.tenancy import tenant_context
from ragplane.errors import Unauthorized
from ragplane.platform import Platform, create_app
from tests.conftest import PgCluster, make_settings, running

ISSUER = "ragplane"
AUDIENCE = "ragplane"
RSA_KID = "rsa-test-1"
EC_KID = "ec-test-1"
OCT_KID = "oct-shared"
OCT_SECRET = b"a-symmetric-secret-that-must-never-verify-anything"
DROP = object()  # claim value meaning "leave this claim out"

# Marked at collection time (not only by conftest's modifyitems hook): anyio's plugin then keeps
# the parametrize callspecs of async tests instead of replacing them with its backend callspec.


# --- keys, JWKS and tokens ---------------------------------------------------------------------


@dataclass(frozen=True)
class Keys:
    rsa_key: rsa.RSAPrivateKey
    ec_key: ec.EllipticCurvePrivateKey
    intruder: rsa.RSAPrivateKey  # not in any JWKS

    @property
    def rsa_public_pem(self) -> bytes:
        return self.rsa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def jwks(self, *, oct_key: bool = False) -> dict[str, Any]:
        keys = [rsa_jwk(self.rsa_key, RSA_KID), ec_jwk(self.ec_key, EC_KID)]
        if oct_key:
            keys.append({"kty": "oct", "kid": OCT_KID, "k": b64url(OCT_SECRET)})
        return {"keys": keys}


def rsa_jwk(key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    jwk: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk["kid"] = kid
    return jwk


def ec_jwk(key: ec.EllipticCurvePrivateKey, kid: str) -> dict[str, Any]:
    jwk: dict[str, Any] = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    jwk["kid"] = kid
    return jwk


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys(
        rsa_key=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        ec_key=ec.generate_private_key(ec.SECP256R1()),
        intruder=rsa.generate_private_key(public_exponent=65537, key_size=2048),
    )


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segment(obj: Any) -> str:
    return b64url(json.dumps(obj, separators=(",", ":")).encode())


def claims(tenant: Any = "tnt_alpha", **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    values: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "user-42",
        "iat": now,
        "exp": now + 600,
        "tenant_id": tenant,
        "roles": ["reader", "writer"],
    }
    for name, value in overrides.items():
        if value is DROP:
            values.pop(name, None)
        else:
            values[name] = value
    return values


def rs256(k: Keys, payload: dict[str, Any] | None = None, kid: str | None = RSA_KID) -> str:
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(payload or claims(), k.rsa_key, algorithm="RS256", headers=headers)


def es256(k: Keys, payload: dict[str, Any] | None = None, kid: str = EC_KID) -> str:
    return jwt.encode(payload or claims(), k.ec_key, algorithm="ES256", headers={"kid": kid})


def hand_hs256(secret: bytes, header: dict[str, Any], payload: dict[str, Any]) -> str:
    """HS256 by hand (PyJWT refuses PEM-looking HMAC secrets, attackers do not)."""
    signing_input = f"{segment(header)}.{segment(payload)}"
    sig = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(sig)}"


def tamper_signature(token: str) -> str:
    head, payload, sig = token.split(".")
    raw = bytearray(base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4)))
    raw[len(raw) // 2] ^= 0x01
    return f"{head}.{payload}.{b64url(bytes(raw))}"


def tamper_payload(token: str, **changes: Any) -> str:
    head, payload, sig = token.split(".")
    body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    body.update(changes)
    return f"{head}.{segment(body)}.{sig}"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# --- apps ---------------------------------------------------------------------------------------


class TenantBody(BaseModel):
    tenant_id: str | None = None
    note: str = ""


async def _echo(
    body: TenantBody, ctx: Annotated[TenantContext, Depends(tenant_context)]
) -> dict[str, Any]:
    return {"tenant_id": ctx.tenant_id, "region": ctx.region, "auth_method": ctx.auth_method}


ECHO = "/test/echo"


def add_echo_route(app: FastAPI) -> FastAPI:
    """A test-only route with a JSON body, bound to the tenant context (none exists yet)."""
    app.add_api_route(ECHO, _echo, methods=["POST", "PUT", "PATCH", "DELETE"])
    return app


def write_jwks(path: Path, jwks: dict[str, Any]) -> Path:
    path.write_text(json.dumps(jwks))
    return path


@asynccontextmanager
async def edge_app(
    pg: PgCluster,
    tmp_path: Path,
    *,
    jwks: dict[str, Any] | None,
    dev_mode: bool = False,
    **auth: Any,
) -> AsyncIterator[httpx.AsyncClient]:
    if jwks is not None:
        auth["jwks_file"] = write_jwks(tmp_path / "jwks.json", jwks)
    settings = make_settings(pg, tmp_path, dev_mode=dev_mode, auth=AuthSettings(**auth))
    app = add_echo_route(create_app(settings))
    async with running(app) as client:
        client.app = app  # type: ignore[attr-defined]
        yield client


def platform_of(client: httpx.AsyncClient) -> Platform:
    platform: Platform = client.app.state.platform  # type: ignore[attr-defined]
    return platform


@pytest.fixture
async def client(pg: PgCluster, tmp_path: Path, keys: Keys) -> AsyncIterator[httpx.AsyncClient]:
    """A production-mode app (no dev mode) trusting the test JWKS file."""
    async with edge_app(pg, tmp_path, jwks=keys.jwks()) as c:
        yield c


@pytest.fixture
async def dev(pg: PgCluster, tmp_path: Path, keys: Keys) -> AsyncIterator[httpx.AsyncClient]:
    """A dev-mode app that also trusts the test JWKS file."""
    async with edge_app(pg, tmp_path, jwks=keys.jwks(), dev_mode=True) as c:
        yield c


def assert_error(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err: dict[str, Any] = r.json()["error"]
    assert err["code"] == code, err
    assert err["message"]
    assert err["request_id"].startswith("req_")
    assert err["request_id"] == r.headers["x-request-id"]
    if status == 401:
        assert r.headers["www-authenticate"] == "Bearer"
    return err


# --- 1. JWT refusals ----------------------------------------------------------------------------


def _alg_none(k: Keys) -> str:
    return f"{segment({'alg': 'none', 'typ': 'JWT'})}.{segment(claims())}."


def _alg_none_capitalised(k: Keys) -> str:
    return f"{segment({'alg': 'None', 'kid': RSA_KID})}.{segment(claims())}."


def _alg_not_a_string(k: Keys) -> str:
    sig = rs256(k).split(".")[2]
    return f"{segment({'alg': ['RS256'], 'kid': RSA_KID})}.{segment(claims())}.{sig}"


def _no_alg(k: Keys) -> str:
    return f"{segment({'kid': RSA_KID})}.{segment(claims())}.{rs256(k).split('.')[2]}"


def _hs256(k: Keys) -> str:
    return jwt.encode(claims(), OCT_SECRET, algorithm="HS256", headers={"kid": "hs"})


def _hs_rs_confusion(k: Keys) -> str:
    return hand_hs256(k.rsa_public_pem, {"alg": "HS256", "typ": "JWT", "kid": RSA_KID}, claims())


def _rs256_with_ec_kid(k: Keys) -> str:
    return rs256(k, kid=EC_KID)


def _es256_with_rsa_kid(k: Keys) -> str:
    return es256(k, kid=RSA_KID)


def _rs512(k: Keys) -> str:
    return jwt.encode(claims(), k.rsa_key, algorithm="RS512", headers={"kid": RSA_KID})


def _ps256(k: Keys) -> str:
    return jwt.encode(claims(), k.rsa_key, algorithm="PS256", headers={"kid": RSA_KID})


def _expired(k: Keys) -> str:
    now = int(time.time())
    return rs256(k, claims(iat=now - 3600, exp=now - 600))


def _not_yet_valid(k: Keys) -> str:
    now = int(time.time())
    return rs256(k, claims(nbf=now + 600, exp=now + 1200))


def _wrong_aud(k: Keys) -> str:
    return rs256(k, claims(aud="someone-else"))


def _wrong_iss(k: Keys) -> str:
    return es256(k, claims(iss="https://evil.example"))


def _missing(name: str) -> Callable[[Keys], str]:
    def build(k: Keys) -> str:
        return rs256(k, claims(**{name: DROP}))

    return build


def _unknown_kid(k: Keys) -> str:
    return rs256(k, kid="no-such-kid")


def _no_kid(k: Keys) -> str:
    return rs256(k, kid=None)


def _empty_kid(k: Keys) -> str:
    return rs256(k, kid="")


def _kid_not_a_string(k: Keys) -> str:
    sig = rs256(k).split(".")[2]
    return f"{segment({'alg': 'RS256', 'kid': 7})}.{segment(claims())}.{sig}"


def _signed_by_intruder(k: Keys) -> str:
    return jwt.encode(claims(), k.intruder, algorithm="RS256", headers={"kid": RSA_KID})


def _embedded_jwk(k: Keys) -> str:
    """The token carries its own key (jwk header): it must not be trusted."""
    header = {"kid": RSA_KID, "jwk": rsa_jwk(k.intruder, RSA_KID)}
    return jwt.encode(claims(), k.intruder, algorithm="RS256", headers=header)


def _tampered_signature(k: Keys) -> str:
    return tamper_signature(rs256(k))


def _tampered_payload(k: Keys) -> str:
    return tamper_payload(rs256(k), tenant_id="tnt_beta")


def _tampered_payload_es(k: Keys) -> str:
    return tamper_payload(es256(k), roles=["admin"])


def _tenant(value: Any) -> Callable[[Keys], str]:
    def build(k: Keys) -> str:
        return rs256(k, claims(tenant=value))

    return build


def _no_tenant(k: Keys) -> str:
    return rs256(k, claims(tenant_id=DROP))


JWT_REFUSALS = [
    pytest.param(_alg_none, "unsupported_alg", id="alg-none"),
    pytest.param(_alg_none_capitalised, "unsupported_alg", id="alg-None-with-kid"),
    pytest.param(_alg_not_a_string, "unsupported_alg", id="alg-not-a-string"),
    pytest.param(_no_alg, "unsupported_alg", id="no-alg"),
    pytest.param(_hs256, "unsupported_alg", id="hs256-outside-dev-mode"),
    pytest.param(_hs_rs_confusion, "unsupported_alg", id="hs256-keyed-with-rsa-public-pem"),
    pytest.param(_rs256_with_ec_kid, "key_mismatch", id="rs256-names-ec-kid"),
    pytest.param(_es256_with_rsa_kid, "key_mismatch", id="es256-names-rsa-kid"),
    pytest.param(_rs512, "unsupported_alg", id="rs512"),
    pytest.param(_ps256, "unsupported_alg", id="ps256"),
    pytest.param(_expired, "token_expired", id="expired"),
    pytest.param(_not_yet_valid, "token_not_yet_valid", id="nbf-in-the-future"),
    pytest.param(_wrong_aud, "invalid_audience", id="wrong-aud"),
    pytest.param(_wrong_iss, "invalid_issuer", id="wrong-iss"),
    pytest.param(_missing("exp"), "missing_claim", id="missing-exp"),
    pytest.param(_missing("iss"), "missing_claim", id="missing-iss"),
    pytest.param(_missing("aud"), "missing_claim", id="missing-aud"),
    pytest.param(_unknown_kid, "unknown_key", id="unknown-kid"),
    pytest.param(_no_kid, "unknown_key", id="no-kid"),
    pytest.param(_empty_kid, "unknown_key", id="empty-kid"),
    pytest.param(_kid_not_a_string, "invalid_token", id="kid-not-a-string"),
    pytest.param(_signed_by_intruder, "invalid_signature", id="signed-by-another-key"),
    pytest.param(_embedded_jwk, "invalid_signature", id="embedded-jwk-header-ignored"),
    pytest.param(_tampered_signature, "invalid_signature", id="tampered-signature"),
    pytest.param(_tampered_payload, "invalid_signature", id="tampered-payload-tenant"),
    pytest.param(_tampered_payload_es, "invalid_signature", id="tampered-payload-es256"),
    pytest.param(_no_tenant, "missing_tenant", id="missing-tenant-claim"),
    pytest.param(_tenant("TNT_ALPHA"), "missing_tenant", id="tenant-uppercase"),
    pytest.param(_tenant("tnt alpha"), "missing_tenant", id="tenant-with-space"),
    pytest.param(_tenant("tnt_alpha'--"), "missing_tenant", id="tenant-sql-ish"),
    pytest.param(_tenant("x"), "missing_tenant", id="tenant-too-short"),
    pytest.param(_tenant(123), "missing_tenant", id="tenant-not-a-string"),
    pytest.param(_tenant(["tnt_alpha"]), "missing_tenant", id="tenant-a-list"),
    pytest.param(lambda k: "garbage", "invalid_token", id="garbage"),
    pytest.param(lambda k: "a.b.c", "invalid_token", id="garbage-three-segments"),
    pytest.param(lambda k: "..", "invalid_token", id="empty-segments"),
    pytest.param(
        lambda k: f"{segment([1, 2])}.{segment(claims())}.", "invalid_token", id="hdr-list"
    ),
]


@pytest.mark.parametrize(("build", "code"), JWT_REFUSALS)
async def test_jwt_refusals(
    client: httpx.AsyncClient, keys: Keys, build: Callable[[Keys], str], code: str
) -> None:
    r = await client.get("/v1/whoami", headers=bearer(build(keys)))
    assert_error(r, 401, code)


@pytest.mark.parametrize(
    "authorization",
    [
        pytest.param("Basic dXNlcjpwYXNz", id="basic"),
        pytest.param("Token abc.def.ghi", id="other-scheme"),
        pytest.param("Bearer", id="bearer-without-credential"),
        pytest.param("Bearer    ", id="bearer-blank"),
        pytest.param("rpk_abc_def", id="no-scheme"),
    ],
)
async def test_wrong_authorization_scheme_is_refused(
    client: httpx.AsyncClient, authorization: str
) -> None:
    r = await client.get("/v1/whoami", headers={"Authorization": authorization})
    assert_error(r, 401, "invalid_token")


@pytest.mark.parametrize(
    ("build", "code"),
    [
        # dev mode holds the dev HS256 secret: a token keyed with the RSA public key, or with a
        # JWKS oct key, still fails signature verification against that secret
        pytest.param(_hs_rs_confusion, "invalid_signature", id="hs256-keyed-with-rsa-public-pem"),
        pytest.param(_hs256, "invalid_signature", id="hs256-with-foreign-secret"),
        pytest.param(_alg_none, "unsupported_alg", id="alg-none"),
        pytest.param(_rs256_with_ec_kid, "key_mismatch", id="rs256-names-ec-kid"),
        pytest.param(_tampered_payload, "invalid_signature", id="tampered-payload-tenant"),
        pytest.param(_expired, "token_expired", id="expired"),
    ],
)
async def test_jwt_refusals_in_dev_mode(
    dev: httpx.AsyncClient, keys: Keys, build: Callable[[Keys], str], code: str
) -> None:
    r = await dev.get("/v1/whoami", headers=bearer(build(keys)))
    assert_error(r, 401, code)


def _oct_hs256() -> str:
    return jwt.encode(claims(), OCT_SECRET, algorithm="HS256", headers={"kid": OCT_KID})


@pytest.mark.parametrize(
    ("dev_mode", "code"), [(False, "unsupported_alg"), (True, "invalid_signature")]
)
async def test_oct_key_in_jwks_never_makes_hs256_acceptable(
    pg: PgCluster, tmp_path: Path, keys: Keys, dev_mode: bool, code: str
) -> None:
    async with edge_app(pg, tmp_path, jwks=keys.jwks(oct_key=True), dev_mode=dev_mode) as c:
        r = await c.get("/v1/whoami", headers=bearer(_oct_hs256()))
        assert_error(r, 401, code)
        # the oct key is not a verification key at all, whatever alg the token claims
        r = await c.get("/v1/whoami", headers=bearer(rs256(keys, kid=OCT_KID)))
        assert_error(r, 401, "unknown_key")
        # while the asymmetric keys of the same JWKS still verify
        r = await c.get("/v1/whoami", headers=bearer(rs256(keys)))
        assert r.status_code == 200, r.text


# --- 2. valid tokens ----------------------------------------------------------------------------


async def test_rs256_token_from_jwks_is_accepted(client: httpx.AsyncClient, keys: Keys) -> None:
    token = rs256(keys, claims("tnt_alpha", scope="docs:read chat", region="us"))
    r = await client.get("/v1/whoami", headers=bearer(token))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tenant_id"] == "tnt_alpha"
    assert body["subject"] == "user-42"
    assert body["roles"] == ["reader", "writer"]
    assert body["scopes"] == ["docs:read", "chat"]
    assert body["region"] == "eu"  # from the registry, not the token's "region" claim
    assert body["data_class"] == "standard"
    assert body["auth_method"] == "jwt"
    assert body["request_id"] == r.headers["x-request-id"]


async def test_es256_token_from_jwks_is_accepted(client: httpx.AsyncClient, keys: Keys) -> None:
    r = await client.get("/v1/whoami", headers=bearer(es256(keys, claims("tnt_gamma"))))
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["tenant_id"], body["region"], body["auth_method"]) == ("tnt_gamma", "us", "jwt")
    assert body["roles"] == ["reader", "writer"]


async def test_expiry_within_leeway_is_accepted(client: httpx.AsyncClient, keys: Keys) -> None:
    now = int(time.time())
    r = await client.get("/v1/whoami", headers=bearer(rs256(keys, claims(exp=now - 5))))
    assert r.status_code == 200, r.text


async def test_audience_list_containing_ours_is_accepted(
    client: httpx.AsyncClient, keys: Keys
) -> None:
    token = rs256(keys, claims(aud=["other", AUDIENCE]))
    r = await client.get("/v1/whoami", headers=bearer(token))
    assert r.status_code == 200, r.text


async def test_bearer_scheme_is_case_insensitive(client: httpx.AsyncClient, keys: Keys) -> None:
    r = await client.get("/v1/whoami", headers={"Authorization": f"bearer {rs256(keys)}"})
    assert r.status_code == 200, r.text


async def test_hs256_dev_token_only_in_dev_mode(pg: PgCluster, tmp_path: Path, keys: Keys) -> None:
    async with edge_app(pg, tmp_path, jwks=keys.jwks(), dev_mode=True) as c:
        dev_keys = platform_of(c).dev_keys
        assert dev_keys is not None
        token = dev_keys.mint("tnt_beta", issuer=ISSUER, audience=AUDIENCE, ttl_s=600, alg="HS256")
        assert jwt.get_unverified_header(token)["alg"] == "HS256"
        r = await c.get("/v1/whoami", headers=bearer(token))
        assert r.status_code == 200, r.text
        assert (r.json()["tenant_id"], r.json()["auth_method"]) == ("tnt_beta", "jwt")
    # the same data directory (and dev-keys.json) served without dev mode
    async with edge_app(pg, tmp_path, jwks=keys.jwks(), dev_mode=False) as c:
        r = await c.get("/v1/whoami", headers=bearer(token))
        assert_error(r, 401, "unsupported_alg")


def _cli_token(data_dir: Path, tenant: str, monkeypatch: pytest.MonkeyPatch) -> str:
    for name in list(os.environ):
        if name.startswith("RAGPLANE_") or name == "DATABASE_URL":
            monkeypatch.delenv(name)
    monkeypatch.chdir(data_dir)
    result = CliRunner().invoke(
        cli_app, ["token", "--tenant", tenant, "--data-dir", str(data_dir), "--role", "viewer"]
    )
    assert result.exit_code == 0, result.output
    return result.stdout.strip().splitlines()[-1]


async def test_dev_es256_token_accepted_in_dev_mode_only(
    pg: PgCluster, tmp_path: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with edge_app(pg, tmp_path, jwks=None, dev_mode=True) as c:
        printed = platform_of(c).dev_token("tnt_acme_eu")
        from_cli = _cli_token(tmp_path, "tnt_globex_us", monkeypatch)
        assert jwt.get_unverified_header(printed)["alg"] == "ES256"
        r = await c.get("/v1/whoami", headers=bearer(printed))
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["tenant_id"], body["region"], body["roles"]) == (
            "tnt_acme_eu",
            "eu",
            ["admin"],
        )
        assert body["auth_method"] == "jwt"
        r = await c.get("/v1/whoami", headers=bearer(from_cli))
        assert r.status_code == 200, r.text
        assert (r.json()["tenant_id"], r.json()["region"]) == ("tnt_globex_us", "us")
        assert r.json()["roles"] == ["viewer"]
    # a non-dev app over the same data directory does not trust the dev key
    async with edge_app(pg, tmp_path, jwks=keys.jwks()) as c:
        for token in (printed, from_cli):
            r = await c.get("/v1/whoami", headers=bearer(token))
            assert_error(r, 401, "unknown_key")
    async with edge_app(pg, tmp_path, jwks=None) as c:
        r = await c.get("/v1/whoami", headers=bearer(printed))
        assert_error(r, 401, "unknown_key")


async def test_dev_token_from_another_data_dir_is_refused(
    pg: PgCluster, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    async with edge_app(pg, tmp_path_factory.mktemp("other-dev"), jwks=None, dev_mode=True) as c:
        foreign = platform_of(c).dev_token("tnt_alpha")
    async with edge_app(pg, tmp_path, jwks=None, dev_mode=True) as c:
        r = await c.get("/v1/whoami", headers=bearer(foreign))
        assert_error(r, 401, "unknown_key")


async def test_jwks_file_rotation_without_restart(
    pg: PgCluster, tmp_path: Path, keys: Keys
) -> None:
    new_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    new_token = jwt.encode(claims("tnt_beta"), new_key, algorithm="RS256", headers={"kid": "rsa-2"})
    async with edge_app(pg, tmp_path, jwks=keys.jwks()) as c:
        assert (await c.get("/v1/whoami", headers=bearer(rs256(keys)))).status_code == 200
        assert_error(await c.get("/v1/whoami", headers=bearer(new_token)), 401, "unknown_key")

        # rotate: atomic replace, the old RSA key retired, the new one published
        path = tmp_path / "jwks.json"
        old_mtime_ns = path.stat().st_mtime_ns
        staging = write_jwks(tmp_path / "jwks.json.new", {"keys": [rsa_jwk(new_key, "rsa-2")]})
        os.replace(staging, path)
        # a coarse-mtime filesystem must not hide the change from this test
        bumped = old_mtime_ns + 2_000_000_000
        os.utime(path, ns=(bumped, bumped))

        r = await c.get("/v1/whoami", headers=bearer(new_token))
        assert r.status_code == 200, r.text
        assert r.json()["tenant_id"] == "tnt_beta"
        assert_error(await c.get("/v1/whoami", headers=bearer(rs256(keys))), 401, "unknown_key")


async def test_broken_jwks_file_at_runtime_is_not_a_500(
    pg: PgCluster, tmp_path: Path, keys: Keys
) -> None:
    async with edge_app(pg, tmp_path, jwks=keys.jwks()) as c:
        path = tmp_path / "jwks.json"
        assert (await c.get("/v1/whoami", headers=bearer(rs256(keys)))).status_code == 200
        mtime_ns = path.stat().st_mtime_ns
        for broken in ('{"keys": [', "[]", '{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}'):
            path.write_text(broken)
            mtime_ns += 1_000_000_000
            os.utime(path, ns=(mtime_ns, mtime_ns))
            r = await c.get("/v1/whoami", headers=bearer(rs256(keys)))
            # half-written or emptied file: the last good keys keep verifying
            assert r.status_code == 200, (broken, r.text)
        path.unlink()
        assert (await c.get("/v1/whoami", headers=bearer(rs256(keys)))).status_code == 200
        # and once a good file is back, it is what counts
        write_jwks(path, {"keys": [ec_jwk(keys.ec_key, EC_KID)]})
        os.utime(path, ns=(mtime_ns + 10**9, mtime_ns + 10**9))
        assert (await c.get("/v1/whoami", headers=bearer(es256(keys)))).status_code == 200
        assert_error(await c.get("/v1/whoami", headers=bearer(rs256(keys))), 401, "unknown_key")


# --- 3. JWKS URL --------------------------------------------------------------------------------


@dataclass
class FakeClock:
    now: float = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """The clock UrlKeySource reads (only that module's view of ``time``)."""
    fake = FakeClock()
    monkeypatch.setattr("ragplane.edge.auth.time", SimpleNamespace(monotonic=fake.monotonic))
    return fake


@dataclass
class JwksEndpoint:
    jwks: Any
    status: int = 200
    hits: int = 0
    fail_connect: bool = False

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.hits += 1
        if self.fail_connect:
            raise httpx.ConnectError("connection refused", request=request)
        if isinstance(self.jwks, str):
            return httpx.Response(self.status, text=self.jwks)
        return httpx.Response(self.status, json=self.jwks)


JWKS_URL = "https://idp.example/.well-known/jwks.json"


async def test_url_key_source_caches_and_refetches_unknown_kid_rate_limited(
    keys: Keys, clock: FakeClock
) -> None:
    endpoint = JwksEndpoint({"keys": [rsa_jwk(keys.rsa_key, RSA_KID)]})
    async with httpx.AsyncClient(transport=httpx.MockTransport(endpoint.handle)) as http:
        source = UrlKeySource(JWKS_URL, http, cache_s=300, min_refresh_s=30)
        assert endpoint.hits == 0  # nothing fetched before the first token
        first = await source.get(RSA_KID)
        assert first is not None
        assert first.key_type == "RSA"
        assert endpoint.hits == 1
        assert await source.get(RSA_KID) is not None
        assert endpoint.hits == 1  # cached

        # the IdP publishes a new key; a token naming it arrives right after our fetch
        endpoint.jwks = keys.jwks()
        clock.now += 5
        assert await source.get(EC_KID) is None
        assert endpoint.hits == 1  # rate-limited: no refetch within min_refresh_s
        clock.now += 30
        ec_key = await source.get(EC_KID)
        assert ec_key is not None
        assert ec_key.key_type == "EC"
        assert endpoint.hits == 2  # exactly one refetch for the unknown kid

        # a flood of unknown kids costs at most one fetch per interval
        for _ in range(5):
            assert await source.get("nope") is None
        assert endpoint.hits == 2
        clock.now += 31
        for _ in range(5):
            assert await source.get("nope") is None
        assert endpoint.hits == 3

        # known kids are refetched only when the cache expires
        clock.now += 299
        assert await source.get(RSA_KID) is not None
        assert endpoint.hits == 3
        clock.now += 2
        assert await source.get(RSA_KID) is not None
        assert endpoint.hits == 4


@pytest.mark.parametrize(
    "endpoint",
    [
        pytest.param(JwksEndpoint(None, fail_connect=True), id="connection-refused"),
        pytest.param(JwksEndpoint({"error": "down"}, status=503), id="http-503"),
        pytest.param(JwksEndpoint("<html>oops</html>"), id="not-json"),
        pytest.param(JwksEndpoint([]), id="json-list"),
        pytest.param(JwksEndpoint({"keys": 5}), id="keys-not-a-list"),
        pytest.param(JwksEndpoint({"keys": []}), id="no-keys"),
        pytest.param(JwksEndpoint({"keys": [{"kty": "oct", "kid": "x", "k": "c2Vj"}]}), id="oct"),
    ],
)
async def test_url_key_source_unavailable(endpoint: JwksEndpoint, clock: FakeClock) -> None:
    async with httpx.AsyncClient(transport=httpx.MockTransport(endpoint.handle)) as http:
        source = UrlKeySource(JWKS_URL, http)
        with pytest.raises(Unauthorized) as exc_info:
            await source.get(RSA_KID)
        assert exc_info.value.code == "jwks_unavailable"
        assert endpoint.hits == 1
        # retried soon after: still "unavailable" (not "unknown key"), and no hammering
        clock.now += 1
        with pytest.raises(Unauthorized) as exc_info:
            await source.get(RSA_KID)
        assert exc_info.value.code == "jwks_unavailable"
        assert endpoint.hits == 1


async def test_url_key_source_recovers_when_endpoint_returns(keys: Keys, clock: FakeClock) -> None:
    endpoint = JwksEndpoint(None, fail_connect=True)
    async with httpx.AsyncClient(transport=httpx.MockTransport(endpoint.handle)) as http:
        source = UrlKeySource(JWKS_URL, http, min_refresh_s=30)
        with pytest.raises(Unauthorized):
            await source.get(RSA_KID)
        endpoint.fail_connect = False
        endpoint.jwks = keys.jwks()
        clock.now += 31
        assert await source.get(RSA_KID) is not None
        assert endpoint.hits == 2


@dataclass
class LoopbackJwks:
    jwks: Any
    status: int = 200
    hits: int = 0
    paths: list[str] = field(default_factory=list)


@contextmanager
def serve_jwks(state: LoopbackJwks) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 (a thread) serving ``state.jwks``."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.hits += 1
            state.paths.append(self.path)
            body = json.dumps(state.jwks).encode()
            self.send_response(state.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/.well-known/jwks.json"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


async def test_jwks_url_over_real_http(pg: PgCluster, tmp_path: Path, keys: Keys) -> None:
    state = LoopbackJwks(keys.jwks())
    with serve_jwks(state) as url:
        async with edge_app(pg, tmp_path, jwks=None, jwks_url=url) as c:
            assert state.hits == 0
            r = await c.get("/v1/whoami", headers=bearer(es256(keys, claims("tnt_gamma"))))
            assert r.status_code == 200, r.text
            assert (r.json()["tenant_id"], r.json()["region"]) == ("tnt_gamma", "us")
            r = await c.get("/v1/whoami", headers=bearer(rs256(keys)))
            assert r.status_code == 200, r.text
            assert state.hits == 1
            assert state.paths == ["/.well-known/jwks.json"]
            # an unknown kid right after a fetch is refused without hitting the IdP again
            r = await c.get("/v1/whoami", headers=bearer(rs256(keys, kid="rotated-in")))
            assert_error(r, 401, "unknown_key")
            assert state.hits == 1
            # key confusion through a URL JWKS is refused the same way
            r = await c.get("/v1/whoami", headers=bearer(_hs_rs_confusion(keys)))
            assert_error(r, 401, "unsupported_alg")


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def test_jwks_url_down_is_jwks_unavailable(pg: PgCluster, tmp_path: Path, keys: Keys) -> None:
    url = f"http://127.0.0.1:{_closed_port()}/jwks.json"
    async with edge_app(pg, tmp_path, jwks=None, jwks_url=url) as c:
        for _ in range(2):
            r = await c.get("/v1/whoami", headers=bearer(rs256(keys)))
            assert_error(r, 401, "jwks_unavailable")


async def test_jwks_url_serving_errors_is_jwks_unavailable(
    pg: PgCluster, tmp_path: Path, keys: Keys
) -> None:
    state = LoopbackJwks({"error": "maintenance"}, status=503)
    with serve_jwks(state) as url:
        async with edge_app(pg, tmp_path, jwks=None, jwks_url=url) as c:
            r = await c.get("/v1/whoami", headers=bearer(rs256(keys)))
            assert_error(r, 401, "jwks_unavailable")
            assert state.hits == 1


# --- 4. tenant binding --------------------------------------------------------------------------


async def test_body_tenant_other_than_token_tenant_is_403(
    client: httpx.AsyncClient, keys: Keys
) -> None:
    token = rs256(keys, claims("tnt_alpha"))
    r = await client.post(ECHO, headers=bearer(token), json={"tenant_id": "tnt_beta"})
    assert_error(r, 403, "tenant_mismatch")
    r = await client.post(ECHO, headers=bearer(token), json={"tenant_id": "tnt_alpha"})
    assert r.status_code == 200, r.text
    assert r.json() == {"tenant_id": "tnt_alpha", "region": "eu", "auth_method": "jwt"}
    r = await client.post(ECHO, headers=bearer(token), json={"note": "no tenant named"})
    assert r.status_code == 200, r.text
    assert r.json()["tenant_id"] == "tnt_alpha"


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
async def test_body_tenant_checked_for_every_method_with_a_body(
    client: httpx.AsyncClient, keys: Keys, method: str
) -> None:
    token = rs256(keys, claims("tnt_alpha"))
    r = await client.request(method, ECHO, headers=bearer(token), json={"tenant_id": "tnt_beta"})
    assert_error(r, 403, "tenant_mismatch")
    r = await client.request(method, ECHO, headers=bearer(token), json={"tenant_id": "tnt_alpha"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/json; charset=utf-8",
        "Application/JSON",
        "APPLICATION/JSON; charset=UTF-8",
        "application/merge-patch+json",
    ],
)
async def test_body_tenant_checked_for_every_json_content_type(
    client: httpx.AsyncClient, keys: Keys, content_type: str
) -> None:
    headers = {**bearer(rs256(keys)), "Content-Type": content_type}
    body = json.dumps({"tenant_id": "tnt_beta"})
    r = await client.post(ECHO, headers=headers, content=body)
    assert_error(r, 403, "tenant_mismatch")


@pytest.mark.parametrize(
    ("header", "status"),
    [("tnt_beta", 403), ("TNT_ALPHA", 403), ("tnt_alpha", 200)],
)
async def test_tenant_header_must_match_token(
    client: httpx.AsyncClient, keys: Keys, header: str, status: int
) -> None:
    r = await client.get("/v1/whoami", headers={**bearer(rs256(keys)), "X-Tenant-Id": header})
    if status == 403:
        assert_error(r, 403, "tenant_mismatch")
    else:
        assert r.status_code == 200, r.text
        assert r.json()["tenant_id"] == "tnt_alpha"


async def test_repeated_tenant_headers_are_all_checked(
    client: httpx.AsyncClient, keys: Keys
) -> None:
    headers = [
        ("Authorization", f"Bearer {rs256(keys)}"),
        ("X-Tenant-Id", "tnt_alpha"),
        ("X-Tenant-Id", "tnt_beta"),
    ]
    r = await client.get("/v1/whoami", headers=headers)
    assert_error(r, 403, "tenant_mismatch")


async def test_header_and_body_naming_token_tenant_is_accepted(
    client: httpx.AsyncClient, keys: Keys
) -> None:
    headers = {**bearer(es256(keys, claims("tnt_gamma"))), "X-Tenant-Id": "tnt_gamma"}
    r = await client.post(ECHO, headers=headers, json={"tenant_id": "tnt_gamma"})
    assert r.status_code == 200, r.text
    assert r.json() == {"tenant_id": "tnt_gamma", "region": "us", "auth_method": "jwt"}
    r = await client.post(
        ECHO, headers={**headers, "X-Tenant-Id": "tnt_alpha"}, json={"tenant_id": "tnt_gamma"}
    )
    assert_error(r, 403, "tenant_mismatch")


async def test_client_region_header_is_ignored(client: httpx.AsyncClient, keys: Keys) -> None:
    token = rs256(keys, claims("tnt_globex_us"))
    for name in ("X-Region", "X-Tenant-Region", "X-Ragplane-Region"):
        r = await client.get("/v1/whoami", headers={**bearer(token), name: "eu"})
        assert r.status_code == 200, r.text
        assert r.json()["region"] == "us"


async def test_token_for_unregistered_tenant_is_403(client: httpx.AsyncClient, keys: Keys) -> None:
    r = await client.get("/v1/whoami", headers=bearer(rs256(keys, claims("tnt_nobody"))))
    err = assert_error(r, 403, "unknown_tenant")
    assert "tnt_nobody" in err["message"]


@pytest.fixture
def suspended_beta(pg: PgCluster) -> Iterator[str]:
    with psycopg.connect(pg.owner, autocommit=True) as conn:
        conn.execute("UPDATE control.tenants SET status = 'suspended' WHERE id = 'tnt_beta'")
        try:
            yield "tnt_beta"
        finally:
            conn.execute("UPDATE control.tenants SET status = 'active' WHERE id = 'tnt_beta'")


async def test_suspended_tenant_is_403(
    client: httpx.AsyncClient, keys: Keys, suspended_beta: str
) -> None:
    r = await client.get("/v1/whoami", headers=bearer(rs256(keys, claims(suspended_beta))))
    err = assert_error(r, 403, "tenant_suspended")
    assert "suspended" in err["message"]


async def test_suspension_takes_effect_and_lifts_without_restart(
    client: httpx.AsyncClient, keys: Keys, pg: PgCluster
) -> None:
    token = rs256(keys, claims("tnt_beta"))
    assert (await client.get("/v1/whoami", headers=bearer(token))).status_code == 200
    with psycopg.connect(pg.owner, autocommit=True) as conn:
        conn.execute("UPDATE control.tenants SET status = 'suspended' WHERE id = 'tnt_beta'")
        try:
            r = await client.get("/v1/whoami", headers=bearer(token))
            assert_error(r, 403, "tenant_suspended")
        finally:
            conn.execute("UPDATE control.tenants SET status = 'active' WHERE id = 'tnt_beta'")
    assert (await client.get("/v1/whoami", headers=bearer(token))).status_code == 200


async def test_dev_mode_suspended_tenant_is_403(
    dev: httpx.AsyncClient, suspended_beta: str
) -> None:
    r = await dev.get("/v1/whoami", headers={"X-Tenant-Id": suspended_beta})
    assert_error(r, 403, "tenant_suspended")


async def test_no_credentials_outside_dev_mode_is_401(client: httpx.AsyncClient) -> None:
    for headers in ({}, {"X-Tenant-Id": "tnt_alpha"}):
        r = await client.get("/v1/whoami", headers=headers)
        assert_error(r, 401, "missing_credentials")
    r = await client.post(ECHO, json={"tenant_id": "tnt_alpha"})
    assert_error(r, 401, "missing_credentials")


async def test_dev_mode_anonymous_request_names_one_tenant(dev: httpx.AsyncClient) -> None:
    r = await dev.get("/v1/whoami", headers={"X-Tenant-Id": "tnt_acme_eu"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["tenant_id"], body["region"], body["auth_method"]) == ("tnt_acme_eu", "eu", "dev")
    assert body["roles"] == []
    r = await dev.post(ECHO, json={"tenant_id": "tnt_globex_us"})
    assert r.status_code == 200, r.text
    assert r.json() == {"tenant_id": "tnt_globex_us", "region": "us", "auth_method": "dev"}
    # header and body agreeing is still one tenant
    r = await dev.post(ECHO, headers={"X-Tenant-Id": "tnt_alpha"}, json={"tenant_id": "tnt_alpha"})
    assert r.status_code == 200, r.text


async def test_dev_mode_anonymous_must_name_exactly_one_tenant(dev: httpx.AsyncClient) -> None:
    assert_error(await dev.get("/v1/whoami"), 401, "missing_credentials")
    r = await dev.post(ECHO, headers={"X-Tenant-Id": "tnt_alpha"}, json={"tenant_id": "tnt_beta"})
    assert_error(r, 401, "missing_credentials")
    r = await dev.get("/v1/whoami", headers={"X-Tenant-Id": "tnt_nobody"})
    assert_error(r, 403, "unknown_tenant")


async def test_dev_mode_token_is_held_to_its_tenant(dev: httpx.AsyncClient, keys: Keys) -> None:
    token = platform_of(dev).dev_token("tnt_acme_eu")
    r = await dev.get("/v1/whoami", headers={**bearer(token), "X-Tenant-Id": "tnt_globex_us"})
    assert_error(r, 403, "tenant_mismatch")
    r = await dev.post(ECHO, headers=bearer(token), json={"tenant_id": "tnt_globex_us"})
    assert_error(r, 403, "tenant_mismatch")
    # a JWKS token in dev mode, too
    r = await dev.post(ECHO, headers=bearer(rs256(keys)), json={"tenant_id": "tnt_beta"})
    assert_error(r, 403, "tenant_mismatch")
    # and a bad token is never downgraded to the anonymous dev path
    r = await dev.get(
        "/v1/whoami", headers={**bearer(_tampered_payload(keys)), "X-Tenant-Id": "tnt_beta"}
    )
    assert_error(r, 401, "invalid_signature")
    r = await dev.get("/v1/whoami", headers={**bearer(token), "X-Tenant-Id": "tnt_acme_eu"})
    assert r.status_code == 200, r.text
    assert (r.json()["tenant_id"], r.json()["auth_method"]) == ("tnt_acme_eu", "jwt")


# --- 5. API keys --------------------------------------------------------------------------------


async def _new_key(owner_db: Database, tenant: str, scopes: tuple[str, ...]) -> tuple[str, str]:
    async with owner_db.control() as s:
        record, plaintext = await create_api_key(s, tenant, name="auth-test", scopes=scopes)
    return record.id, plaintext


async def test_api_key_is_accepted_with_its_scopes(
    client: httpx.AsyncClient, owner_db: Database
) -> None:
    key_id, plaintext = await _new_key(owner_db, "tnt_gamma", ("docs:read", "chat"))
    r = await client.get("/v1/whoami", headers=bearer(plaintext))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tenant_id"] == "tnt_gamma"
    assert body["region"] == "us"
    assert body["scopes"] == ["docs:read", "chat"]
    assert body["roles"] == []
    assert body["auth_method"] == "api_key"
    assert body["subject"] == f"api_key:{key_id}"


async def test_revoked_api_key_is_refused_on_the_very_next_request(
    client: httpx.AsyncClient, owner_db: Database
) -> None:
    key_id, plaintext = await _new_key(owner_db, "tnt_alpha", ("docs:read",))
    assert (await client.get("/v1/whoami", headers=bearer(plaintext))).status_code == 200
    async with owner_db.control() as s:
        assert await revoke_api_key(s, key_id) is True
    r = await client.get("/v1/whoami", headers=bearer(plaintext))
    assert_error(r, 401, "invalid_api_key")


@pytest.mark.parametrize(
    "mangle",
    [
        pytest.param(lambda p: "rpk_000000000000_" + "x" * 43, id="unknown"),
        pytest.param(lambda p: p[:-1] + ("A" if p[-1] != "A" else "B"), id="one-char-off"),
        pytest.param(lambda p: p + "x", id="extended"),
        pytest.param(lambda p: "rpk_", id="prefix-only"),
    ],
)
async def test_unknown_api_key_is_refused(
    client: httpx.AsyncClient, owner_db: Database, mangle: Callable[[str], str]
) -> None:
    _, plaintext = await _new_key(owner_db, "tnt_alpha", ())
    r = await client.get("/v1/whoami", headers=bearer(mangle(plaintext)))
    assert_error(r, 401, "invalid_api_key")


async def test_api_key_is_bound_to_its_tenant(
    client: httpx.AsyncClient, owner_db: Database
) -> None:
    _, plaintext = await _new_key(owner_db, "tnt_alpha", ("docs:write",))
    r = await client.post(ECHO, headers=bearer(plaintext), json={"tenant_id": "tnt_beta"})
    assert_error(r, 403, "tenant_mismatch")
    r = await client.get("/v1/whoami", headers={**bearer(plaintext), "X-Tenant-Id": "tnt_beta"})
    assert_error(r, 403, "tenant_mismatch")
    r = await client.post(ECHO, headers=bearer(plaintext), json={"tenant_id": "tnt_alpha"})
    assert r.status_code == 200, r.text
    assert r.json() == {"tenant_id": "tnt_alpha", "region": "eu", "auth_method": "api_key"}


async def test_api_key_of_suspended_tenant_is_403(
    client: httpx.AsyncClient, owner_db: Database, suspended_beta: str
) -> None:
    _, plaintext = await _new_key(owner_db, suspended_beta, ())
    assert_error(await client.get("/v1/whoami", headers=bearer(plaintext)), 403, "tenant_suspended")
