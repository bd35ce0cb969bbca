"""Family fingerprints: which registrations come from the same client software on the same machine."""

from __future__ import annotations

import hashlib
import ipaddress
import unicodedata
from functools import lru_cache
from urllib.parse import urlsplit

LOOPBACK_NAMES = frozenset({"localhost"})


@lru_cache(maxsize=65536)
def normalize_name(name: str | None) -> str:
    """NFKC, case-folded, whitespace-collapsed client name ('' for none)."""
    if not name:
        return ""
    folded = unicodedata.normalize("NFKC", name).casefold()
    return " ".join(folded.split())


def is_loopback_host(host: str) -> bool:
    """localhost, 127.0.0.0/8 or ::1 (RFC 8252 §7.3)."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@lru_cache(maxsize=65536)
def normalize_redirect_uri(uri: str) -> str:
    """The URI with scheme and host lower-cased and, on a loopback host, the port removed."""
    uri = uri.strip()
    try:
        parts = urlsplit(uri)
        host = parts.hostname
        parts.port  # noqa: B018  (raises on a malformed port)
    except ValueError:
        return uri
    if not parts.scheme or host is None:
        return uri
    scheme = parts.scheme.lower()
    netloc = parts.netloc
    userinfo, _, hostport = netloc.rpartition("@")
    if is_loopback_host(host):
        shown = f"[{host}]" if ":" in host else host
        hostport = shown
    else:
        hostport = hostport.lower()
    netloc = f"{userinfo}@{hostport}" if userinfo else hostport
    out = f"{scheme}://{netloc}{parts.path}"
    if parts.query:
        out += f"?{parts.query}"
    return out


def ip_prefix(ip: str | None, v4_bits: int = 24, v6_bits: int = 56) -> str:
    """The network an address belongs to ('' when absent or unreadable): IPs aggregate, never stand alone."""
    if not ip:
        return ""
    try:
        addr = ipaddress.ip_address(ip.strip())
    except ValueError:
        return ""
    bits = v4_bits if addr.version == 4 else v6_bits
    return str(ipaddress.ip_network(f"{addr}/{bits}", strict=False))


def family_key(
    components: tuple[str, ...],
    name: str | None,
    redirect_uris: tuple[str, ...],
    software_id: str | None,
    subject: str | None,
    ip: str | None,
) -> str:
    """A short stable id for the family these attributes put a client in."""
    parts = []
    for component in components:
        if component == "name":
            parts.append(normalize_name(name))
        elif component == "redirect_uris":
            parts.append("\x1f".join(sorted({normalize_redirect_uri(u) for u in redirect_uris})))
        elif component == "software_id":
            parts.append(software_id or "")
        elif component == "subject":
            parts.append(subject or "")
        elif component == "ip":
            parts.append(ip_prefix(ip))
    return _digest("\x1e".join(parts))


@lru_cache(maxsize=262144)
def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=6).hexdigest()
