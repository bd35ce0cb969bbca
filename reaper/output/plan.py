"""Render a reap plan, a run result and the runs in the ledger for people (table) and machines (JSON)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import IO, Any

from reaper.backends.base import Candidate
from reaper.ledger import RunInfo
from reaper.output.text import clean, iso, short_time, utf8_safe
from reaper.reaping.plan import SKIP_REASONS, Plan, RunResult

SKIP_WORDS = {
    "selector": "not selected (--family, --verdict, --client, --older-than)",
    "min_age": "younger than policy.min_age",
    "survivor": "its family's survivor (never reaped)",
    "already_disabled": "already disabled",
    "backlog": "beyond policy.max_per_run: left for the next runs",
    "limit": "beyond --limit: left for the next runs",
}


def _client(c: Candidate) -> dict[str, Any]:
    return {
        "client_id": utf8_safe(c.client_id),
        "name": utf8_safe(c.name),
        "family": c.family,
        "verdict": c.verdict,
        "reason": c.reason,
        "action": c.action,
        "registered_at": iso(c.created_at),
        "last_token_at": iso(c.last_used),
        "canonical_client_id": utf8_safe(c.canonical),
    }


def plan_record(result: RunResult) -> dict[str, Any]:
    p = result.plan
    return {
        "applied": result.applied,
        "run_id": result.run_id,
        "clients_scanned": p.total_clients,
        "reapable": p.reapable,
        "planned": len(p.candidates),
        "planned_by_action": dict(p.by_action),
        "skipped_by_reason": dict(p.skipped_by),
        "backlog": p.backlog,
        "survivors_kept": p.kept_survivors,
        "active_clients": p.active_clients,
        "active_planned": p.active_planned,
        "cap_problem": p.cap_problem,
        "acted": [{"action": a, "reason": r, "clients": n} for (a, r), n in sorted(result.acted.items())],
        "skipped": dict(result.skipped),
        "restored_late": len(result.restored_late),
        "stopped": result.stopped,
        "duration_seconds": round(result.duration, 3),
        "candidates": [_client(c) for c in p.candidates],
        "skipped_clients": [{**_client(s.candidate), "skipped": s.why} for s in p.skipped],
    }


def render_run(result: RunResult, fmt: str, out: IO[str], max_rows: int = 50) -> None:
    """Write the plan (dry-run) or what was done (--apply)."""
    if fmt == "json":
        out.write(json.dumps(plan_record(result), ensure_ascii=False, indent=1) + "\n")
        return
    p: Plan = result.plan
    actions = ", ".join(f"{a} {n}" for a, n in sorted(p.by_action.items())) or "nothing"
    lines = [
        f"{'APPLIED' if result.applied else 'DRY RUN (nothing written; add --apply to act)'}: "
        f"{p.reapable} of {p.total_clients} clients are reapable; {len(p.candidates)} planned ({actions}), "
        f"{len(p.skipped)} skipped",
    ]
    for why, n in sorted(p.skipped_by.items(), key=lambda kv: SKIP_REASONS.index(kv[0])):
        lines.append(f"  skipped {n}: {SKIP_WORDS[why]}")
    if p.backlog:
        lines.append(
            f"BACKLOG: {p.backlog} reapable clients left after this run; each run acts on the oldest "
            "policy.max_per_run (serve works it down tick by tick; or raise policy.max_per_run)"
        )
    if p.cap_problem:
        lines.append(f"STOP: {p.cap_problem}")
    if result.applied and result.run_id is None:
        lines.append("nothing to act on: no run recorded")
    elif result.applied:
        done = ", ".join(f"{a}/{r} {n}" for (a, r), n in sorted(result.acted.items())) or "nothing"
        lines.append(
            f"run {result.run_id}: acted on {result.total_acted} ({done}) in {result.batches} batches, "
            f"{result.duration:.2f}s"
        )
        if result.skipped:
            lines.append(
                "skipped (live or changed since the scan): " + ", ".join(f"{k} {n}" for k, n in result.skipped.items())
            )
        if result.restored_late:
            lines.append(f"restored at once (a credential arrived after the delete): {len(result.restored_late)}")
        if result.stopped:
            lines.append("stopped between batches on request; the next run finishes the job")
    lines += _client_table("Planned", p.candidates, max_rows, lambda c: c.action)
    skips = {id(s.candidate): s.why for s in p.skipped}
    lines += _client_table("Skipped", [s.candidate for s in p.skipped], max_rows, lambda c: f"skip: {skips[id(c)]}")
    out.write("\n".join(lines) + "\n")


def _client_table(title: str, cands: list[Candidate], max_rows: int, what: Callable[[Candidate], str]) -> list[str]:
    shown = cands if max_rows == 0 else cands[:max_rows]
    if not shown:
        return []
    headers = ["client_id", "name", "family", "verdict", "action", "registered", "canonical"]
    rows = [
        [
            clean(c.client_id, 36),
            clean(c.name, 40) or "(no name)",
            c.family,
            c.verdict,
            what(c),
            short_time(c.created_at),
            clean(c.canonical, 36) if c.canonical else "",
        ]
        for c in shown
    ]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["", f"{title}: {len(cands)}"]
    lines.append("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    if len(shown) < len(cands):
        lines.append(f"... and {len(cands) - len(shown)} more (--format json lists all)")
    return lines


def run_record(info: RunInfo) -> dict[str, Any]:
    return {
        "id": info.id,
        "kind": info.kind,
        "profile": info.profile,
        "status": info.status,
        "started_at": iso(info.started_at),
        "finished_at": iso(info.finished_at),
        "planned": info.planned,
        "acted": info.acted,
        "restored": info.restored,
        "restored_late": info.late,
        "pending": info.pending,
        "purged": info.purged,
        "holder": info.holder,
        "message": info.message,
    }


def render_runs(runs: list[RunInfo], fmt: str, out: IO[str]) -> None:
    """The runs in the ledger, newest first: full ids (any unique prefix names a run)."""
    if fmt == "json":
        out.write(json.dumps([run_record(r) for r in runs], ensure_ascii=False, indent=1) + "\n")
        return
    if not runs:
        out.write("no runs in the ledger\n")
        return
    headers = ["run", "started", "status", "planned", "acted", "restored", "profile"]
    rows = [
        [
            r.id,
            short_time(r.started_at),
            r.status,
            str(r.planned),
            str(r.acted),
            "purged" if r.purged else str(r.restored),
            r.profile,
        ]
        for r in runs
    ]
    _table(headers, rows, out)


def _table(headers: list[str], rows: list[list[str]], out: IO[str]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    out.write("\n".join(lines) + "\n")


def render_run_detail(info: RunInfo, clients: list[Any], fmt: str, out: IO[str], has_evidence: bool) -> None:
    """One run: its record, then its clients (full client_ids: paste one into `restore --client`)."""
    listed = [
        {
            "client_id": c.client_id,
            "key": c.client_key,
            "action": c.action,
            "verdict": c.verdict,
            "reason": c.reason,
            "family": c.family,
            "state": "restored" if c.restored_at is not None and c.state == "done" else c.state,
            "acted_at": iso(c.acted_at),
            "restored_at": iso(c.restored_at),
        }
        for c in clients
    ]
    if fmt == "json":
        record = {**run_record(info), "evidence": has_evidence, "clients": listed}
        out.write(json.dumps(record, ensure_ascii=False, indent=1) + "\n")
        return
    lines = [
        f"run       {info.id}",
        f"status    {info.status}" + (f" ({clean(info.message, 200)})" if info.message else ""),
        f"profile   {info.profile}",
        f"started   {short_time(info.started_at)}    finished {short_time(info.finished_at)}",
        f"clients   planned {info.planned}, acted on {info.acted}, restored {info.restored}"
        + (f", restored at once (late credential) {info.late}" if info.late else "")
        + (f", pending {info.pending}" if info.pending else ""),
        f"by        {info.holder}",
        f"evidence  {'kept: `dcr-reaper runs show ' + info.id[:8] + ' --format html`' if has_evidence else 'none'}",
    ]
    if info.purged:
        lines.append("tombstones purged (ledger purge): nothing of this run can be restored")
    out.write("\n".join(lines) + "\n")
    if listed:
        out.write("\n")
        headers = ["client_id", "action", "verdict", "reason", "state", "acted"]
        rows = [
            [c["client_id"], c["action"], c["verdict"], c["reason"], c["state"], short_time(c2.acted_at)]
            for c, c2 in zip(listed, clients, strict=True)
        ]
        _table(headers, rows, out)
        if len(listed) < info.tombstones:
            out.write(f"... and {info.tombstones - len(listed)} more (--limit 0 lists all)\n")
