"""The /metrics contract: a golden exposition for a fixed snapshot, every metric documented, bounded series
whatever the client names (100,000 hostile ones, in memory and through a real scan), no label injection, and
`promtool check metrics` on all of it."""

from __future__ import annotations

import difflib
import os
import re
import sqlite3
import time
from collections import Counter
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kit.prometheus import promtool_check
from reaper import __version__
from reaper.analysis.fingerprint import normalize_name
from reaper.analysis.model import VERDICTS, FamilyStats, Snapshot, Verdict
from reaper.commands import report
from reaper.config import load_config
from reaper.demo import SCHEMA
from reaper.service.metrics import LABEL_MAX, OTHER, ReaperMetrics, label_value, top_names

GOLDEN = Path(__file__).parent / "golden" / "metrics.txt"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"
T0 = 1_700_000_000.0  # fixed clock for the golden snapshot

# Names a registration endpoint accepts from anyone: label injection, control and bidi characters, quotes,
# backslashes, newlines, a lone surrogate, very long text.
INJECTION = 'evil"} dcr_clients{verdict="live"} 1e9 #'
HOSTILE = [
    INJECTION,
    'evil\n# HELP dcr_clients pwned\n# TYPE dcr_clients counter\ndcr_clients{verdict="live"} 1e9',
    "\u202egnp.exe RTL override",
    'quote " backslash \\ both \\" end\\',
    "tab\tcr\rnul\x00bell\x07 del\x7f nel\x85",
    "zero\u200bwidth bom\ufeff isolate\u2066x\u2069 noncharacter\ufffe",
    "line\u2028sep\u2029para",
    "emoji 🦀 名前 اسم Ǆ ﬁ",
    '}{,=le="+Inf" quantile="0.5"',
    "x" * 10_000,
    "\ud800 lone surrogate",
]


def _render(metrics: ReaperMetrics) -> str:
    return generate_latest(metrics.registry).decode("utf-8")


def _parse(text: str) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    """Family name -> [(sample name, labels, value)], via prometheus_client's own parser."""
    return {
        fam.name: [(s.name, s.labels, s.value) for s in fam.samples] for fam in text_string_to_metric_families(text)
    }


def _family(
    key: str,
    name: str | None,
    members: int,
    live: int = 0,
    orphans: int = 0,
    abandoned: int = 0,
    recent: int = 0,
    new: int = 0,
) -> FamilyStats:
    return FamilyStats(
        key,
        name,
        normalize_name(name),
        members=members,
        live=live,
        orphans=orphans,
        abandoned=abandoned,
        recent=recent,
        new=new,
    )


def _snapshot(families: list[FamilyStats], started: float, duration: float, problems: int = 0) -> Snapshot:
    snap = Snapshot(
        profile="authlib",
        database="postgresql+psycopg://reaper@db/auth",
        started_at=started,
        finished_at=started + duration,
        churn_window=86400.0,
        churn_min_registrations=5,
    )
    snap.families = {f.id: f for f in families}
    snap.clients = sum(f.members for f in families)
    snap.problem_count = problems
    return snap


# --- golden ------------------------------------------------------------------------------------------------


def _golden_metrics() -> ReaperMetrics:
    """Two scans, a failure between them, a reap, leader: every metric has a value, none reads the clock."""
    fams = [
        _family("f-claude", "Claude Code (scalarly-memory)", 32, live=1, orphans=31, recent=17),
        _family("f-vscode", "Visual Studio Code", 1, live=1),
        _family("f-evil", INJECTION, 3, orphans=2, abandoned=1, recent=3),
        _family("f-slash", 'Back\\slash "Quoted"\u202eRTL', 2, orphans=1, recent=2),
        _family("f-proxy", "MCP CLI Proxy", 1, abandoned=1),
        _family("f-other", "Other", 4, live=1, orphans=3),
        _family("f-noname", None, 2, abandoned=2),
    ]
    first = _snapshot(fams, T0, 2.5)
    first.by_verdict = Counter({Verdict.LIVE: 3, Verdict.ORPHAN: 37, Verdict.ABANDONED: 4, Verdict.YOUNG: 1})
    again = [
        _family("f-claude", "Claude Code (scalarly-memory)", 34, live=1, orphans=33, recent=19, new=2),
        _family("f-vscode", "Visual Studio Code", 1, live=1),
        _family("f-evil", INJECTION, 4, orphans=3, abandoned=1, recent=4, new=1),
        _family("f-slash", 'Back\\slash "Quoted"\u202eRTL', 3, orphans=2, recent=3, new=1),
        _family("f-proxy", "MCP CLI Proxy", 1, abandoned=1),
        _family("f-other", "Other", 5, live=1, orphans=4, new=1),
        _family("f-noname", None, 2, abandoned=2),
    ]
    second = _snapshot(again, T0 + 300, 3.25, problems=2)
    second.by_verdict = Counter(
        {Verdict.LIVE: 3, Verdict.ORPHAN: 42, Verdict.ABANDONED: 4, Verdict.YOUNG: 1, Verdict.PROTECTED: 0}
    )
    m = ReaperMetrics(top_k=3)
    m.leader = 1
    m.record_scan(first, first=True)
    m.record_failure()  # its clock-time last_scan is overwritten by the next successful scan
    m.record_scan(second, first=False)
    m.record_reaped(Counter({("delete", "superseded"): 29, ("delete", "never_used"): 1, ("merge", "superseded"): 2}))
    return m


def _golden_text() -> str:
    text = _render(_golden_metrics())
    # The version is not part of the contract under test; everything else is, byte for byte.
    return text.replace(f'dcr_build_info{{version="{__version__}"}}', 'dcr_build_info{version="VERSION"}')


def test_exposition_matches_golden_file():
    actual = _golden_text()
    if os.environ.get("REAPER_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(actual, encoding="utf-8", newline="\n")
    expected = GOLDEN.read_text(encoding="utf-8")
    if actual != expected:
        diff = "".join(
            difflib.unified_diff(
                expected.splitlines(True), actual.splitlines(True), "tests/golden/metrics.txt", "rendered now"
            )
        )
        pytest.fail(
            f"/metrics exposition differs from the golden file "
            f"(REAPER_UPDATE_GOLDEN=1 rewrites it after review):\n{diff}"
        )


def test_golden_exposition_is_valid_and_says_what_the_snapshot_says():
    text = _golden_text()
    promtool_check(text)
    fams = _parse(text)
    clients = {s[1]["verdict"]: s[2] for s in fams["dcr_clients"]}
    assert clients == {"live": 3, "young": 1, "orphan": 42, "abandoned": 4, "idle": 0, "protected": 0}
    fc = {(s[1]["family"], s[1]["verdict"]): s[2] for s in fams["dcr_family_clients"]}
    assert {f for f, _ in fc} == {
        "claude code (scalarly-memory)",
        "other",
        label_value(normalize_name(INJECTION)),
        label_value(normalize_name('Back\\slash "Quoted"\u202eRTL')),
    }
    assert fc[("other", "all")] == 1 + 1 + 5 + 2, "vscode, proxy, the family literally named 'other', no-name"
    assert sum(v for (f, verdict), v in fc.items() if verdict == "all") == 50 == sum(clients.values())
    regs = {s[1]["family"]: s[2] for s in fams["dcr_registrations_observed"]}
    assert regs == {
        "claude code (scalarly-memory)": 2,
        label_value(normalize_name(INJECTION)): 1,
        'back\\slash "quoted"?rtl': 1,
        "other": 1,
    }
    assert {s[0]: s[2] for s in fams["dcr_scans"]} == {"dcr_scans_total": 3}
    assert {s[0]: s[2] for s in fams["dcr_scan_failures"]} == {"dcr_scan_failures_total": 1}
    assert fams["dcr_last_scan_timestamp_seconds"][0][2] == T0 + 300 + 3.25
    assert fams["dcr_families"] == [
        ("dcr_families", {"state": "churning"}, 1),
        ("dcr_families", {"state": "stable"}, 4),
        ("dcr_families", {"state": "single"}, 2),
    ]


def test_every_metric_is_documented_and_every_documented_metric_exists():
    exposed = set()
    for fam in text_string_to_metric_families(_render(_golden_metrics())):
        exposed.add(fam.name + ("_total" if fam.type == "counter" else ""))
    documented = set(re.findall(r"^\| `(dcr_[a-z_]+)` \|", DOCS.read_text(encoding="utf-8"), re.M))
    assert exposed == documented


# --- cardinality and injection ------------------------------------------------------------------------------


def series_bound(k: int) -> int:
    """The most samples the exposition can have with top_k = k, whatever the data (no reaps recorded)."""
    fixed = 6  # build_info, leader, scans, failures, last scan, last success
    histogram = 11 + 1 + 2  # buckets, +Inf, _count, _sum
    snapshot_gauges = len(VERDICTS) + 3 + 5  # dcr_clients, dcr_families, churn/problems/last_scan_clients/loops/floods
    return fixed + histogram + snapshot_gauges + 4 * (k + 1) + (2 * k + 1)


def _assert_bounded_and_clean(text: str, metrics: ReaperMetrics, snap: Snapshot) -> None:
    """Bounded series, the documented metric names only, no injected sample, label values as label_value()."""
    k = metrics.top_k
    fams = _parse(text)
    all_samples = [s for samples in fams.values() for s in samples]
    assert len(all_samples) <= series_bound(k), (len(all_samples), series_bound(k))
    assert set(fams) == {
        "dcr_build_info",
        "dcr_leader",
        "dcr_scans",
        "dcr_scan_failures",
        "dcr_last_scan_timestamp_seconds",
        "dcr_last_success_timestamp_seconds",
        "dcr_reaped_clients",
        "dcr_registrations_observed",
        "dcr_scan_duration_seconds",
        "dcr_clients",
        "dcr_families",
        "dcr_family_clients",
        "dcr_churn_window_registrations",
        "dcr_problem_rows",
        "dcr_last_scan_clients",
        "dcr_suspected_reauth_loops",
        "dcr_registration_floods",
    }
    # One line per sample plus HELP and TYPE per family: nothing smuggled a line break into the text.
    lines = text.splitlines()
    assert len(lines) == len(all_samples) + 2 * len(fams)
    assert all(line.startswith(("# HELP dcr_", "# TYPE dcr_", "dcr_")) for line in lines)
    assert not any(v == 1e9 for _, _, v in all_samples), "an injected sample value appeared"
    clients = fams["dcr_clients"]
    expected = [({"verdict": str(v)}, snap.by_verdict.get(v, 0)) for v in VERDICTS]
    assert [(s[1], s[2]) for s in clients] == expected
    top = top_names(snap, k)
    families = {s[1]["family"] for s in fams["dcr_family_clients"]}
    assert families <= set(top) | {OTHER} and len(families) <= k + 1
    assert {s[1]["verdict"] for s in fams["dcr_family_clients"]} <= {"live", "orphan", "abandoned", "all"}
    assert sum(s[2] for s in fams["dcr_family_clients"] if s[1]["verdict"] == "all") == snap.clients
    regs = {s[1]["family"] for s in fams["dcr_registrations_observed"]}
    assert len(regs) <= 2 * k + 1 and regs <= set(top) | {OTHER}
    for name in families | regs:
        assert len(name) <= LABEL_MAX
        assert not any(ch in name for ch in "\n\r\x00\u202e\u2028\x85"), repr(name)
    promtool_check(text)


def _hostile_families(n: int, big: int) -> list[FamilyStats]:
    """n families with distinct hostile names; the first `big` are large so they are the named top-K."""
    fams = []
    for i in range(n):
        name = f"{HOSTILE[i % len(HOSTILE)]} #{i}" if i % len(HOSTILE) != 9 else f"#{i} {HOSTILE[9]}"
        members = 1000 - i if i < big else 1 + i % 3
        fams.append(_family(f"{i:012x}", name, members, orphans=members - 1, live=1, recent=min(members, 9), new=i % 2))
    return fams


@pytest.mark.slow
def test_100k_hostile_names_give_bounded_series_and_no_injection():
    t0 = time.process_time()  # CPU time: immune to other processes sharing the machine
    k = 20
    fams = _hostile_families(100_000, big=30)
    first = _snapshot(fams, T0, 1.0)
    first.by_verdict = Counter({Verdict.LIVE: len(fams), Verdict.ORPHAN: sum(f.orphans for f in fams)})
    second = _snapshot(fams, T0 + 60, 1.0)
    second.by_verdict = first.by_verdict
    metrics = ReaperMetrics(top_k=k)
    metrics.leader = 1
    metrics.record_scan(first, first=True)
    metrics.record_scan(second, first=False)  # 50,000 families with new registrations
    scrape_started = time.process_time()
    text = _render(metrics)
    # A scrape must not cost time per character of every name (10,000-character names took ~25 s here).
    assert time.process_time() - scrape_started < 5
    _assert_bounded_and_clean(text, metrics, second)
    fams_out = _parse(text)
    named = {s[1]["family"] for s in fams_out["dcr_family_clients"]} - {OTHER}
    assert len(named) == k, "the top-K are named, hostile or not"
    assert label_value(normalize_name(f"{INJECTION} #0")) in named
    regs = {s[1]["family"]: s[2] for s in fams_out["dcr_registrations_observed"]}
    assert sum(regs.values()) == 50_000
    assert time.process_time() - t0 < 30


@pytest.mark.slow
def test_real_scan_of_20k_hostile_names_through_the_classifier(tmp_path):
    t0 = time.process_time()
    path = tmp_path / "oauth.db"
    db = sqlite3.connect(path)
    try:
        db.executescript(SCHEMA)
        now = time.time()
        rows = []
        storable = [h for h in HOSTILE if "\ud800" not in h]  # SQLite text is UTF-8: no lone surrogates
        for i in range(20_000):
            if i < 2_000:  # 20 big hostile families of 100 registrations each
                name = f"big{i % 20} {storable[i % 20 % len(storable)]}"
            else:
                name = f"{storable[i % len(storable)]} #{i}"
            uris = f'["http://127.0.0.1:{50000 + i % 10000}/cb"]'
            born = now - 3 * 86400 - i
            rows.append((f"cid-{i:06d}", None, name, uris, "[]", "[]", "read", "none", born, None))
        db.executemany("INSERT INTO oauth_clients VALUES (?,?,?,?,?,?,?,?,?,?)", rows)
        db.commit()
    finally:
        db.close()
    config = load_config(None, {"database_url": f"sqlite:///{path}", "profile": "mcp-memory-service"}, environ={})
    snap = report(config)
    assert snap.clients == 20_000 and snap.problem_count == 0
    # Names are read up to 1024 characters: names that differ only beyond that are one family.
    assert len(snap.families) == len({r[2][:1024] for r in rows})
    assert len(snap.families) > 16_000
    metrics = ReaperMetrics(top_k=20)
    metrics.record_scan(snap, first=True)
    text = _render(metrics)
    _assert_bounded_and_clean(text, metrics, snap)
    # The named families are the 20 largest label values (long names cut to 64 characters count together).
    sizes = Counter(label_value(normalize_name(r[2])) for r in rows)
    expected = sorted(sizes, key=lambda n: (-sizes[n], n))[:20]
    named = {s[1]["family"] for s in _parse(text)["dcr_family_clients"]} - {OTHER}
    assert named == set(expected)
    assert sum(n.startswith("big") for n in named) >= 18
    assert time.process_time() - t0 < 20


def test_registration_labels_stay_capped_while_the_top_k_churns():
    """docs/metrics.md: dcr_registrations_observed has at most 2K+1 label values, 'other' included."""
    k = 2
    metrics = ReaperMetrics(top_k=k)
    metrics.record_scan(_snapshot([_family("seed", "seed", 1)], T0, 0.1), first=True)
    for round_ in range(10):
        # Each scan a new pair of names leads; registrations also arrive in families outside the top-K,
        # listed last so 'other' is first needed after the named slots have filled up.
        fams = [
            _family(f"a{round_}", f"lead-a-{round_}", 100, new=1),
            _family(f"b{round_}", f"lead-b-{round_}", 90, new=1),
            _family(f"tail{round_}", f"tail-{round_}", 1, new=1 if round_ >= 3 else 0),
        ]
        metrics.record_scan(_snapshot(fams, T0 + 60 * (round_ + 1), 0.1), first=False)
        text = _render(metrics)
        labels = {s[1]["family"] for s in _parse(text)["dcr_registrations_observed"]}
        assert len(labels) <= 2 * k + 1, (round_, sorted(labels))
    regs = {s[1]["family"]: s[2] for s in _parse(text)["dcr_registrations_observed"]}
    assert sum(regs.values()) == 10 * 2 + 7, "no registration is lost by capping labels"
    assert regs[OTHER] >= 7


def test_label_value_is_bounded_and_printable():
    assert label_value("") == "(no name)"
    assert label_value("a\nb\u202ec\x00d e") == "a?b?c?d e"
    assert len(label_value(normalize_name("x" * 10_000))) == LABEL_MAX
    for h in HOSTILE:
        v = label_value(normalize_name(h))
        assert len(v) <= LABEL_MAX and v.isprintable(), repr(v)
