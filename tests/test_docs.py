"""The configuration reference is a working file: every key it shows exists and validates."""

import re
import shlex
from pathlib import Path

import click

from reaper.cli import cli
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


ROOT = DOC.parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_every_relative_link_in_the_docs_resolves():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if not target.startswith(("http://", "https://", "mailto:")) and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def _readme_commands() -> list[list[str]]:
    """Every `dcr-reaper ...` line of README's code blocks, as arguments (comments and `...` placeholders cut)."""
    out = []
    for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines():
        text = line.strip().removeprefix("$ ")
        if line.startswith("    ") and "dcr-reaper " in text:
            text = text[text.index("dcr-reaper ") :].split("  #")[0].split(" #")[0]
            out.append([a for a in shlex.split(text)[1:] if a != "..."])
    return out


def test_every_readme_command_parses_with_the_cli():
    """No command in the README that cannot work: each names a real subcommand and only its real options."""
    commands = _readme_commands()
    assert len(commands) >= 10
    for args in commands:
        sub: click.Command = cli
        rest = list(args)
        while isinstance(sub, click.Group) and rest:
            if rest[0] == "--config":
                rest = rest[2:]
            elif rest[0] == "--debug":
                rest = rest[1:]
            elif rest[0].startswith("-"):
                break  # the group's own options (`runs --profile ...`)
            else:
                found = sub.get_command(click.Context(sub), rest[0])
                assert found is not None, f"README: unknown command in {args}"
                sub, rest = found, rest[1:]
        known = {opt for p in sub.params for opt in (*p.opts, *p.secondary_opts)} | {"--debug", "--config"}
        unknown = [a.split("=")[0] for a in rest if a.startswith("-") and a.split("=")[0] not in known]
        assert not unknown, f"README: {args} uses options {sub.name} does not have: {unknown}"


def test_nothing_tells_people_to_install_an_unpublished_package():
    offenders = [
        str(p.relative_to(ROOT))
        for p in [*PAGES, *(ROOT / "deploy").rglob("*")]
        if p.is_file() and re.search(r"pip(x)? install dcr-reaper", p.read_text(encoding="utf-8", errors="replace"))
    ]
    assert not offenders, offenders
