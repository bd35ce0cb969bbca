"""Family fingerprints: which registrations come from the same client software on the same machine."""

from __future__ import annotations

import hashlib
import ipaddress
import re
import unicodedata
from collections.abc import Callable
from functools import lru_cache
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

LOOPBACK_NAMES = frozenset({"localhost"})


@lru_cache(maxsize=65536)
def normalize_name(name: str | None) -> str:
    """NFKC, case-folded, whitespace-collapsed client name ('' for none)."""
    if not name:
        return ""
    # NFKC again after folding: case folding can leave text unnormalized ("ΐ" vs its upper case).
    folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", name).casefold())
    return " ".join(folded.split())


def is_loopback_host(host: str) -> bool:
    """localhost, 127.0.0.0/8 or ::1 (RFC 8252 §7.3)."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
# The common case, a plain loopback URI with a port, without urlsplit; anything unusual takes the full path.
_LOOPBACK_WITH_PORT = re.compile(
    rf"(https?)://(localhost|127\.{_OCTET}\.{_OCTET}\.{_OCTET}|\[::1\]):([0-9]{{1,5}})([/?][^\s#]*)?(?:#[^\s]*)?\Z"
)


def normalize_redirect_uri(uri: str) -> str:
    """The URI with scheme and host lower-cased and, on a loopback host, the port removed."""
    m = _LOOPBACK_WITH_PORT.match(uri)
    if m is not None and int(m.group(3)) <= 65535:
        rest = m.group(4) or ""
        if not rest.endswith("?") and "?#" not in uri:
            return f"{m.group(1)}://{m.group(2)}{rest}"
    return _normalize_any(uri)


@lru_cache(maxsize=16384)
def _normalize_any(uri: str) -> str:
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
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # ::ffff:a.b.c.d is an IPv4 client: its /24, not all of them in one ::/56
    bits = v4_bits if addr.version == 4 else v6_bits
    return str(ipaddress.ip_network(f"{addr}/{bits}", strict=False))


FamilyParts = tuple[object, ...]


# Normalized redirect URI sets, per distinct list of URIs: most clients repeat a list an earlier one had (the
# scan hands out one tuple per distinct stored value). Starts over when full: bounded memory.
REDIRECTS_CACHE_SIZE = 16384
_normalized_redirects: dict[tuple[str, ...], frozenset[str]] = {}


def normalized_redirects(uris: tuple[str, ...]) -> frozenset[str]:
    """The set of a client's redirect URIs, normalized (what a fingerprint compares)."""
    known = _normalized_redirects.get(uris)
    if known is None:
        known = frozenset(map(normalize_redirect_uri, uris))
        if len(_normalized_redirects) >= REDIRECTS_CACHE_SIZE:
            _normalized_redirects.clear()
        _normalized_redirects[uris] = known
    return known


_GETTERS: dict[str, Callable[[Any], object]] = {
    "name": lambda r: r.name or "",
    "redirect_uris": lambda r: normalized_redirects(r.redirect_uris),
    "software_id": lambda r: r.software_id or "",
    "subject": lambda r: r.subject or "",
    # The scan aggregates IPs to the configured prefix (classify.ip_prefix_v4/v6) in `ip_network`; a row with
    # an IP but no network (built elsewhere) falls back to the default prefixes.
    "ip": lambda r: r.ip_network if r.ip_network is not None else (ip_prefix(r.ip) if r.ip else ""),
}


def parts_of(components: tuple[str, ...]) -> Callable[[Any], FamilyParts]:
    """The hashable raw material of a fingerprint for one fixed component list, read from a scanned row."""
    if components != ("name", "redirect_uris", "software_id", "subject", "ip"):
        getters = tuple(_GETTERS[c] for c in components)
        return lambda r: (components, *(g(r) for g in getters))
    known = _normalized_redirects

    def default(r: Any) -> FamilyParts:
        # The default components, `_GETTERS` spelled out in one call instead of six: the hot path of every scan.
        uris = known.get(r.redirect_uris)
        if uris is None:
            uris = normalized_redirects(r.redirect_uris)
        net = r.ip_network
        if net is None:
            net = ip_prefix(r.ip) if r.ip else ""
        return (components, r.name or "", uris, r.software_id or "", r.subject or "", net)

    return default


def family_id(parts: FamilyParts) -> str:
    """A short stable id for a family, from its parts (the expensive step: callers cache per family)."""
    components, values = parts[0], parts[1:]
    text = []
    for component, value in zip(components, values, strict=True):  # type: ignore[call-overload]
        if component == "name":
            text.append(_escape(normalize_name(value)))
        elif component == "redirect_uris":
            uris = {_escape(u) for u in value} - {""}
            text.append("\x1f".join(sorted(uris)))
        elif component == "ip":
            text.append(value)
        else:
            text.append(_escape(value))
    return _digest("\x1e".join(text))


def family_key(
    components: tuple[str, ...],
    name: str | None,
    redirect_uris: tuple[str, ...],
    software_id: str | None,
    subject: str | None,
    ip: str | None,
    v4_bits: int = 24,
    v6_bits: int = 56,
) -> str:
    """A short stable id for the family these attributes put a client in (the classifier's own path)."""
    row = SimpleNamespace(
        name=name,
        redirect_uris=redirect_uris,
        software_id=software_id,
        subject=subject,
        ip=ip,
        ip_network=ip_prefix(ip, v4_bits, v6_bits) if ip else None,
    )
    return family_id(parts_of(components)(row))


# The separators (and the escape itself) inside a value are escaped, so values cannot shift across
# separators and merge two families; text without them is unchanged, and so are its family ids.
_ESCAPES = str.maketrans({"\x1b": "\x1b\x1b", "\x1e": "\x1b>", "\x1f": "\x1b?"})


def _escape(text: str) -> str:
    return text.translate(_ESCAPES)


@lru_cache(maxsize=16384)
def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=6).hexdigest()
