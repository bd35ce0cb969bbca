"""The plan: every client the policy calls reapable, acted on or skipped with the reason why (S3, S4).

A run acts on the oldest `policy.max_per_run` reapable clients and says how many are left (the backlog), so a
table full of junk is worked down run by run. What stops a run is the circuit breaker: a plan that would act on a
large share of the clients that were active a moment ago is the signature of a misconfigured profile (one that
reads live clients as dead), not of junk.
"""

from __future__ import annotations

import difflib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from reaper.analysis.fingerprint import normalize_name
from reaper.analysis.model import Classified, FamilyStats, Snapshot
from reaper.backends.base import Candidate
from reaper.config import Config
from reaper.errors import ConfigError
from reaper.profiles import BoundProfile

# Why a reapable client is not acted on in this run.
SKIP_REASONS = ("selector", "min_age", "survivor", "already_disabled", "backlog", "limit")


@dataclass(frozen=True)
class Selection:
    """`reap --family/--verdict/--client/--older-than/--limit`: which reapable clients this run may touch."""

    family: str | None = None
    verdicts: frozenset[str] = frozenset()
    clients: frozenset[str] = frozenset()
    older_than: float | None = None
    limit: int | None = None

    def __bool__(self) -> bool:
        return bool(self.family or self.verdicts or self.clients or self.older_than is not None or self.limit)


@dataclass(slots=True)
class Skip:
    """A reapable client this run leaves alone, and why."""

    candidate: Candidate
    why: str  # one of SKIP_REASONS


@dataclass
class Plan:
    """What a reap would do, what it leaves and why, and whether the breaker allows it."""

    candidates: list[Candidate]
    total_clients: int
    families: dict[str, FamilyStats]
    skipped: list[Skip] = field(default_factory=list)
    cap_problem: str | None = None
    by_action: Counter[str] = field(default_factory=Counter)
    active_clients: int = 0  # clients with a credential issued within policy.active_window
    active_planned: int = 0  # of them, how many the plan acts on

    @property
    def reapable(self) -> int:
        """Every client the policy's verdicts cover: acted on plus skipped (the report's count)."""
        return len(self.candidates) + len(self.skipped)

    @property
    def skipped_by(self) -> Counter[str]:
        return Counter(s.why for s in self.skipped)

    @property
    def kept_survivors(self) -> int:
        return self.skipped_by["survivor"]

    @property
    def backlog(self) -> int:
        """Reapable clients left for later runs by policy.max_per_run or --limit."""
        by = self.skipped_by
        return by["backlog"] + by["limit"]


@dataclass
class RunResult:
    """What a reap run did."""

    plan: Plan
    applied: bool
    run_id: str | None = None
    acted: Counter[tuple[str, str]] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    restored_late: list[str] = field(default_factory=list)
    batches: int = 0
    stopped: bool = False
    duration: float = 0.0

    @property
    def total_acted(self) -> int:
        return sum(self.acted.values())


def check_actions(config: Config, profile: BoundProfile) -> None:
    """Every action the policy would take is one the profile allows."""
    allowed = set(profile.actions)  # an [api] profile (Keycloak): its API's actions; else the SQL ones
    problems = []
    for verdict in config.policy.verdicts:
        action = config.policy.actions.get(verdict, "delete")
        if action not in allowed:
            problems.append(
                f"policy.actions.{verdict}: profile '{profile.name}' does not allow '{action}' "
                f"(it allows: {', '.join(sorted(allowed))})"
            )
        if action == "disable" and not profile.profile.delete.disable_set and profile.profile.api is None:
            problems.append(f"policy.actions.{verdict}: profile '{profile.name}' has no disabled flag to set")
    if problems:
        raise ConfigError(problems)


def _nearest(wanted: str, known: Iterable[str], what: str) -> str:
    close = difflib.get_close_matches(wanted, sorted(set(known)), n=3, cutoff=0.5)
    return f"no {what} {wanted!r}" + (f"; the nearest: {', '.join(repr(c) for c in close)}" if close else "")


def resolve_family(wanted: str, families: dict[str, FamilyStats]) -> set[str]:
    """Family ids matching an id prefix or a normalized name; ConfigError with the nearest names if none."""
    folded = wanted.casefold()
    name = normalize_name(wanted)
    found = {f.id for f in families.values() if f.id.startswith(folded) or f.normalized_name == name}
    if not found:
        raise ConfigError("--family: " + _nearest(name, [f.normalized_name for f in families.values()], "family"))
    return found


def resolve_clients(wanted: Iterable[str], known: Iterable[str]) -> set[str]:
    """client_ids matching each wanted id or unique prefix; ConfigError naming the nearest when one matches none
    or several."""
    ids = sorted(set(known))
    out: set[str] = set()
    problems = []
    for w in wanted:
        if w in ids:
            out.add(w)
            continue
        matches = [i for i in ids if i.startswith(w)]
        if len(matches) == 1:
            out.add(matches[0])
        elif matches:
            problems.append(f"--client: {w!r} is the start of {len(matches)} client_ids; give more of it")
        else:
            problems.append("--client: " + _nearest(w, ids, "reapable client"))
    if problems:
        raise ConfigError(problems)
    return out


def choose(
    config: Config, stream: Iterable[Classified], snap: Snapshot, now: float, selection: Selection | None = None
) -> Plan:
    """Consume a classified stream and account for every reapable client: acted on, or skipped and why."""
    pol = config.policy
    sel = selection or Selection()
    active_since = now - pol.active_window
    active = 0
    reapable: list[Candidate] = []
    for item in stream:
        row = item.row
        if row.last_used is not None and row.last_used >= active_since:
            active += 1
        if item.verdict not in pol.verdicts:
            continue
        action = pol.actions.get(item.verdict, "delete")  # type: ignore[call-overload]
        reapable.append(
            Candidate(
                row.key,
                row.client_id,
                row.name,
                item.family,
                str(item.verdict),
                item.reason,
                action,
                row.created_at,
                last_used=row.last_used,
                disabled=row.disabled,
            )
        )
    skipped: list[Skip] = []
    families = resolve_family(sel.family, snap.families) if sel.family else None
    clients = resolve_clients(sel.clients, (c.client_id for c in reapable)) if sel.clients else None
    eligible: list[Candidate] = []
    for c in reapable:
        fam = snap.families[c.family]
        if (
            (families is not None and c.family not in families)
            or (sel.verdicts and c.verdict not in sel.verdicts)
            or (clients is not None and c.client_id not in clients)
            or (sel.older_than is not None and (c.created_at is None or now - c.created_at < sel.older_than))
        ):
            skipped.append(Skip(c, "selector"))
        elif c.created_at is None or now - c.created_at < pol.min_age:
            skipped.append(Skip(c, "min_age"))
        elif fam.members >= 2 and fam.survivor == c.client_id:
            skipped.append(Skip(c, "survivor"))  # S3: the survivor of a family is never reaped
        elif c.action == "disable" and c.disabled:
            skipped.append(Skip(c, "already_disabled"))  # disabling it again would only add a tombstone
        else:
            if c.action == "merge" and fam.survivor != c.client_id:
                # A lone client is its own family's survivor: nothing to merge into, so no move and no alias (an
                # alias to itself would point at a deleted client); it is deleted with its tombstone.
                c.canonical, c.canonical_key = fam.survivor, fam.survivor_key
            eligible.append(c)
    # The oldest first: a backlog is worked down from its oldest end, run after run (S4).
    eligible.sort(key=lambda c: (c.created_at or 0.0, c.client_id))
    room = pol.max_per_run if sel.limit is None else min(pol.max_per_run, sel.limit)
    for c in eligible[room:]:
        skipped.append(Skip(c, "limit" if sel.limit is not None and sel.limit < pol.max_per_run else "backlog"))
    acting = eligible[:room]
    # Newest first within the run, as a family's members merge into its survivor (the newest orphan's consents
    # move first).
    acting.sort(key=lambda c: (-(c.created_at or 0.0), c.client_id))
    plan = Plan(acting, snap.clients, snap.families, skipped, active_clients=active)
    plan.by_action.update(c.action for c in acting)
    plan.active_planned = sum(1 for c in acting if c.last_used is not None and c.last_used >= active_since)
    if plan.active_planned >= pol.breaker_min and plan.active_planned > pol.max_fraction * max(active, 1):
        plan.cap_problem = (
            f"circuit breaker: the plan acts on {plan.active_planned} of the {active} clients that received a "
            f"credential within policy.active_window ({pol.active_window:.0f}s), more than policy.max_fraction = "
            f"{pol.max_fraction:.0%}; a profile that reads live clients as dead looks like this. Check the "
            "profile's live conditions (dcr-reaper check), then pass --force if these clients really are dead"
        )
    return plan
