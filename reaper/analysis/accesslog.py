"""Registrant IPs from a reverse proxy's access log: `POST <registration path>` lines matched to client rows
by time, inside an explicit window, and never guessed.

The rule (`match_registrations`): a registration gets an IP only when exactly one successful registration
request lies within `window` seconds of its registration time **and** that request lies within `window` of no
other registration. No request: `missing`. Two requests for one registration, or two registrations for one
request: `ambiguous`, and no IP. Formats: nginx `combined`, nginx JSON (`log_format ... escape=json`),
Caddy's JSON.
"""

from __future__ import annotations

import bisect
import glob
import gzip
import json
import re
from collections.abc import Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Literal, TypeVar

from reaper.errors import ConfigError

K = TypeVar("K", bound=Hashable)
Outcome = Literal["matched", "missing", "ambiguous"]


@dataclass(frozen=True, slots=True)
class Request:
    """One successful registration request: when (epoch seconds) and from where."""

    at: float
    ip: str


@dataclass(frozen=True, slots=True)
class Match:
    """What the log says about one registration."""

    outcome: Outcome
    ip: str | None = None


def match_registrations(
    registrations: Iterable[tuple[K, float | None]], requests: Sequence[Request], window: float
) -> dict[K, Match]:
    """Each registration's IP by the rule in the module docstring; `requests` sorted by time."""
    regs = [(k, t) for k, t in registrations]
    times = sorted(t for _, t in regs if t is not None)
    req_times = [r.at for r in requests]
    out: dict[K, Match] = {}
    for key, t in regs:
        if t is None:
            out[key] = Match("missing")
            continue
        lo = bisect.bisect_left(req_times, t - window)
        hi = bisect.bisect_right(req_times, t + window)
        if hi == lo:
            out[key] = Match("missing")
            continue
        if hi - lo > 1:
            out[key] = Match("ambiguous")
            continue
        req = requests[lo]
        near = bisect.bisect_right(times, req.at + window) - bisect.bisect_left(times, req.at - window)
        out[key] = Match("matched", req.ip) if near == 1 else Match("ambiguous")
    return out


# --- reading logs ---------------------------------------------------------------------------------------

_COMBINED = re.compile(r'^(\S+) \S+ \S+ \[([^\]]+)\] "(\S+) (\S+)[^"]*" (\d{3}) ')
LogFormat = Literal["auto", "nginx", "json", "caddy"]


def parse_line(line: str, fmt: LogFormat = "auto") -> tuple[str, str, int, float, str] | None:
    """(method, path without query, status, epoch seconds, client IP) of one log line, or None."""
    line = line.strip()
    if not line:
        return None
    if fmt in ("json", "caddy") or (fmt == "auto" and line.startswith("{")):
        try:
            doc = json.loads(line)
        except ValueError:
            return None
        return _from_json(doc) if isinstance(doc, dict) else None
    m = _COMBINED.match(line)
    if not m:
        return None
    try:
        at = datetime.strptime(m.group(2), "%d/%b/%Y:%H:%M:%S %z").timestamp()
    except ValueError:
        return None
    return m.group(3), _path(m.group(4)), int(m.group(5)), at, m.group(1)


def _from_json(doc: dict[str, Any]) -> tuple[str, str, int, float, str] | None:
    req = doc.get("request")
    if isinstance(req, dict):  # Caddy: {"ts": 1712345678.12, "request": {"client_ip", "method", "uri"}, "status"}
        ip = req.get("client_ip") or req.get("remote_ip")
        method, uri, at = req.get("method"), req.get("uri"), _time(doc.get("ts"))
    else:  # nginx JSON: remote_addr, request_method, request_uri (or request "POST /x HTTP/1.1"), time_*/msec
        ip = doc.get("remote_addr") or doc.get("client_ip")
        method, uri = doc.get("request_method") or doc.get("method"), doc.get("request_uri") or doc.get("uri")
        if (method is None or uri is None) and isinstance(req, str) and " " in req:
            method, uri = req.split(" ")[:2]
        at = None
        for key in ("msec", "ts", "time_iso8601", "timestamp", "time", "time_local"):
            if doc.get(key) is not None:
                at = _time(doc[key])
                break
    try:
        status = int(doc.get("status"))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    if not (ip and method and uri) or at is None:
        return None
    return str(method), _path(str(uri)), status, at, str(ip)


def _time(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, str):
        return None
    try:
        return float(value)
    except ValueError:
        pass
    for parse in (datetime.fromisoformat, lambda v: datetime.strptime(v, "%d/%b/%Y:%H:%M:%S %z")):
        try:
            parsed = parse(value.replace("Z", "+00:00"))
        except ValueError:
            continue
        return parsed.timestamp() if parsed.tzinfo is not None else None  # a time without a zone is a guess
    return None


def _path(uri: str) -> str:
    path = uri.split("?", 1)[0].split("#", 1)[0]
    return path.rstrip("/") or "/"


def registration_requests(lines: Iterable[str], registration_path: str, fmt: LogFormat = "auto") -> list[Request]:
    """Successful (2xx) POSTs to the registration path, sorted by time."""
    want = _path(registration_path)
    needle = want.rsplit("/", 1)[-1] or "/"
    out = []
    for line in lines:
        if needle not in line:
            continue  # cheap filter before parsing
        parsed = parse_line(line, fmt)
        if parsed is None:
            continue
        method, path, status, at, ip = parsed
        if method.upper() == "POST" and path == want and 200 <= status < 300:
            out.append(Request(at, ip))
    out.sort(key=lambda r: r.at)
    return out


def _open(path: Path) -> IO[str]:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return path.open("r", encoding="utf-8", errors="replace")


def read_logs(patterns: Sequence[str], registration_path: str, fmt: LogFormat = "auto") -> list[Request]:
    """Every registration request in the files the patterns name (globs; .gz too), sorted by time."""
    requests: list[Request] = []
    for pattern in patterns:
        for name in sorted(glob.glob(pattern)) or [pattern]:
            try:
                with _open(Path(name)) as fh:
                    requests += registration_requests(fh, registration_path, fmt)
            except OSError as exc:
                raise ConfigError(f"ip.access_log: cannot read {name}: {exc.strerror or exc}") from None
    requests.sort(key=lambda r: r.at)
    return requests


# --- feeding the scan -----------------------------------------------------------------------------------


def annotate(
    rows: Iterable[Any], requests: Sequence[Request], registrations: Sequence[float], window: float
) -> Iterator[Any]:
    """Set `ip` on scanned rows (in any order) that have none, from the log, by the rule above.

    `registrations` is every registration time of the scan, sorted: the rule asks whether a request lies near
    one registration only, which is a count over all of them, whatever order the rows come in.
    """
    req_times = [r.at for r in requests]
    for row in rows:
        t = row.created_at
        if row.ip is None and t is not None:
            lo = bisect.bisect_left(req_times, t - window)
            hi = bisect.bisect_right(req_times, t + window)
            if hi - lo == 1:
                req = requests[lo]
                near = bisect.bisect_right(registrations, req.at + window) - bisect.bisect_left(
                    registrations, req.at - window
                )
                if near == 1:
                    row.ip = req.ip
        yield row
