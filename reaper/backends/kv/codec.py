"""The stored form of a py-key-value entry, decoded: the envelope (py-key-value's ManagedEntry as JSON:
`{version, value, created_at, expires_at?}`, plus `key` and `collection` on Redis) and its value, decrypted the
way `FernetEncryptionWrapper` encrypts it (`{"__encrypted_data__": base64(Fernet token of the value's compact
JSON), "__encryption_version__": 1}`; a value without that marker is plain).

Decoding is done here, not through py-key-value's `get`, because the reaper needs what that API does not give:
the envelope's `created_at` (the only registration time a FastMCP client has), the exact stored bytes (for
tombstones that restore an entry byte for byte) and, on the file tree, keys that only the value holds.
`tests/test_fastmcp_backend.py` checks this decoding against the library's own reads.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from typing import Any

import orjson
from cryptography.fernet import Fernet, InvalidToken

from reaper.backends.kv.evaluate import to_epoch

ENCRYPTED = "__encrypted_data__"


@dataclass(slots=True)
class RawEntry:
    """One entry as stored: where it is, its exact bytes and (Redis) when it expires."""

    collection: str
    key: str | None  # None on the file tree when the file name is a sanitized form of the key
    where: str  # the Redis key, or the file's path relative to the store's directory
    raw: bytes
    expire_at_ms: int | None = None  # Redis: the key's own expiry, epoch milliseconds
    mtime_ns: int | None = None  # file tree: the file's modification time


@dataclass(slots=True)
class Entry:
    """A decoded entry: envelope times, the value, and a problem when it could not be read."""

    raw: RawEntry
    key: str | None
    created_at: float | None = None
    expires_at: float | None = None
    value: dict[str, Any] | None = None
    problem: str | None = None
    encrypted: bool = False
    doc: dict[str, Any] = field(default_factory=dict)

    def expired(self, now: float) -> bool:
        """Past the envelope's expiry: py-key-value reads it as absent (Redis drops it, the file tree keeps it)."""
        return self.expires_at is not None and self.expires_at <= now


class Codec:
    """Decodes entries with one Fernet key (or none); counts what it could and could not decrypt."""

    def __init__(self, fernet: Fernet | None):
        self.fernet = fernet
        self.decrypted = 0
        self.undecryptable = 0
        self.encrypted_without_key = 0

    def decode(self, raw: RawEntry) -> Entry:
        entry = Entry(raw, raw.key)
        try:
            envelope = orjson.loads(raw.raw)
        except orjson.JSONDecodeError:
            entry.problem = "not a py-key-value entry (not JSON)"
            return entry
        if not isinstance(envelope, dict) or "value" not in envelope:
            entry.problem = "not a py-key-value entry (no value)"
            return entry
        entry.created_at = to_epoch(envelope.get("created_at"))
        entry.expires_at = to_epoch(envelope.get("expires_at"))
        value = envelope["value"]
        if isinstance(value, str):  # stores with value_format="string" keep the value as JSON text
            try:
                value = orjson.loads(value)
            except orjson.JSONDecodeError:
                entry.problem = "value is not JSON"
                return entry
        if not isinstance(value, dict):
            entry.problem = "value is not a JSON object"
            return entry
        if ENCRYPTED in value:
            entry.encrypted = True
            value = self._decrypt(value, entry)
            if value is None:
                return entry
        entry.value = value
        doc = dict(value)
        doc["$key"] = entry.key
        doc["$created_at"] = envelope.get("created_at")
        doc["$expires_at"] = envelope.get("expires_at")
        entry.doc = doc
        return entry

    def _decrypt(self, value: dict[str, Any], entry: Entry) -> dict[str, Any] | None:
        if self.fernet is None:
            self.encrypted_without_key += 1
            entry.problem = "value is encrypted and no key was given"
            return None
        data = value.get(ENCRYPTED)
        try:
            token = base64.b64decode(str(data), validate=True)
            plain = orjson.loads(self.fernet.decrypt(token))
        except (InvalidToken, binascii.Error, ValueError, TypeError):
            self.undecryptable += 1
            entry.problem = "value does not decrypt with the key given"
            return None
        if not isinstance(plain, dict):
            entry.problem = "decrypted value is not a JSON object"
            return None
        self.decrypted += 1
        return plain
