"""This process's resident memory, and the memory limit its control group sets (a container's or a systemd
unit's): what bounds the state `serve` keeps for incremental ticks."""

from __future__ import annotations

import os
from pathlib import Path

NO_LIMIT = 1 << 62  # cgroup v1 reports "no limit" as a page-rounded 2^63 - 1


def rss_bytes() -> int | None:
    """Resident memory now (None where /proc is not there to tell)."""
    try:
        resident = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return resident * os.sysconf("SC_PAGE_SIZE")


def cgroup_limit_bytes(root: Path = Path("/sys/fs/cgroup"), membership: Path = Path("/proc/self/cgroup")) -> int | None:
    """The tightest memory limit on this process's control group and its parents (cgroup v2 `memory.max`, or v1
    `memory.limit_in_bytes`); None when none is set or none can be read."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if hierarchy == "0" and controllers == "":
            limits += _limits(root, path, "memory.max")
        elif "memory" in controllers.split(","):
            limits += _limits(root / "memory", path, "memory.limit_in_bytes")
    found = [n for n in limits if n < NO_LIMIT]
    return min(found) if found else None


def _limits(base: Path, path: str, name: str) -> list[int]:
    """The limit file's value in the group and each parent up to `base` (a container sees its own group as the
    root: `base` itself is read too)."""
    out = []
    group = Path(path.strip() or "/")
    for part in (group, *group.parents):
        try:
            text = (base / str(part).lstrip("/") / name).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            out.append(int(text))
    return out
