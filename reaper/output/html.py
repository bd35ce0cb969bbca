"""The HTML evidence report: one self-contained file (inline CSS and SVG, no script, nothing fetched).

Per churning family, suspected re-auth loop or registration flood: a registration timeline (one mark per
registration, colored by verdict; refresh revocations below) and the evidence rows. What an operator attaches
to a bug report for the client's vendor. Never a secret or a token (never scanned); IPs only as their prefix.
"""

from __future__ import annotations

import heapq
import html
from collections.abc import Iterable
from dataclasses import dataclass
from typing import IO

from reaper import __version__
from reaper.analysis.fingerprint import ip_prefix
from reaper.analysis.model import VERDICTS, Classified, FamilyStats, FloodEvidence, LoopEvidence, LoopStep, Snapshot
from reaper.output.records import Filters, loops_sorted
from reaper.output.text import clean, database_label, duration_text, format_time, iso, short_time

VERDICT_COLORS = {
    "live": "#1a9850",
    "young": "#3b6fd8",
    "orphan": "#d7301f",
    "abandoned": "#f28e00",
    "idle": "#8c8c8c",
    "protected": "#7b3fbf",
}
CHART_BG = "#f4f6fa"
REVOKED_COLOR = "#3a3a3a"
PER_FAMILY_POINTS = 500  # newest registrations kept per family for its chart and table
MAX_POINTS = 100_000  # over all families; past it only families with several members keep collecting
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"

W, H = 1040, 190
LEFT, RIGHT, TOP = 110, 24, 18
REG_Y, REV_Y, AXIS_Y = 72, 132, 158
STACK = 13  # vertical step between marks that would overlap


@dataclass(slots=True)
class Point:
    client_id: str
    created: float
    last_used: float | None
    verdict: str
    reason: str
    ip: str
    redirect_uris: tuple[str, ...] = ()
    software: str = ""


def e(text: object) -> str:
    """Escaped, printable text (control characters shown as escapes)."""
    return html.escape(clean(str(text), None), quote=True)


class _Collector:
    """Keeps the newest registrations of each family (a bounded number) while the stream goes by, in any order."""

    def __init__(self) -> None:
        self.heaps: dict[str, list[tuple[float, str, Point]]] = {}
        self.kept = 0
        self.truncated: set[str] = set()

    def add(self, item: Classified) -> None:
        row = item.row
        if row.created_at is None or row.problems:
            return
        heap = self.heaps.get(item.family)
        if heap is None and self.kept >= MAX_POINTS:
            self.truncated.add(item.family)  # a new family past the overall bound: not charted
            return
        point = Point(
            row.client_id,
            row.created_at,
            row.last_used,
            str(item.verdict),
            item.reason,
            (row.ip_network or ip_prefix(row.ip)) if row.ip else "",
            row.redirect_uris,
            " ".join(x for x in (row.software_id, row.software_version) if x),
        )
        entry = (row.created_at, row.client_id, point)
        if heap is None:
            self.heaps[item.family] = [entry]
            self.kept += 1
        elif len(heap) < PER_FAMILY_POINTS:
            heapq.heappush(heap, entry)
            self.kept += 1
        else:
            self.truncated.add(item.family)
            if heap[0][:2] < entry[:2]:
                heapq.heapreplace(heap, entry)

    def points(self, family: str) -> list[Point]:
        """The family's kept registrations, newest first."""
        return [p for _, _, p in sorted(self.heaps.get(family, ()), key=lambda e: e[:2], reverse=True)]


def _families_to_show(snap: Snapshot, filters: Filters, top_k: int) -> list[FamilyStats]:
    chosen: dict[str, FamilyStats] = {}
    for loop in loops_sorted(snap):
        if loop.family in snap.families:
            chosen.setdefault(loop.family, snap.families[loop.family])
    for flood in snap.floods:
        if flood.scope == "family" and flood.key in snap.families:
            chosen.setdefault(flood.key, snap.families[flood.key])
    for fam in snap.churning():
        chosen.setdefault(fam.id, fam)
    fams = list(chosen.values())
    if filters.family:
        wanted = filters.family.casefold()
        fams = [f for f in snap.families.values() if f.id.startswith(wanted) or f.normalized_name == wanted]
    return fams[: max(top_k, len(snap.loops))] if not filters.family else fams


def _ticks(t0: float, t1: float, n: int = 6) -> list[float]:
    if t1 <= t0:
        return [t0]
    return [t0 + (t1 - t0) * i / (n - 1) for i in range(n)]


def _tick_label(ts: float, span: float) -> str:
    fmt = "%H:%M:%S" if span < 600 else "%m-%d %H:%M"
    return format_time(ts, fmt)


def timeline_svg(points: list[Point], steps: list[LoopStep], title: str) -> str:
    """One mark per registration (colored by verdict) over time; refresh revocations on a second lane, each
    joined by a dashed line to the registration that followed it."""
    times = [p.created for p in points] + [s.revoked_at for s in steps] + [s.next_registered_at for s in steps]
    t0, t1 = min(times), max(times)
    if t1 - t0 < 60:
        t0, t1 = t0 - 30, t1 + 30
    pad = (t1 - t0) * 0.03
    t0, t1 = t0 - pad, t1 + pad
    width = W - LEFT - RIGHT

    def x(t: float) -> float:
        return LEFT + (t - t0) / (t1 - t0) * width

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="timeline" width="{W}" height="{H}" '
        f'viewBox="0 0 {W} {H}" role="img" aria-label="{e(title)}">',
        f'<rect class="chart-bg" x="0" y="0" width="{W}" height="{H}" fill="{CHART_BG}"/>',
        f'<text x="10" y="{REG_Y + 4}" class="lane">registrations</text>',
        f'<line x1="{LEFT}" y1="{REG_Y}" x2="{W - RIGHT}" y2="{REG_Y}" stroke="#d5dae3" stroke-width="1"/>',
    ]
    if steps:
        parts.append(f'<text x="10" y="{REV_Y + 4}" class="lane">refresh revoked</text>')
        parts.append(
            f'<line x1="{LEFT}" y1="{REV_Y}" x2="{W - RIGHT}" y2="{REV_Y}" stroke="#d5dae3" stroke-width="1"/>'
        )
    parts.append(f'<line x1="{LEFT}" y1="{AXIS_Y}" x2="{W - RIGHT}" y2="{AXIS_Y}" stroke="#8a93a3" stroke-width="1"/>')
    span = t1 - t0
    for t in _ticks(t0 + pad, t1 - pad):
        tx = x(t)
        parts.append(f'<line x1="{tx:.1f}" y1="{AXIS_Y}" x2="{tx:.1f}" y2="{AXIS_Y + 5}" stroke="#8a93a3"/>')
        parts.append(
            f'<text x="{tx:.1f}" y="{AXIS_Y + 18}" class="tick" text-anchor="middle">{e(_tick_label(t, span))}</text>'
        )
    for s in steps:
        rx, nx = x(s.revoked_at), x(s.next_registered_at)
        parts.append(
            f'<line x1="{rx:.1f}" y1="{REV_Y - 6}" x2="{nx:.1f}" y2="{REG_Y + 8}" stroke="{REVOKED_COLOR}" '
            'stroke-width="1" stroke-dasharray="3 3"/>'
        )
        parts.append(
            f'<g class="revoked"><title>{e(s.client_id)}: refresh revoked {e(iso(s.revoked_at))}, '
            "re-registered "
            f"{e(duration_text(s.gap))} later as {e(s.next_client_id)}</title>"
            f'<path d="M{rx - 5:.1f} {REV_Y - 5} L{rx + 5:.1f} {REV_Y + 5} M{rx + 5:.1f} {REV_Y - 5} '
            f'L{rx - 5:.1f} {REV_Y + 5}" stroke="{REVOKED_COLOR}" stroke-width="2.2"/></g>'
        )
    # Oldest first, so newer marks are drawn on top; marks closer than a diameter stack around the lane.
    last_x, level = -1e9, 0
    for p in sorted(points, key=lambda p: (p.created, p.client_id)):
        px = x(p.created)
        level = level + 1 if px - last_x < 2 * 7 else 0
        last_x = px if level == 0 else last_x
        k = level % 9
        dy = 0 if k == 0 else (-1 if k % 2 else 1) * ((k + 1) // 2) * STACK
        color = VERDICT_COLORS.get(p.verdict, "#000000")
        parts.append(
            f'<circle cx="{px:.1f}" cy="{REG_Y + dy}" r="7" fill="{color}" stroke="#ffffff" '
            'stroke-width="1.5">'
            f"<title>{e(p.client_id)} · {e(p.verdict)} ({e(p.reason)}) · registered {e(iso(p.created))}"
            f"</title></circle>"
        )
    parts.append("</svg>")
    return "".join(parts)


STYLE = f"""
body {{ font: 14px/1.45 -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: #1d2330;
       margin: 24px auto; max-width: 1080px; padding: 0 16px; background: #ffffff; }}
h1 {{ font-size: 22px; margin: 0 0 4px; }}
h2 {{ font-size: 18px; margin: 28px 0 6px; border-bottom: 1px solid #e3e7ee; padding-bottom: 4px; }}
h3 {{ font-size: 15px; margin: 18px 0 4px; }}
.meta {{ color: #5a6475; margin: 0 0 12px; }}
table {{ border-collapse: collapse; margin: 6px 0 12px; font-size: 13px; max-width: 100%; }}
td code {{ overflow-wrap: anywhere; }}
th, td {{ border: 1px solid #e3e7ee; padding: 3px 8px; text-align: left; vertical-align: top; }}
th {{ background: #f0f2f6; }}
td.n {{ text-align: right; }}
.t {{ white-space: nowrap; }}
code {{ font: 12px/1.3 "DejaVu Sans Mono", Menlo, Consolas, monospace; }}
.badge {{ display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px; margin-left: 6px;
         color: #ffffff; }}
.b-loop {{ background: #b2182b; }} .b-flood {{ background: #8c510a; }} .b-churn {{ background: #4d5b73; }}
.legend span {{ margin-right: 14px; white-space: nowrap; }}
.sw {{ display: inline-block; width: 11px; height: 11px; border-radius: 6px; margin-right: 4px;
      vertical-align: -1px; }}
.timeline {{ display: block; border: 1px solid #e3e7ee; border-radius: 4px; }}
.timeline .lane {{ font-size: 11px; fill: #5a6475; }}
.timeline .tick {{ font-size: 11px; fill: #5a6475; }}
.v {{ font-weight: 600; }}
{"".join(f".v-{v} {{ color: {c}; }}" for v, c in VERDICT_COLORS.items())}
.note {{ color: #5a6475; font-size: 12px; }}
"""


def _table(headers: list[str], rows: Iterable[list[str]], numeric: frozenset[int] = frozenset()) -> str:
    """Cells are already-escaped HTML."""
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join(
        "<tr>"
        + "".join(f'<td class="n">{c}</td>' if i in numeric else f"<td>{c}</td>" for i, c in enumerate(r))
        + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _time(ts: float | None) -> str:
    text = iso(ts)
    return f'<span class="t">{e(text)}</span>' if text else "-"


def _verdict(v: str) -> str:
    return f'<span class="v v-{e(v)}">{e(v)}</span>'


def _legend() -> str:
    items = "".join(f'<span><i class="sw" style="background:{c}"></i>{e(v)}</span>' for v, c in VERDICT_COLORS.items())
    return (
        f'<p class="legend">{items}<span><b style="color:{REVOKED_COLOR}">×</b> refresh token revoked '
        "(dashed: the registration that followed)</span></p>"
    )


def _loops_section(snap: Snapshot) -> str:
    if not snap.loops:
        return ""
    rows = [
        [
            f"<code>{e(lp.family)}</code>",
            e(clean(lp.name, 80) or "(no name)"),
            str(lp.cycles),
            e(duration_text(lp.median_gap)),
            _time(lp.first_revoked_at),
            _time(lp.last_revoked_at),
        ]
        for lp in loops_sorted(snap)
    ]
    return (
        f"<h2>Suspected re-auth loops: {len(snap.loops)}</h2>"
        f'<p class="note">A family is suspected when {e(snap.loop_rule())}: the client software lost its '
        "refresh token and authenticated from scratch.</p>"
        + _table(
            ["family", "name", "cycles", "median revoked → re-registered", "first revoked", "last revoked"],
            rows,
            frozenset({2}),
        )
    )


def _floods_section(snap: Snapshot) -> str:
    if not snap.floods:
        return ""
    rows = []
    for f in snap.floods:
        key = f"<code>{e(f.key)}</code>"
        sample = ", ".join(f"<code>{e(m.client_id)}</code>" for m in f.members[:3])
        rows.append(
            [
                e(f.scope),
                key,
                e(clean(f.name, 60) or "(no name)"),
                str(f.registrations),
                _time(f.first_at),
                e(duration_text(f.seconds)),
                sample,
            ]
        )
    return (
        f"<h2>Registration floods: {len(snap.floods)}</h2>"
        '<p class="note">Never-used registrations (no token, no code) packed into a short time, in one '
        "family or "
        "from one registrant IP prefix (addresses are never shown).</p>"
        + _table(
            ["scope", "family / IP prefix", "name", "registrations", "first", "within", "sample client_ids"],
            rows,
            frozenset({3}),
        )
    )


def _family_section(
    fam: FamilyStats, snap: Snapshot, points: list[Point], truncated: bool, filters: Filters, max_rows: int
) -> str:
    loop: LoopEvidence | None = snap.loops.get(fam.id)
    floods: list[FloodEvidence] = [f for f in snap.floods if f.scope == "family" and f.key == fam.id]
    steps = loop.steps if loop else []
    badges = ""
    if loop:
        badges += f'<span class="badge b-loop">suspected re-auth loop · {loop.cycles} cycles</span>'
    if floods:
        badges += (
            f'<span class="badge b-flood">flood · {floods[0].registrations} in '
            f"{e(duration_text(floods[0].seconds))}</span>"
        )
    if fam.recent >= snap.churn_min_registrations:
        badges += f'<span class="badge b-churn">churning · {fam.recent} in {e(duration_text(snap.churn_window))}</span>'
    out = [
        f'<section class="family" id="f-{e(fam.id)}">',
        f"<h3>{e(clean(fam.name, 120) or '(no name)')} <code>{e(fam.id)}</code>{badges}</h3>",
        f'<p class="meta">{fam.members} registrations · {fam.live} live · {fam.orphans} orphans · '
        f"{fam.abandoned} abandoned · first {e(short_time(fam.first_registered))} · last "
        f"{e(short_time(fam.last_registered))} · median gap {e(duration_text(fam.median_interval))} · "
        "canonical "
        f"client <code>{e(fam.survivor or '-')}</code></p>",
    ]
    if points:
        out.append(timeline_svg(points, steps, f"registrations of {clean(fam.name, 80)}"))
        if truncated:
            out.append(
                f'<p class="note">Chart and table show the newest {len(points)} of {fam.members} registrations.</p>'
            )
    revoked = {s.client_id: s for s in steps}
    shown = [p for p in points if not filters.verdicts or p.verdict in filters.verdicts]
    limit = max_rows or len(shown)
    has_ip = any(p.ip for p in shown)
    has_software = any(p.software for p in shown)
    headers = ["client_id", "registered at", "last token", "verdict", "reason", "redirect URIs"]
    if has_software:
        headers.append("software")
    if steps:
        headers += ["refresh revoked", "re-registered after"]
    if has_ip:
        headers.append("IP prefix")
    rows = []
    for p in shown[:limit]:
        row = [
            f"<code>{e(p.client_id)}</code>",
            _time(p.created),
            _time(p.last_used),
            _verdict(p.verdict),
            e(p.reason),
            "<br>".join(f'<code class="uri">{e(clean(u, 120))}</code>' for u in p.redirect_uris[:5])
            + (f" (+{len(p.redirect_uris) - 5})" if len(p.redirect_uris) > 5 else ""),
        ]
        if has_software:
            row.append(e(clean(p.software, 60)))
        if steps:
            st = revoked.get(p.client_id)
            row += (
                [_time(st.revoked_at), f"{e(duration_text(st.gap))} as <code>{e(st.next_client_id)}</code>"]
                if st
                else ["", ""]
            )
        if has_ip:
            row.append(f"<code>{e(p.ip)}</code>" if p.ip else "")
        rows.append(row)
    out.append(_table(headers, rows))
    if len(shown) > limit:
        out.append(f'<p class="note">{len(shown) - limit} more rows not listed (report.max_rows = {max_rows}).</p>')
    out.append("</section>")
    return "".join(out)


def render_html(
    stream: Iterable[Classified],
    snap: Snapshot,
    out: IO[str],
    filters: Filters,
    top_k: int = 10,
    max_rows: int = 50,
    run: dict[str, object] | None = None,
) -> None:
    """Write the whole report; the stream is consumed first (families are known only at its end). `run` (id,
    acted, when, software): the report of a past run, from the evidence kept with it."""
    collector = _Collector()
    for item in stream:
        collector.add(item)
    fams = _families_to_show(snap, filters, top_k)
    verdict_rows = []
    for v in VERDICTS:
        n = snap.by_verdict.get(v, 0)
        reasons = ", ".join(f"{r} {c}" for (vv, r), c in sorted(snap.by_reason.items()) if vv == v)
        verdict_rows.append([_verdict(str(v)), str(n), e(reasons)])
    title = f"dcr-reaper evidence report · {snap.profile}"
    body = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        (
            f'<p class="meta">Evidence kept with run <code>{e(run["id"])}</code>, which acted on {e(run["acted"])} '
            f"client(s) on {e(iso(float(str(run['started_at']))))}: the scan below is the one that run planned "
            "from, as it was before the reap.</p>"
            if run
            else ""
        ),
        f'<p class="meta">{e(database_label(snap.database))} · scanned {e(iso(snap.started_at))} · {snap.clients} '
        f"clients in {len(snap.families)} families · loop detection: {e(snap.loop_detection)} · "
        f"{e(run.get('software') if run else f'dcr-reaper {__version__}')}</p>",
        "<h2>Clients by verdict</h2>",
        _table(["verdict", "clients", "reasons"], verdict_rows, frozenset({1})),
        _loops_section(snap),
        _floods_section(snap),
        f"<h2>Registration timelines: {len(fams)} famil{'y' if len(fams) == 1 else 'ies'}</h2>",
        f'<p class="note">Churning families (≥ {snap.churn_min_registrations} registrations in '
        f"{e(duration_text(snap.churn_window))}), suspected loops and floods. One mark per registration, by "
        "its "
        "verdict; times are UTC.</p>",
        _legend(),
    ]
    if not fams:
        body.append('<p class="note">No family churns, loops or floods.</p>')
    for fam in fams:
        body.append(
            _family_section(fam, snap, collector.points(fam.id), fam.id in collector.truncated, filters, max_rows)
        )
    body.append(
        '<p class="note">Client secrets and tokens are never read by dcr-reaper; registrant IPs appear only '
        "as their network prefix.</p></body></html>\n"
    )
    out.write("\n".join(body))
