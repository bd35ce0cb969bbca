"""Render a classified scan as a human table, JSON, CSV or Markdown. Never prints a secret (S8)."""

from __future__ import annotations

import csv
import json
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, Any

from reaper.classify import VERDICTS, Classified, FamilyStats, Snapshot, Verdict
from reaper.fingerprint import ip_prefix

if TYPE_CHECKING:
    from reaper.loops import FloodEvidence, LoopEvidence

FORMATS = ("table", "json", "csv", "markdown", "html")
LOOP_STEPS_IN_TABLE = 10
ACTIONABLE = (Verdict.ORPHAN, Verdict.ABANDONED)
CLIENT_FIELDS = (
    "client_id",
    "name",
    "family",
    "verdict",
    "reason",
    "registered_at",
    "last_token_at",
    "live_credentials",
    "credentials",
    "redirect_uris",
    "software_id",
    "disabled",
    "problems",
)


@dataclass(frozen=True)
class Filters:
    """Which clients to list."""

    verdicts: frozenset[str] = frozenset()
    family: str | None = None

    def match(self, item: Classified, families: dict[str, FamilyStats]) -> bool:
        if self.verdicts and item.verdict not in self.verdicts:
            return False
        if self.family:
            fam = families.get(item.family)
            wanted = self.family.casefold()
            return item.family.startswith(wanted) or (fam is not None and fam.normalized_name == wanted)
        return True


def clean(text: str | None, limit: int | None = 60) -> str:
    """Printable, bounded text: control and format characters escaped, long text cut with a count."""
    if text is None:
        return ""
    out = []
    for ch in text[: (limit * 4 if limit else None)]:
        if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"):
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    shown = "".join(out)
    if limit and (len(shown) > limit or len(text) > limit * 4):
        return shown[: limit - 1] + f"…(+{len(text) - limit + 1})"
    return shown


def iso(ts: float | None) -> str | None:
    """ISO 8601 UTC, seconds precision."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def short_time(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M")


def duration_text(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def client_record(item: Classified, show_ips: bool = False) -> dict[str, Any]:
    """The public facts of one classified client (no secret, no token)."""
    row = item.row
    record = {
        "client_id": row.client_id,
        "name": row.name,
        "family": item.family,
        "verdict": str(item.verdict),
        "reason": item.reason,
        "registered_at": iso(row.created_at),
        "last_token_at": iso(row.last_used),
        "live_credentials": sum(row.live.values()),
        "credentials": row.total_credentials,
        "redirect_uris": list(row.redirect_uris),
        "software_id": row.software_id,
        "disabled": row.disabled,
        "problems": list(row.problems),
    }
    if row.ip:
        record["ip"] = row.ip if show_ips else (row.ip_network or ip_prefix(row.ip))
    return record


def family_record(f: FamilyStats, snap: Snapshot) -> dict[str, Any]:
    return {
        "family": f.id,
        "name": f.name,
        "members": f.members,
        "live": f.live,
        "orphans": f.orphans,
        "abandoned": f.abandoned,
        "first_registered": iso(f.first_registered),
        "last_registered": iso(f.last_registered),
        "registrations_in_window": f.recent,
        "median_interval_seconds": f.median_interval,
        "churning": f.recent >= snap.churn_min_registrations,
        "canonical_client_id": f.survivor,
    }


def loop_record(loop: LoopEvidence) -> dict[str, Any]:
    """A suspected re-auth loop and its evidence rows (client_ids and times only)."""
    return {
        "family": loop.family,
        "name": loop.name,
        "cycles": loop.cycles,
        "median_gap_seconds": loop.median_gap,
        "first_revoked": iso(loop.first_revoked_at),
        "last_revoked": iso(loop.last_revoked_at),
        "evidence": [
            {
                "client_id": s.client_id,
                "registered_at": iso(s.registered_at),
                "last_token_at": iso(s.last_token_at),
                "refresh_revoked_at": iso(s.revoked_at),
                "next_client_id": s.next_client_id,
                "next_registered_at": iso(s.next_registered_at),
                "gap_seconds": s.gap,
                "verdict": s.verdict,
            }
            for s in loop.steps
        ],
    }


def flood_record(flood: FloodEvidence) -> dict[str, Any]:
    """A registration flood: a family or an IP prefix (never an address), with its never-used members."""
    return {
        "scope": flood.scope,
        "family" if flood.scope == "family" else "ip_prefix": flood.key,
        "name": flood.name,
        "registrations": flood.registrations,
        "first_registered": iso(flood.first_at),
        "last_registered": iso(flood.last_at),
        "seconds": flood.seconds,
        "evidence": [
            {"client_id": m.client_id, "registered_at": iso(m.registered_at), "verdict": m.verdict}
            for m in flood.members
        ],
    }


def summary_record(snap: Snapshot) -> dict[str, Any]:
    reasons: dict[str, dict[str, int]] = {}
    for (verdict, reason), n in sorted(snap.by_reason.items()):
        reasons.setdefault(str(verdict), {})[reason] = n
    return {
        "profile": snap.profile,
        "database": snap.database,
        "scanned_at": iso(snap.started_at),
        "duration_seconds": round(snap.duration, 3),
        "clients": snap.clients,
        "families": len(snap.families),
        "by_verdict": {str(v): snap.by_verdict.get(v, 0) for v in VERDICTS},
        "by_reason": reasons,
        "churning_families": len(snap.churning()),
        "problems": snap.problem_count,
        "churn_window_seconds": snap.churn_window,
        "loop_detection": snap.loop_detection,
        "suspected_loops": len(snap.loops),
        "floods": len(snap.floods),
    }


def _table(headers: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def fmt(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return [fmt(headers).rstrip(), "  ".join("-" * w for w in widths), *(fmt(r).rstrip() for r in rows)]


def _md(headers: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    def esc(c: str) -> str:
        return c.replace("|", "\\|")

    align = ["---:" if i in right else "---" for i in range(len(headers))]
    return [
        "| " + " | ".join(headers) + " |",
        "| " + " | ".join(align) + " |",
        *("| " + " | ".join(esc(c) for c in r) + " |" for r in rows),
    ]


def _sections(
    snap: Snapshot, listed: list[Classified], matched: int, top_k: int, title: str
) -> list[tuple[str, list[str], list[list[str]], set[int]]]:
    verdict_rows = []
    for v in VERDICTS:
        reasons = sorted((r, n) for (vv, r), n in snap.by_reason.items() if vv == v)
        verdict_rows.append([str(v), str(snap.by_verdict.get(v, 0)), ", ".join(f"{r} {n}" for r, n in reasons)])
    fams = snap.top_families(top_k)
    fam_rows = [
        [
            f.id,
            clean(f.name, 40) or "(no name)",
            str(f.members),
            str(f.live),
            str(f.orphans),
            str(f.recent),
            short_time(f.first_registered),
            short_time(f.last_registered),
            duration_text(f.median_interval),
            "yes" if f.recent >= snap.churn_min_registrations else "",
            clean(f.survivor, 36),
        ]
        for f in fams
    ]
    client_rows = [
        [
            clean(c.row.client_id, 36),
            clean(c.row.name, 40) or "(no name)",
            c.family,
            str(c.verdict),
            c.reason,
            short_time(c.row.created_at),
            short_time(c.row.last_used),
        ]
        for c in listed
    ]
    shown = f"{len(listed)} of {matched}" if len(listed) < matched else str(matched)
    sections = [
        ("Clients by verdict", ["verdict", "clients", "reasons"], verdict_rows, {1}),
        (
            f"Families with more than one member (top {top_k}; churning = "
            f"≥ {snap.churn_min_registrations} registrations in {duration_text(snap.churn_window)})",
            [
                "family",
                "name",
                "members",
                "live",
                "orphans",
                "recent",
                "first registered",
                "last registered",
                "median gap",
                "churning",
                "canonical client",
            ],
            fam_rows,
            {2, 3, 4, 5},
        ),
        (
            f"{title}: {shown}",
            ["client_id", "name", "family", "verdict", "reason", "registered", "last token"],
            client_rows,
            set(),
        ),
    ]
    sections[2:2] = _loop_sections(snap)  # after the families, before the client listing
    if snap.problem_count:
        probs = [[clean(cid, 36), clean(p, 80)] for cid, p in snap.problems[:50]]
        sections.append(
            (
                f"Rows with problems (skipped, never reaped): {snap.problem_count}",
                ["client_id", "problem"],
                probs,
                set(),
            )
        )
    return sections


def loops_sorted(snap: Snapshot) -> list[LoopEvidence]:
    """Suspected loops, most cycles first."""
    return sorted(snap.loops.values(), key=lambda lp: (-lp.cycles, lp.family))


def _loop_sections(snap: Snapshot) -> list[tuple[str, list[str], list[list[str]], set[int]]]:
    """Suspected re-auth loops, their evidence, and floods; nothing when there are none."""
    out: list[tuple[str, list[str], list[list[str]], set[int]]] = []
    if snap.loops:
        loops = loops_sorted(snap)
        out.append(
            (
                f"Suspected re-auth loops: {len(loops)} (a refresh token revoked, then a new registration in the "
                f"family within {duration_text(snap.loop_window)})",
                ["family", "name", "cycles", "median revoked→re-registered", "first revoked", "last revoked"],
                [
                    [
                        lp.family,
                        clean(lp.name, 40) or "(no name)",
                        str(lp.cycles),
                        duration_text(lp.median_gap),
                        short_time(lp.first_revoked_at),
                        short_time(lp.last_revoked_at),
                    ]
                    for lp in loops
                ],
                {2},
            )
        )
        rows = [
            [
                lp.family,
                clean(st.client_id, 36),
                short_time(st.registered_at),
                short_time(st.last_token_at),
                short_time(st.revoked_at),
                clean(st.next_client_id, 36),
                duration_text(st.gap),
                st.verdict,
            ]
            for lp in loops
            for st in lp.steps[:LOOP_STEPS_IN_TABLE]
        ]
        out.append(
            (
                f"Re-auth loop evidence (newest first, up to {LOOP_STEPS_IN_TABLE} per family)",
                [
                    "family",
                    "client_id",
                    "registered",
                    "last token",
                    "refresh revoked",
                    "next registration",
                    "gap",
                    "verdict",
                ],
                rows,
                set(),
            )
        )
    if snap.floods:
        out.append(
            (
                f"Registration floods: {len(snap.floods)} (never-used registrations packed into seconds)",
                [
                    "scope",
                    "family / IP prefix",
                    "name",
                    "registrations",
                    "first",
                    "last",
                    "within",
                    "sample client_ids",
                ],
                [
                    [
                        f.scope,
                        clean(f.key, 43),
                        clean(f.name, 40) or "(no name)",
                        str(f.registrations),
                        short_time(f.first_at),
                        short_time(f.last_at),
                        duration_text(f.seconds),
                        ", ".join(clean(m.client_id, 24) for m in f.members[:3]),
                    ]
                    for f in snap.floods
                ],
                {3},
            )
        )
    return out


def _collect(stream: Iterable[Classified], filters: Filters, snap: Snapshot, limit: int) -> tuple[list, int]:
    listed: list[Classified] = []
    matched = 0
    for item in stream:
        if filters.match(item, snap.families):
            matched += 1
            if limit == 0 or len(listed) < limit:
                listed.append(item)
    return listed, matched


def render(
    fmt: str,
    stream: Iterator[Classified],
    snap: Snapshot,
    out: IO[str],
    filters: Filters,
    top_k: int = 10,
    max_rows: int = 50,
    show_ips: bool = False,
) -> None:
    """Write the report in one format; client rows stream for json and csv."""
    if fmt == "json":
        _render_json(stream, snap, out, filters, show_ips)
    elif fmt == "html":
        from reaper.html import render_html

        render_html(stream, snap, out, filters, top_k, max_rows)
    elif fmt == "csv":
        _render_csv(stream, snap, out, filters, show_ips)
    elif fmt in ("table", "markdown"):
        default = not filters.verdicts and not filters.family
        use = Filters(frozenset(ACTIONABLE)) if default else filters
        listed, matched = _collect(stream, use, snap, max_rows)
        title = "Clients a reap would act on (orphan, abandoned)" if default else "Clients"
        header = (
            f"dcr-reaper report · profile {snap.profile} · {snap.database} · {iso(snap.started_at)} · "
            f"{snap.clients} clients, {len(snap.families)} families, scanned in {snap.duration:.2f}s"
        )
        lines = [f"# {header}" if fmt == "markdown" else header, ""]
        for heading, headers, rows, right in _sections(snap, listed, matched, top_k, title):
            lines.append(f"## {heading}" if fmt == "markdown" else heading)
            lines.append("")
            lines += (_md if fmt == "markdown" else _table)(headers, rows, right)
            lines.append("")
        out.write("\n".join(lines))
    else:
        raise ValueError(f"unknown format {fmt}")


def _render_json(stream: Iterable[Classified], snap: Snapshot, out: IO[str], filters: Filters, show_ips: bool) -> None:
    out.write('{"clients": [')
    first = True
    for item in stream:
        if filters.match(item, snap.families):
            out.write(("\n  " if first else ",\n  ") + json.dumps(client_record(item, show_ips), ensure_ascii=False))
            first = False
    out.write("\n],\n")
    families = sorted(snap.families.values(), key=lambda f: (-f.members, f.id))
    tail = {
        "summary": summary_record(snap),
        "families": [family_record(f, snap) for f in families if f.members > 1],
        "loops": [loop_record(lp) for lp in loops_sorted(snap)],
        "floods": [flood_record(f) for f in snap.floods],
        "problems": [{"client_id": cid, "problem": p} for cid, p in snap.problems],
    }
    body = json.dumps(tail, ensure_ascii=False, indent=1)
    out.write(body[1:].lstrip("\n"))
    out.write("\n")


def _render_csv(stream: Iterable[Classified], snap: Snapshot, out: IO[str], filters: Filters, show_ips: bool) -> None:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CLIENT_FIELDS)
    for item in stream:
        if filters.match(item, snap.families):
            rec = client_record(item, show_ips)
            rec["name"] = clean(rec["name"], 256)
            rec["redirect_uris"] = " ".join(clean(u, 256) for u in rec["redirect_uris"])
            rec["problems"] = "; ".join(rec["problems"])
            rec["client_id"] = clean(rec["client_id"], 256)
            writer.writerow([rec[k] for k in CLIENT_FIELDS])
