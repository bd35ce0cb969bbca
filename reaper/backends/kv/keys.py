"""Key material: the Fernet key a FastMCP OAuthProxy encrypts its store's values with, derived exactly as the
server derives it (fastmcp 4.x `OAuthProxy.__init__` and `jwt_issuer.derive_jwt_key`), and the file tree
directory that key names.

- `jwt_signing_key` (a string) -> PBKDF2-HMAC-SHA256(salt "fastmcp-jwt-signing-key", 1,000,000 rounds, 32 bytes),
  urlsafe-base64: the JWT key;
- no `jwt_signing_key`: HKDF-SHA256(upstream client secret, salt "fastmcp-jwt-signing-key", info "Fernet");
- the storage key = HKDF-SHA256(JWT key, salt "fastmcp-storage-encryption-key", info "Fernet"), urlsafe-base64:
  a Fernet key as is;
- the default file tree lives in `<FASTMCP_HOME>/oauth-proxy/<sha256(storage key)[:12]>/`.

Keys live in memory only: nothing here logs, prints or puts one in an error message.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from pathlib import Path

from cryptography.fernet import Fernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC
from pydantic import SecretStr

from reaper.config import FastMcpConfig
from reaper.errors import ConfigError

JWT_SALT = "fastmcp-jwt-signing-key"
STORAGE_SALT = "fastmcp-storage-encryption-key"
PBKDF2_ROUNDS = 1_000_000


def _hkdf(material: str, salt: str) -> bytes:
    raw = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt.encode(), info=b"Fernet").derive(material.encode())
    return base64.urlsafe_b64encode(raw)


def jwt_key_from_string(secret: str, rounds: int = PBKDF2_ROUNDS) -> bytes:
    """OAuthProxy(jwt_signing_key=<str>): the JWT key it derives."""
    raw = PBKDF2HMAC(algorithm=hashes.SHA256(), length=32, salt=JWT_SALT.encode(), iterations=rounds).derive(
        secret.encode()
    )
    return base64.urlsafe_b64encode(raw)


def jwt_key_from_upstream_secret(secret: str) -> bytes:
    """OAuthProxy without jwt_signing_key: the JWT key it derives from the upstream client secret."""
    return _hkdf(secret, JWT_SALT)


def storage_key_from_jwt_key(jwt_key: bytes) -> bytes:
    """The default store's Fernet key, from the JWT key."""
    return _hkdf(jwt_key.decode(), STORAGE_SALT)


def fingerprint(storage_key: bytes) -> str:
    """The name of the default file tree's directory under `<home>/oauth-proxy/`."""
    return hashlib.sha256(storage_key).hexdigest()[:12]


@dataclass(frozen=True)
class KeyMaterial:
    """The store's Fernet key (None: the values are not encrypted) and where it came from, for messages."""

    storage_key: bytes | None
    source: str  # a config key name, never the key

    @property
    def fernet(self) -> Fernet | None:
        return Fernet(self.storage_key) if self.storage_key is not None else None

    @property
    def fingerprint(self) -> str | None:
        return fingerprint(self.storage_key) if self.storage_key is not None else None


def _secret(value: SecretStr | None, file: str | None, name: str) -> str | None:
    if value is not None:
        return value.get_secret_value()
    if file is None:
        return None
    try:
        text = Path(file).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"fastmcp.{name}_file: cannot read {file}: {exc.strerror or type(exc).__name__}") from None
    text = text.rstrip("\r\n")
    if not text:
        raise ConfigError(f"fastmcp.{name}_file: {file} is empty")
    return text


def key_material(settings: FastMcpConfig) -> KeyMaterial:
    """The storage key from whichever source the configuration gives (at most one, checked by the config)."""
    jwt = _secret(settings.jwt_signing_key, settings.jwt_signing_key_file, "jwt_signing_key")
    if jwt is not None:
        return KeyMaterial(storage_key_from_jwt_key(jwt_key_from_string(jwt)), "fastmcp.jwt_signing_key")
    upstream = _secret(settings.upstream_client_secret, settings.upstream_client_secret_file, "upstream_client_secret")
    if upstream is not None:
        key = storage_key_from_jwt_key(jwt_key_from_upstream_secret(upstream))
        return KeyMaterial(key, "fastmcp.upstream_client_secret")
    direct = _secret(settings.storage_key, settings.storage_key_file, "storage_key")
    if direct is not None:
        try:
            Fernet(direct.encode())
        except (ValueError, TypeError):
            raise ConfigError("fastmcp.storage_key: not a Fernet key (32 bytes, urlsafe base64)") from None
        return KeyMaterial(direct.encode(), "fastmcp.storage_key")
    return KeyMaterial(None, "")
