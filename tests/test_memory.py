"""Reading this process's memory and its control group's limit (what bounds `serve`'s incremental state)."""

from __future__ import annotations

from pathlib import Path

from reaper.memory import cgroup_limit_bytes, rss_bytes


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_resident_memory_follows_what_the_process_holds() -> None:
    before = rss_bytes()
    held = bytearray(64 * 2**20)
    for i in range(0, len(held), 4096):  # touch every page: reserved is not resident
        held[i] = 1
    after = rss_bytes()
    assert before is not None and after is not None
    assert after - before > 60 * 2**20


def test_cgroup_v2_the_tightest_limit_up_the_tree(tmp_path: Path) -> None:
    """A systemd unit's MemoryMax sits on its own group; a slice above it may set a tighter one."""
    membership = tmp_path / "cgroup"
    _write(membership, "0::/system.slice/dcr-reaper.service\n")
    _write(tmp_path / "fs/system.slice/dcr-reaper.service/memory.max", "536870912\n")
    _write(tmp_path / "fs/system.slice/memory.max", "max\n")
    assert cgroup_limit_bytes(tmp_path / "fs", membership) == 512 * 2**20
    _write(tmp_path / "fs/system.slice/memory.max", "268435456\n")
    assert cgroup_limit_bytes(tmp_path / "fs", membership) == 256 * 2**20


def test_cgroup_v2_in_a_container_sees_its_own_group_as_the_root(tmp_path: Path) -> None:
    membership = tmp_path / "cgroup"
    _write(membership, "0::/\n")
    _write(tmp_path / "fs/memory.max", "268435456\n")
    assert cgroup_limit_bytes(tmp_path / "fs", membership) == 256 * 2**20
    _write(tmp_path / "fs/memory.max", "max\n")
    assert cgroup_limit_bytes(tmp_path / "fs", membership) is None


def test_cgroup_v1_memory_controller_and_its_no_limit_value(tmp_path: Path) -> None:
    membership = tmp_path / "cgroup"
    _write(membership, "5:cpu,cpuacct:/\n4:memory:/docker/abc\n0::/\n")
    _write(tmp_path / "fs/memory/docker/abc/memory.limit_in_bytes", "9223372036854771712\n")
    assert cgroup_limit_bytes(tmp_path / "fs", membership) is None
    _write(tmp_path / "fs/memory/docker/abc/memory.limit_in_bytes", "402653184\n")
    assert cgroup_limit_bytes(tmp_path / "fs", membership) == 384 * 2**20


def test_no_cgroup_file_no_limit(tmp_path: Path) -> None:
    assert cgroup_limit_bytes(tmp_path / "fs", tmp_path / "missing") is None
