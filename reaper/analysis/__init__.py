"""Analysis: fingerprint, classify and look for loops over scanned clients; plain data in, plain data out."""

from reaper.analysis.model import (
    VERDICTS,
    Classified,
    ClientRow,
    FamilyStats,
    FloodEvidence,
    FloodMember,
    LoopEvidence,
    LoopStep,
    Snapshot,
    Verdict,
)
from reaper.analysis.pipeline import Progress, ScanSource, classified

__all__ = [
    "VERDICTS",
    "Classified",
    "ClientRow",
    "FamilyStats",
    "FloodEvidence",
    "FloodMember",
    "LoopEvidence",
    "LoopStep",
    "Progress",
    "ScanSource",
    "Snapshot",
    "Verdict",
    "classified",
]
