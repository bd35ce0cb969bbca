"""The newcomer's scenario, under the default policy: an Authlib application with its own table names, 15 clients,
a 7-step re-auth loop that started this morning and two older loops.

`report` and `reap`'s plan agree on what is reapable; the plan lists the young loop's orphans as skipped, with
`min_age` as the reason; `reap --family ID --apply` acts on that family and no other.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from kit.cli import run_cli
from kit.schemas.authlib import HOUR, make_models

DAY = 86400
TABLES = {"oauth2_client": "client", "oauth2_token": "token", "oauth2_code": "code"}


class App:
    """Rows as an Authlib server writes them, through its models (the mixins), under its own table names."""

    def __init__(self, engine: sa.Engine):
        self.models = make_models(*TABLES.values())
        self.models.create_all(engine)
        self.session = Session(engine, expire_on_commit=False)
        self.n = 0

    def login(self, name: str, at: float, revoked_at: float | None) -> str:
        """A fresh registration and its token pair; `revoked_at`: when the next login rotated it away."""
        self.n += 1
        client = self.models.Client(client_id=f"{name[:3].lower()}-{self.n:02d}-{int(at)}", client_id_issued_at=int(at))
        client.set_client_metadata(
            {
                "client_name": name,
                "redirect_uris": [f"http://127.0.0.1:{50000 + self.n}/callback"],
                "grant_types": ["authorization_code", "refresh_token"],
                "response_types": ["code"],
                "token_endpoint_auth_method": "none",
            }
        )
        revoked = int(revoked_at) if revoked_at else 0
        token = self.models.Token(
            client_id=client.client_id,
            token_type="Bearer",
            access_token=f"at-{self.n}",
            refresh_token=f"rt-{self.n}",
            scope="openid",
            issued_at=int(at + 30),
            expires_in=HOUR,
            access_token_revoked_at=revoked,
            refresh_token_revoked_at=revoked,
            user_id=7,
        )
        self.session.add_all([client, token])
        self.session.commit()
        return str(client.client_id)

    def loop(self, name: str, first: float, steps: int, gap: float, now: float) -> list[str]:
        """`steps` logins `gap` apart, each rotating the previous one's tokens away; the last one is in use."""
        ids = [
            self.login(name, first + i * gap, first + (i + 1) * gap if i < steps - 1 else None) for i in range(steps)
        ]
        last = ids[-1]
        fresh = self.models.Token(
            client_id=last, token_type="Bearer", access_token=f"at-live-{last}", refresh_token=f"rt-live-{last}",
            scope="openid", issued_at=int(now - 60), expires_in=HOUR, user_id=7,
        )  # fmt: skip
        self.session.add(fresh)
        self.session.commit()
        return ids


def _config(tmp_path: Path, url: str) -> Path:
    path = tmp_path / "dcr-reaper.toml"
    lines = ['profile = "authlib"', f"database_url = {json.dumps(url)}", "[tables]"]
    path.write_text("\n".join(lines + [f"{k} = {json.dumps(v)}" for k, v in TABLES.items()]) + "\n")
    return path


def _json(tmp_path: Path, *args: str) -> tuple[int, Any]:
    res = run_cli([*args, "--config", "dcr-reaper.toml", "--format", "json", "--no-progress"], tmp_path)
    assert res.stdout, res.stderr
    return res.returncode, json.loads(res.stdout)


@pytest.mark.slow
def test_report_and_plan_agree_and_a_family_is_reaped_alone(db, tmp_path):
    now = time.time()
    app = App(db.engine)
    claude = app.loop("Claude Code", now - 4 * HOUR, steps=7, gap=30 * 60, now=now)  # this morning
    cursor = app.loop("Cursor", now - 5 * DAY, steps=4, gap=2 * HOUR, now=now)
    windsurf = app.loop("Windsurf", now - 9 * DAY, steps=3, gap=HOUR, now=now)
    healthy = app.loop("Zed", now - 20 * DAY, steps=1, gap=0, now=now)
    app.session.close()
    assert len(claude + cursor + windsurf + healthy) == 15
    _config(tmp_path, db.url)

    code, report = _json(tmp_path, "report")
    assert code == 0
    reapable = {c["client_id"] for c in report["clients"] if c["verdict"] in ("orphan", "abandoned")}
    assert reapable == set(claude[:-1] + cursor[:-1] + windsurf[:-1])

    code, plan = _json(tmp_path, "reap")
    assert code == 0 and plan["applied"] is False
    planned = {c["client_id"] for c in plan["candidates"]}
    skipped = {c["client_id"]: c["skipped"] for c in plan["skipped_clients"]}
    assert plan["reapable"] == len(reapable) == len(planned) + len(skipped)  # every reapable client accounted for
    assert planned | set(skipped) == reapable
    assert skipped == dict.fromkeys(claude[:-1], "min_age")  # the young loop: skipped, and why
    assert plan["skipped_by_reason"] == {"min_age": 6} and plan["cap_problem"] in ("", None)

    table = run_cli(["reap", "--config", "dcr-reaper.toml", "--no-progress"], tmp_path)
    assert table.returncode == 0 and "min_age" in table.stdout, table.stdout

    family = next(f["family"] for f in report["families"] if f["name"] == "Cursor")
    code, run = _json(tmp_path, "reap", "--family", family, "--apply")
    assert code == 0, run
    assert {c["client_id"] for c in run["candidates"]} == set(cursor[:-1])
    assert sum(a["clients"] for a in run["acted"]) == 3
    with db.engine.connect() as conn:
        left = set(conn.execute(sa.text("SELECT client_id FROM client")).scalars())
    assert left == set(claude + windsurf + healthy + cursor[-1:])  # that family's orphans, and nothing else
