"""The plan: which classified clients the policy acts on, how, and whether the caps allow it (S3, S4)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from reaper.analysis.model import Classified, FamilyStats, Snapshot
from reaper.backends.base import Candidate
from reaper.config import Config
from reaper.errors import ConfigError
from reaper.profiles import BoundProfile


@dataclass
class Plan:
    """What a reap would do, and whether the caps allow it."""

    candidates: list[Candidate]
    total_clients: int
    families: dict[str, FamilyStats]
    cap_problem: str | None = None
    kept_survivors: int = 0
    by_action: Counter[str] = field(default_factory=Counter)


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


def choose(config: Config, stream: Iterable[Classified], snap: Snapshot, now: float) -> Plan:
    """Consume a classified stream and choose what to act on; the caps are evaluated here (S4)."""
    pol = config.policy
    raw: list[Candidate] = []
    for item in stream:
        row = item.row
        if item.verdict not in pol.verdicts or row.created_at is None:
            continue
        if now - row.created_at < pol.min_age:
            continue
        action = pol.actions.get(item.verdict, "delete")  # type: ignore[call-overload]
        if action == "disable" and row.disabled:
            continue  # already off: disabling it again would only add a tombstone
        raw.append(
            Candidate(
                row.key, row.client_id, row.name, item.family, str(item.verdict), item.reason, action, row.created_at
            )
        )
    # Newest first, as a family's members merge into its survivor (the newest orphan's consents move first).
    raw.sort(key=lambda c: (-(c.created_at or 0.0), c.client_id))
    candidates, kept = [], 0
    for c in raw:
        fam = snap.families[c.family]
        if fam.members >= 2 and fam.survivor == c.client_id:
            kept += 1  # S3: the survivor of a family is never reaped
            continue
        if c.action == "merge" and fam.survivor != c.client_id:
            # A lone client is its own family's survivor: nothing to merge into, so no move and no alias
            # (an alias to itself would point at a deleted client); it is deleted with its tombstone.
            c.canonical, c.canonical_key = fam.survivor, fam.survivor_key
        candidates.append(c)
    result = Plan(candidates, snap.clients, snap.families, kept_survivors=kept)
    result.by_action.update(c.action for c in candidates)
    n = len(candidates)
    if n > pol.max_per_run:
        result.cap_problem = f"plan acts on {n} clients, more than policy.max_per_run = {pol.max_per_run}"
    elif snap.clients and n > pol.max_fraction * snap.clients:
        result.cap_problem = (
            f"plan acts on {n} of {snap.clients} clients ({n / snap.clients:.0%}), more than "
            f"policy.max_fraction = {pol.max_fraction:.0%}"
        )
    return result
