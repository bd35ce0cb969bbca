"""Strict by default: ruff and mypy stay clean on the package."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_ruff_is_clean():
    res = run("ruff", "check", "reaper", "bench")
    assert res.returncode == 0, res.stdout + res.stderr


def test_mypy_is_clean():
    res = run("mypy", "reaper")
    assert res.returncode == 0, res.stdout + res.stderr
