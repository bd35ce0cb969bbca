"""Read (and, for probes, delete from) FastMCP OAuthProxy's key-value store *without* FastMCP or
py-key-value: only redis-py, cryptography and the standard library, so a reaper backend can do the same.

Layouts (py-key-value-aio 0.4.6, see FINDINGS.md):

Redis (RedisStore, no key prefix):   "<collection>::<key>"  ->  JSON string
    {"collection": C, "key": K, "created_at": ISO-8601, "expires_at": ISO-8601 (only with a TTL),
     "value": {...model fields...} | {"__encrypted_data__": b64, "__encryption_version__": 1}, "version": 1}
    plus a native Redis TTL (SETEX, whole seconds) when the put had a ttl.

FileTree (FastMCP's default store): <home>/oauth-proxy/<fp>/
    <sanitized collection>-info.json  {"collection": C, "created_at": ISO, "directory": abs path, "version": 1}
    <sanitized collection>/<sanitized key>.json
        {"created_at": ISO, "expires_at": ISO (only with a TTL), "value": {"__encrypted_data__": ..,
         "__encryption_version__": 1}, "version": 1}        (no "key"/"collection" fields in the file)
    sanitization (FileTreeV1*): kept as-is when [A-Za-z0-9_]* ; else "S_" + (each other char -> "_")
    + "-" + sha256(original)[:8]  (truncated to the file-name / path limits).

Usage:
    python dump_store.py redis redis://127.0.0.1:6379/12 [--fernet-key KEY]
    python dump_store.py filetree <fastmcp home> [--jwt-signing-key STR]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import sys
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

COLLECTIONS = (
    "mcp-oauth-proxy-clients",
    "mcp-oauth-transactions",
    "mcp-consent-csrf-tokens",
    "mcp-authorization-codes",
    "mcp-upstream-tokens",
    "mcp-jti-mappings",
    "mcp-refresh-tokens",
)
SEPARATOR = "::"
# Where each collection's key can be read back from its (decrypted) value; the two hash-keyed
# collections (sha256 hex of the token) have plain [0-9a-f] file names instead.
KEY_FIELD = {
    "mcp-oauth-proxy-clients": "client_id",
    "mcp-oauth-transactions": "txn_id",
    "mcp-authorization-codes": "code",
    "mcp-upstream-tokens": "upstream_token_id",
    "mcp-jti-mappings": "jti",
}
ENC_DATA = "__encrypted_data__"
ENC_VERSION = "__encryption_version__"

# --------------------------------------------------------------------------------------------------------
# Key derivation, as fastmcp.server.auth.jwt_issuer.derive_jwt_key + OAuthProxy.__init__ do it
# --------------------------------------------------------------------------------------------------------


def jwt_key_from_string(jwt_signing_key: str, *, iterations: int = 1_000_000) -> bytes:
    """OAuthProxy(jwt_signing_key=<str>): PBKDF2-HMAC-SHA256, salt "fastmcp-jwt-signing-key", 1e6 rounds
    (10 when fastmcp.settings.test_mode), 32 bytes, urlsafe-base64."""
    raw = PBKDF2HMAC(
        algorithm=hashes.SHA256(), length=32, salt=b"fastmcp-jwt-signing-key", iterations=iterations
    ).derive(jwt_signing_key.encode())
    return base64.urlsafe_b64encode(raw)


def _hkdf(material: str, salt: str) -> bytes:
    raw = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt.encode(), info=b"Fernet").derive(material.encode())
    return base64.urlsafe_b64encode(raw)


def jwt_key_from_upstream_secret(upstream_client_secret: str) -> bytes:
    """OAuthProxy without jwt_signing_key: HKDF-SHA256(upstream_client_secret, salt "fastmcp-jwt-signing-key",
    info b"Fernet"), urlsafe-base64."""
    return _hkdf(upstream_client_secret, "fastmcp-jwt-signing-key")


def storage_key(jwt_key: bytes) -> bytes:
    """The default store's Fernet key: HKDF-SHA256(jwt_key.decode(), salt "fastmcp-storage-encryption-key",
    info b"Fernet"), urlsafe-base64 (a valid Fernet key as is)."""
    return _hkdf(jwt_key.decode(), "fastmcp-storage-encryption-key")


def key_fingerprint(storage_encryption_key: bytes) -> str:
    """The directory name under <home>/oauth-proxy/: sha256 of the base64 key bytes, first 12 hex chars."""
    return hashlib.sha256(storage_encryption_key).hexdigest()[:12]


# --------------------------------------------------------------------------------------------------------
# Envelope decoding
# --------------------------------------------------------------------------------------------------------


def decrypt_value(value: Any, fernet: Fernet | None) -> tuple[Any, str]:
    """-> (decoded value, how). Mirrors BaseEncryptionWrapper._decrypt_value: a dict without
    __encrypted_data__ is plain; otherwise base64 -> Fernet token -> UTF-8 JSON."""
    if isinstance(value, str):  # value_format="string" stores (not Redis/FileTree) keep JSON text
        value = json.loads(value)
    if not isinstance(value, dict) or ENC_DATA not in value:
        return value, "plain"
    if fernet is None:
        return None, "encrypted (no key)"
    try:
        token = base64.b64decode(value[ENC_DATA], validate=True)
        return json.loads(fernet.decrypt(token).decode()), f"fernet v{value.get(ENC_VERSION)}"
    except (InvalidToken, ValueError) as exc:
        return None, f"undecryptable ({type(exc).__name__})"


def _remaining(expires_at: str | None) -> float | None:
    if not expires_at:
        return None
    return round((datetime.fromisoformat(expires_at) - datetime.now(UTC)).total_seconds(), 1)


# --------------------------------------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------------------------------------


def iter_redis(url: str, fernet: Fernet | None = None, *, match: str = "*") -> Iterator[dict[str, Any]]:
    import redis

    r = redis.Redis.from_url(url, decode_responses=True)
    try:
        for rkey in sorted(r.scan_iter(match=match, count=1000)):  # a full SCAN loop, every cursor
            raw = r.get(rkey)
            pttl = r.pttl(rkey)
            collection, _, key = rkey.partition(SEPARATOR)
            rec: dict[str, Any] = {
                "backend": "redis",
                "redis_key": rkey,
                "collection": collection,
                "key": key,
                "redis_ttl_s": None if pttl < 0 else round(pttl / 1000, 1),
            }
            try:
                env = json.loads(raw) if raw is not None else {}
            except json.JSONDecodeError:
                rec["error"] = "not JSON"
                yield rec
                continue
            value, how = decrypt_value(env.get("value"), fernet)
            rec.update(
                envelope_version=env.get("version"),
                envelope_key=env.get("key"),
                envelope_collection=env.get("collection"),
                created_at=env.get("created_at"),
                expires_at=env.get("expires_at"),
                envelope_ttl_s=_remaining(env.get("expires_at")),
                encoding=how,
                value=value,
            )
            yield rec
    finally:
        r.close()


def delete_redis_client(url: str, client_id: str) -> bool:
    import redis

    r = redis.Redis.from_url(url)
    try:
        return bool(r.delete(f"mcp-oauth-proxy-clients{SEPARATOR}{client_id}"))
    finally:
        r.close()


# --------------------------------------------------------------------------------------------------------
# FileTree
# --------------------------------------------------------------------------------------------------------


def sanitize_v1(value: str, max_length: int = 245) -> str:
    """FileTreeV1{Key,Collection}SanitizationStrategy.sanitize (HybridSanitizationStrategy, ONLY_IF_CHANGED)
    for names that fit (`max_length` depends on the file system and the directory path)."""
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
    sanitized = "".join(c if c in allowed else "_" for c in value)
    if sanitized != value:
        frag = hashlib.sha256(value.encode()).hexdigest()[:8]
        return f"S_{sanitized[: max_length - 11]}-{frag}"
    if len(value) > max_length:  # unchanged but too long: truncated, "S_", no hash fragment
        return f"S_{value[: max_length - 2]}"
    return value


def filetree_root(home: Path, jwt_key: bytes) -> Path:
    return Path(home) / "oauth-proxy" / key_fingerprint(storage_key(jwt_key))


def iter_filetree(root: Path, fernet: Fernet | None) -> Iterator[dict[str, Any]]:
    root = Path(root)
    infos: dict[str, str] = {}  # directory name -> collection name
    for info_file in sorted(root.glob("*-info.json")):
        info = json.loads(info_file.read_text())
        infos[Path(info["directory"]).name] = info["collection"]
    for directory in sorted(p for p in root.iterdir() if p.is_dir()):
        collection = infos.get(directory.name, f"?{directory.name}")
        for f in sorted(directory.glob("*.json")):
            env = json.loads(f.read_text())
            value, how = decrypt_value(env.get("value"), fernet)
            key = None
            field = KEY_FIELD.get(collection)
            if field and isinstance(value, dict):  # the file name is lossy; the key is also in the value
                key = value.get(field)
            if key is None and not f.stem.startswith("S_"):
                key = f.stem  # names that needed no sanitizing (sha256-hex keys, dash-free token_urlsafe)
            if key is not None and sanitize_v1(key) != f.stem:
                key = f"?{key}"  # value and file name disagree: someone wrote this file by hand
            yield {
                "backend": "filetree",
                "file": str(f.relative_to(root)),
                "collection": collection,
                "key": key,
                "mtime": datetime.fromtimestamp(f.stat().st_mtime, UTC).isoformat(),
                "envelope_version": env.get("version"),
                "created_at": env.get("created_at"),
                "expires_at": env.get("expires_at"),
                "envelope_ttl_s": _remaining(env.get("expires_at")),
                "encoding": how,
                "value": value,
            }


def delete_filetree_client(root: Path, client_id: str) -> bool:
    path = Path(root) / sanitize_v1("mcp-oauth-proxy-clients") / f"{sanitize_v1(client_id)}.json"
    try:
        path.unlink()
        return True
    except FileNotFoundError:
        return False


# --------------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------------


def summarize(records: list[dict[str, Any]]) -> str:
    by_coll = Counter(r["collection"] for r in records)
    lines = [f"{'collection':32} {'entries':>7}  ttl(s) range            created_at range"]
    for coll in sorted(by_coll):
        rs = [r for r in records if r["collection"] == coll]
        ttls = [r.get("redis_ttl_s", r.get("envelope_ttl_s")) for r in rs]
        ttl_vals = [t for t in ttls if t is not None]
        ttl = f"{min(ttl_vals):.0f}..{max(ttl_vals):.0f}" if ttl_vals else "none"
        if len(ttl_vals) != len(ttls):
            ttl += f" ({len(ttls) - len(ttl_vals)} without)"
        created = sorted(r["created_at"] or "" for r in rs)
        lines.append(f"{coll:32} {by_coll[coll]:>7}  {ttl:22} {created[0][11:23]}..{created[-1][11:23]}")
    clients = [r for r in records if r["collection"] == "mcp-oauth-proxy-clients" and isinstance(r.get("value"), dict)]
    names = Counter((r["value"].get("client_name") or "?").rsplit("-", 1)[0] for r in clients)
    lines.append("registrations by client_name prefix: " + ", ".join(f"{k}={v}" for k, v in sorted(names.items())))
    return "\n".join(lines)


def dump(records: list[dict[str, Any]], out=sys.stdout, *, pretty: bool = False) -> None:
    for rec in records:
        out.write((json.dumps(rec, indent=2, sort_keys=False) if pretty else json.dumps(rec)) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="backend", required=True)
    pr = sub.add_parser("redis")
    pr.add_argument("url")
    pr.add_argument("--fernet-key", help="when the proxy wrapped RedisStore in FernetEncryptionWrapper")
    pf = sub.add_parser("filetree")
    pf.add_argument("home", type=Path, help="fastmcp settings.home (FASTMCP_HOME)")
    g = pf.add_mutually_exclusive_group()
    g.add_argument("--jwt-signing-key", help="the str given to OAuthProxy(jwt_signing_key=...)")
    g.add_argument("--upstream-client-secret", help="when OAuthProxy got no jwt_signing_key")
    pf.add_argument("--test-mode", action="store_true", help="fastmcp.settings.test_mode (10 PBKDF2 rounds)")
    for sp in (pr, pf):
        sp.add_argument("--pretty", action="store_true")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    if args.backend == "redis":
        fernet = Fernet(args.fernet_key.encode()) if args.fernet_key else None
        records = list(iter_redis(args.url, fernet))
    else:
        if args.upstream_client_secret:
            jk = jwt_key_from_upstream_secret(args.upstream_client_secret)
        else:
            from proxy_server import JWT_SIGNING_KEY

            jk = jwt_key_from_string(
                args.jwt_signing_key or JWT_SIGNING_KEY, iterations=10 if args.test_mode else 1_000_000
            )
        sk = storage_key(jk)
        root = filetree_root(args.home, jk)
        print(f"# file tree root: {root} (fingerprint {key_fingerprint(sk)})", file=sys.stderr)
        records = list(iter_filetree(root, Fernet(sk)))
    dump(records, pretty=args.pretty)
    print(summarize(records), file=sys.stderr)
    print(f"# {len(records)} entries in {time.monotonic() - t0:.2f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
