"""Render a classified scan as a human table, JSON, CSV or Markdown. Never prints a secret (S8)."""

from __future__ import annotations

import csv
import heapq
import json
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any

import orjson

from reaper.analysis.model import VERDICTS, Classified, Snapshot
from reaper.output.records import (
    CLIENT_FIELDS,
    Filters,
    client_record,
    family_record,
    flood_record,
    loop_record,
    loops_sorted,
    raw_client_record,
    summary_record,
)
from reaper.output.text import (
    ISO_OPTIONS,
    clean,
    csv_cell,
    database_label,
    duration_text,
    iso,
    md_cell,
    md_code,
    short_time,
)

LOOP_STEPS_IN_TABLE = 10


def _table(headers: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def fmt(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return [fmt(headers).rstrip(), "  ".join("-" * w for w in widths), *(fmt(r).rstrip() for r in rows)]


ID_COLUMNS = frozenset({"client_id", "canonical client", "next registration"})


def _md(headers: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    """A Markdown table: client IDs as code spans (exact, for pasting), every other cell escaped to plain text."""
    ids = {i for i, h in enumerate(headers) if h in ID_COLUMNS}
    align = ["---:" if i in right else "---" for i in range(len(headers))]
    return [
        "| " + " | ".join(headers) + " |",
        "| " + " | ".join(align) + " |",
        *("| " + " | ".join(md_code(c) if i in ids else md_cell(c) for i, c in enumerate(r)) + " |" for r in rows),
    ]


Show = Callable[[str | None, int], str]


def _cut(text: str | None, limit: int) -> str:
    return clean(text, limit)


def _whole(text: str | None, limit: int) -> str:
    return clean(text, None)


def _sections(
    snap: Snapshot, listed: list[Classified], matched: int, top_k: int, title: str, show: Show = _cut
) -> list[tuple[str, list[str], list[list[str]], set[int]]]:
    verdict_rows = []
    for v in VERDICTS:
        reasons = sorted((r, n) for (vv, r), n in snap.by_reason.items() if vv == v)
        verdict_rows.append([str(v), str(snap.by_verdict.get(v, 0)), ", ".join(f"{r} {n}" for r, n in reasons)])
    fams = snap.top_families(top_k)
    fam_rows = [
        [
            f.id,
            show(f.name, 40) or "(no name)",
            str(f.members),
            str(f.live),
            str(f.orphans),
            str(f.recent),
            short_time(f.first_registered),
            short_time(f.last_registered),
            duration_text(f.median_interval),
            "yes" if f.recent >= snap.churn_min_registrations else "",
            show(f.survivor, 36),
        ]
        for f in fams
    ]
    client_rows = [
        [
            show(c.row.client_id, 36),
            show(c.row.name, 40) or "(no name)",
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
    sections[2:2] = _loop_sections(snap, show)  # after the families, before the client listing
    if snap.problem_count:
        probs = [[show(cid, 36), show(p, 80)] for cid, p in snap.problems[:50]]
        sections.append(
            (
                f"Rows with problems (skipped, never reaped): {snap.problem_count}",
                ["client_id", "problem"],
                probs,
                set(),
            )
        )
    return sections


def _loop_sections(snap: Snapshot, show: Show = _cut) -> list[tuple[str, list[str], list[list[str]], set[int]]]:
    """Suspected re-auth loops, their evidence, and floods; nothing when there are none."""
    out: list[tuple[str, list[str], list[list[str]], set[int]]] = []
    if snap.loops:
        loops = loops_sorted(snap)
        out.append(
            (
                f"Suspected re-auth loops: {len(loops)} ({snap.loop_rule()})",
                ["family", "name", "cycles", "median revoked→re-registered", "first revoked", "last revoked"],
                [
                    [
                        lp.family,
                        show(lp.name, 40) or "(no name)",
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
                show(st.client_id, 36),
                short_time(st.registered_at),
                short_time(st.last_token_at),
                short_time(st.revoked_at),
                show(st.next_client_id, 36),
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
                        show(f.key, 43),
                        show(f.name, 40) or "(no name)",
                        str(f.registrations),
                        short_time(f.first_at),
                        short_time(f.last_at),
                        duration_text(f.seconds),
                        ", ".join(show(m.client_id, 24) for m in f.members[:3]),
                    ]
                    for f in snap.floods
                ],
                {3},
            )
        )
    return out


def _collect(
    stream: Iterable[Classified], filters: Filters, snap: Snapshot, limit: int
) -> tuple[list[Classified], int]:
    """The newest `limit` matching clients (all when 0), newest first, and how many matched."""
    heap: list[tuple[tuple[float, str], int, Classified]] = []
    listed: list[Classified] = []
    matched = 0
    keep = filters.keep(snap.families)
    for item in stream:
        if keep is None or keep(item):
            matched += 1
            order = (item.row.created_at if item.row.created_at is not None else float("-inf"), item.row.key)
            if limit == 0:
                listed.append(item)
            elif len(heap) < limit:
                heapq.heappush(heap, (order, matched, item))
            elif heap[0][0] < order:
                heapq.heapreplace(heap, (order, matched, item))
    if limit:
        listed = [item for _, _, item in heap]
    listed.sort(
        key=lambda i: (i.row.created_at if i.row.created_at is not None else float("-inf"), i.row.key), reverse=True
    )
    return listed, matched


def render_report(
    fmt: str,
    stream: Iterator[Classified],
    snap: Snapshot,
    out: IO[str],
    filters: Filters,
    top_k: int = 10,
    max_rows: int = 50,
    show_ips: bool = False,
    wide: bool = False,
) -> None:
    """Write the report in one format; client rows stream for json and csv."""
    if fmt == "json":
        _render_json(stream, snap, out, filters, show_ips)
    elif fmt == "csv":
        _render_csv(stream, snap, out, filters, show_ips)
    elif fmt in ("table", "markdown"):
        default = not filters.verdicts and not filters.family
        use = Filters(filters.reapable) if default else filters
        listed, matched = _collect(stream, use, snap, max_rows)
        title = (
            f"Reapable clients ({', '.join(sorted(filters.reapable))}; a plan acts on or skips each)"
            if default
            else "Clients"
        )
        header = (
            f"dcr-reaper report · profile {snap.profile} · {database_label(snap.database)} · {iso(snap.started_at)} · "
            f"{snap.clients} clients, {len(snap.families)} families, scanned in {snap.duration:.2f}s"
        )
        lines = [f"# {header}" if fmt == "markdown" else header, ""]
        notes = notices(snap)
        if notes:
            lines += [f"> {n}" if fmt == "markdown" else f"NOTE: {n}" for n in notes] + [""]
        show = _cut if fmt == "table" and not wide else _whole  # IDs are cut only on a terminal
        for heading, headers, rows, right in _sections(snap, listed, matched, top_k, title, show):
            lines.append(f"## {heading}" if fmt == "markdown" else heading)
            lines.append("")
            lines += (_md if fmt == "markdown" else _table)(headers, rows, right)
            lines.append("")
        out.write("\n".join(lines))
    else:
        raise ValueError(f"unknown format {fmt}")


def notices(snap: Snapshot) -> list[str]:
    """What the operator must decide, from this scan: never-expiring credentials, a clock that disagrees."""
    out = []
    if snap.live_forever_only:
        fix = f"set {snap.forever_fix} to the server's refresh-token lifetime, or " if snap.forever_fix else "set "
        out.append(
            f"{snap.live_forever_only} client(s) are live only because their credentials never expire; "
            f"{fix}classify.stale_after to reap superseded ones that stopped refreshing"
        )
    if abs(snap.clock_skew) >= 60:
        out.append(
            f"the database's clock and this host's differ by {snap.clock_skew:+.0f}s: verdicts use the database's; "
            "a reap refuses to act beyond classify.clock_skew"
        )
    return out


WRITE_EVERY = 1000  # records a write carries: fewer, larger writes; memory bounded by this many records


def _json_record(record: dict[str, Any]) -> str:
    """One record as compact JSON (orjson; the standard library for what orjson refuses, e.g. huge integers)."""
    try:
        return orjson.dumps(record).decode()
    except orjson.JSONEncodeError:
        return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


def _write_records(out: IO[str], lines: Iterable[str]) -> None:
    """The elements of a JSON array, one record a line, written WRITE_EVERY at a time."""
    pending: list[str] = []
    separator = "\n  "
    for line in lines:
        pending.append(separator + line)
        separator = ",\n  "
        if len(pending) >= WRITE_EVERY:
            out.write("".join(pending))
            pending.clear()
    out.write("".join(pending))


def _client_lines(
    items: Iterable[Classified], keep: Callable[[Classified], bool] | None, show_ips: bool
) -> Iterator[str]:
    """The kept clients' records as JSON text: built for orjson to write the times and check the text in C; a
    record it refuses (text that was not UTF-8, a huge integer) is built guarded and written by `_json_record`."""
    dumps, build = orjson.dumps, raw_client_record
    for item in items:
        if keep is not None and not keep(item):
            continue
        try:
            yield dumps(build(item, show_ips), option=ISO_OPTIONS).decode()
        except orjson.JSONEncodeError:
            yield _json_record(client_record(item, show_ips))


def _render_json(stream: Iterable[Classified], snap: Snapshot, out: IO[str], filters: Filters, show_ips: bool) -> None:
    """Client records written as they arrive (one a line), then the summary once the stream is complete."""
    out.write('{"clients": [')
    _write_records(out, _client_lines(stream, filters.keep(snap.families), show_ips))
    out.write("\n],\n")
    out.write(f'"summary": {json.dumps(summary_record(snap), ensure_ascii=False, indent=1)},\n"families": [')
    # Families one a line, as they are written: tens of thousands of them never make one document in memory.
    families = sorted(snap.families.values(), key=lambda f: (-f.members, f.id))
    _write_records(out, (_json_record(family_record(fam, snap)) for fam in families if fam.members > 1))
    rest = {
        "loops": [loop_record(lp) for lp in loops_sorted(snap)],
        "floods": [flood_record(f) for f in snap.floods],
        "problems": [{"client_id": cid, "problem": p} for cid, p in snap.problems],
    }
    out.write("\n],\n" + json.dumps(rest, ensure_ascii=False, indent=1)[1:].lstrip("\n") + "\n")


def _render_csv(stream: Iterable[Classified], snap: Snapshot, out: IO[str], filters: Filters, show_ips: bool) -> None:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CLIENT_FIELDS)
    pending: list[list[str]] = []
    keep = filters.keep(snap.families)
    for item in stream:
        if keep is None or keep(item):
            rec = client_record(item, show_ips)
            rec["redirect_uris"] = " ".join(rec["redirect_uris"])
            rec["problems"] = "; ".join(rec["problems"])
            pending.append([csv_cell(rec[k]) for k in CLIENT_FIELDS])
            if len(pending) >= WRITE_EVERY:
                writer.writerows(pending)
                pending.clear()
    writer.writerows(pending)
