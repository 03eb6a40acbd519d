"""Credential verification: JWTs against a JWKS, and hashed API keys.

Rules, each covered by the auth test suite:

- Asymmetric JWTs (RS256, ES256) must name a ``kid`` found in the configured
  JWKS, and the key's type must match the token's ``alg`` (no key confusion).
  Symmetric keys in a JWKS are ignored.
- HS256 is accepted only in dev mode, and only with the dev secret.
- ``alg: none`` and every other algorithm are refused.
- ``exp``, ``iss`` and ``aud`` are required and checked; ``nbf`` is honoured;
  the tenant claim must be a well-formed tenant id.
- API keys (``rpk_…``) are looked up by hash; unknown and revoked keys are
  refused alike.

Every refusal is :class:`~ragplane.errors.Unauthorized` with a stable code.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import httpx
import jwt

from ragplane.config import AuthSettings
from ragplane.control.apikeys import KEY_PREFIX, find_api_key
from ragplane.data import Database
from ragplane.data.db import TENANT_ID_PATTERN
from ragplane.edge.context import Principal
from ragplane.errors import Unauthorized
from ragplane.observe.logging import get_logger

__all__ = [
    "ASYMMETRIC_ALGORITHMS",
    "Authenticator",
    "ChainedKeySource",
    "FileKeySource",
    "JwtVerifier",
    "KeySource",
    "StaticKeySource",
    "UrlKeySource",
]

ASYMMETRIC_ALGORITHMS = frozenset({"RS256", "ES256"})
_KTY_FOR_ALG = {"RS256": "RSA", "ES256": "EC"}
log = get_logger("ragplane.edge")


class KeySource(Protocol):
    """Where verification keys come from (a JWKS file, a JWKS URL, dev keys)."""

    async def get(self, kid: str) -> jwt.PyJWK | None: ...


def _parse_jwks(data: Any, origin: str) -> dict[str, jwt.PyJWK]:
    if not isinstance(data, Mapping) or not isinstance(data.get("keys"), list):
        # a malformed document, like unparsable JSON: callers handle both as ValueError
        raise ValueError(  # noqa: TRY004
            f"JWKS from {origin} is not a JSON object with a 'keys' list"
        )
    keys: dict[str, jwt.PyJWK] = {}
    for raw in data["keys"]:
        if not isinstance(raw, dict) or not raw.get("kid") or raw.get("kty") not in ("RSA", "EC"):
            continue  # symmetric or anonymous keys never verify anything here
        try:
            keys[raw["kid"]] = jwt.PyJWK(raw)
        except jwt.PyJWTError:
            continue
    if not keys:
        raise ValueError(f"JWKS from {origin} holds no usable RSA or EC key with a kid")
    return keys


class StaticKeySource:
    def __init__(self, jwks: Mapping[str, Any], origin: str = "memory") -> None:
        self._keys = _parse_jwks(jwks, origin)

    async def get(self, kid: str) -> jwt.PyJWK | None:
        return self._keys.get(kid)


class FileKeySource:
    """A JWKS file, re-read when it changes (key rotation without a restart).

    A missing or broken file at start-up is an error; one that becomes unreadable later
    (half-written, emptied during a rotation) keeps the last good keys until it is fixed.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._mtime = -1.0
        self._keys: dict[str, jwt.PyJWK] = {}
        self._load()

    def _load(self) -> None:
        mtime = self._path.stat().st_mtime
        if mtime != self._mtime:
            self._keys = _parse_jwks(json.loads(self._path.read_text()), str(self._path))
            self._mtime = mtime

    async def get(self, kid: str) -> jwt.PyJWK | None:
        try:
            self._load()
        except (OSError, ValueError) as exc:
            log.warning("jwks_file_unreadable", path=str(self._path), error=str(exc))
        return self._keys.get(kid)


class UrlKeySource:
    """A JWKS URL, cached; an unknown kid refetches at most once per ``min_refresh_s``."""

    def __init__(
        self,
        url: str,
        client: httpx.AsyncClient,
        *,
        cache_s: float = 300.0,
        min_refresh_s: float = 30.0,
    ) -> None:
        self._url = url
        self._client = client
        self._cache_s = cache_s
        self._min_refresh_s = min_refresh_s
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = float("-inf")
        self._failed = False  # the last fetch failed

    @staticmethod
    def _unavailable() -> Unauthorized:
        return Unauthorized(
            "signing keys are unavailable; try again shortly", code="jwks_unavailable"
        )

    async def _refresh(self) -> None:
        self._fetched_at = time.monotonic()
        try:
            resp = await self._client.get(self._url, timeout=5.0)
            resp.raise_for_status()
            self._keys = _parse_jwks(resp.json(), self._url)
        except (httpx.HTTPError, ValueError) as exc:
            self._failed = True
            raise self._unavailable() from exc
        self._failed = False

    async def get(self, kid: str) -> jwt.PyJWK | None:
        age = time.monotonic() - self._fetched_at
        if age > self._cache_s or (kid not in self._keys and age > self._min_refresh_s):
            await self._refresh()
        elif kid not in self._keys and self._failed:
            # not refetched yet (rate limit): the key is unknown because the fetch failed
            raise self._unavailable()
        return self._keys.get(kid)


class ChainedKeySource:
    """Several key sources, asked in order (configured JWKS first, then the dev key)."""

    def __init__(self, *sources: KeySource) -> None:
        self._sources = sources

    async def get(self, kid: str) -> jwt.PyJWK | None:
        for source in self._sources:
            key = await source.get(kid)
            if key is not None:
                return key
        return None


_DECODE_ERRORS: tuple[tuple[type[jwt.PyJWTError], str, str], ...] = (
    (jwt.ExpiredSignatureError, "token_expired", "token has expired"),
    (jwt.ImmatureSignatureError, "token_not_yet_valid", "token is not valid yet"),
    (jwt.InvalidAudienceError, "invalid_audience", "token audience is not accepted"),
    (jwt.InvalidIssuerError, "invalid_issuer", "token issuer is not accepted"),
    (jwt.InvalidSignatureError, "invalid_signature", "token signature does not verify"),
    (jwt.MissingRequiredClaimError, "missing_claim", "token lacks a required claim"),
)


class JwtVerifier:
    def __init__(
        self, settings: AuthSettings, keys: KeySource | None, *, hs256_secret: bytes | None = None
    ) -> None:
        self._settings = settings
        self._keys = keys
        self._hs256_secret = hs256_secret

    async def _key_for(self, header: Mapping[str, Any]) -> Any:
        alg = header.get("alg")
        if alg == "HS256" and self._hs256_secret is not None:
            return self._hs256_secret
        if not isinstance(alg, str) or alg not in ASYMMETRIC_ALGORITHMS:
            raise Unauthorized(f"token algorithm {alg!r} is not accepted", code="unsupported_alg")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise Unauthorized("token header has no kid", code="unknown_key")
        jwk = await self._keys.get(kid) if self._keys is not None else None
        if jwk is None:
            raise Unauthorized(f"no signing key with kid {kid!r}", code="unknown_key")
        if jwk.key_type != _KTY_FOR_ALG[alg] or jwk.algorithm_name != alg:
            raise Unauthorized(
                f"key {kid!r} is a {jwk.algorithm_name} key, token says {alg}", code="key_mismatch"
            )
        return jwk.key

    async def verify(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise Unauthorized("malformed token", code="invalid_token") from exc
        key = await self._key_for(header)
        s = self._settings
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[header["alg"]],
                audience=s.audience,
                issuer=s.issuer,
                leeway=s.leeway_s,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.PyJWTError as exc:
            for exc_type, code, message in _DECODE_ERRORS:
                if isinstance(exc, exc_type):
                    raise Unauthorized(message, code=code) from exc
            raise Unauthorized("token is not valid", code="invalid_token") from exc
        tenant = claims.get(s.tenant_claim)
        if not isinstance(tenant, str) or not TENANT_ID_PATTERN.fullmatch(tenant):
            raise Unauthorized(
                f"token has no valid {s.tenant_claim!r} claim", code="missing_tenant"
            )
        roles = claims.get(s.roles_claim, [])
        scope = claims.get("scope", "")
        return Principal(
            tenant_id=tenant,
            subject=str(claims.get("sub", "")),
            roles=tuple(r for r in roles if isinstance(r, str)) if isinstance(roles, list) else (),
            scopes=tuple(scope.split()) if isinstance(scope, str) else (),
            method="jwt",
        )


class Authenticator:
    """Turns an ``Authorization`` header into a verified :class:`Principal` (or None)."""

    def __init__(self, verifier: JwtVerifier, db: Database) -> None:
        self._verifier = verifier
        self._db = db

    async def authenticate(self, authorization: str | None) -> Principal | None:
        if authorization is None:
            return None
        scheme, _, credential = authorization.partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            raise Unauthorized(
                "Authorization must be 'Bearer <token or API key>'", code="invalid_token"
            )
        if credential.startswith(KEY_PREFIX):
            return await self._api_key(credential)
        return await self._verifier.verify(credential)

    async def _api_key(self, plaintext: str) -> Principal:
        async with self._db.control() as s:
            key = await find_api_key(s, plaintext)
        if key is None or key.revoked:
            raise Unauthorized("API key is not valid (unknown or revoked)", code="invalid_api_key")
        return Principal(
            tenant_id=key.tenant_id,
            subject=f"api_key:{key.id}",
            roles=(),
            scopes=key.scopes,
            method="api_key",
        )
