"""Signing keys for dev mode, created once under the data directory.

Dev mode signs its tokens with an ES256 key pair (the verifier treats it like
any JWKS key) and also holds an HS256 secret, because dev mode is the only mode
in which HS256 tokens are accepted. The file is written with mode 0600.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

__all__ = ["DevKeys", "load_or_create_dev_keys"]

FILE_NAME = "dev-keys.json"


@dataclass(frozen=True)
class DevKeys:
    kid: str
    private_pem: bytes
    hs256_secret: bytes

    def public_jwks(self) -> dict[str, Any]:
        private = serialization.load_pem_private_key(self.private_pem, password=None)
        jwk: dict[str, Any] = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(private.public_key()))  # type: ignore[arg-type]
        jwk.update({"kid": self.kid, "alg": "ES256", "use": "sig"})
        return {"keys": [jwk]}

    def mint(
        self,
        tenant_id: str,
        *,
        issuer: str,
        audience: str,
        ttl_s: int,
        tenant_claim: str = "tenant_id",
        roles: tuple[str, ...] = ("admin",),
        subject: str | None = None,
        alg: Literal["ES256", "HS256"] = "ES256",
    ) -> str:
        now = int(time.time())
        claims = {
            "iss": issuer,
            "aud": audience,
            "sub": subject or f"dev:{tenant_id}",
            "iat": now,
            "nbf": now,
            "exp": now + ttl_s,
            "jti": uuid.uuid4().hex,
            tenant_claim: tenant_id,
            "roles": list(roles),
        }
        if alg == "HS256":
            return jwt.encode(
                claims, self.hs256_secret, algorithm="HS256", headers={"kid": "dev-hs256"}
            )
        return jwt.encode(claims, self.private_pem, algorithm="ES256", headers={"kid": self.kid})


def load_or_create_dev_keys(data_dir: Path) -> DevKeys:
    path = data_dir / FILE_NAME
    if path.exists():
        raw = json.loads(path.read_text())
        return DevKeys(
            kid=raw["kid"],
            private_pem=raw["private_pem"].encode(),
            hs256_secret=base64.b64decode(raw["hs256_secret"]),
        )
    data_dir.mkdir(parents=True, exist_ok=True)
    private = ec.generate_private_key(ec.SECP256R1())
    keys = DevKeys(
        kid="dev-es256-" + secrets.token_hex(4),
        private_pem=private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        hs256_secret=secrets.token_bytes(32),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(
            {
                "kid": keys.kid,
                "private_pem": keys.private_pem.decode(),
                "hs256_secret": base64.b64encode(keys.hs256_secret).decode(),
            },
            fh,
        )
    return keys
