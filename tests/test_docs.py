"""The configuration reference is a working file: every key it shows exists and validates."""

import re
from pathlib import Path

from reaper.config import load_config

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def test_configuration_example_loads(tmp_path):
    block = re.search(r"```toml\n(.*?)```", DOC.read_text(), re.S)
    assert block, "docs/configuration.md has no TOML example"
    path = tmp_path / "dcr-reaper.toml"
    path.write_text(block.group(1))
    config = load_config(str(path), environ={})
    assert config.profile == "authlib" and config.tables["oauth2_client"] == "client"
    assert config.scan.work_mem_mb == 64 and config.ip.registration_path == "/register"
