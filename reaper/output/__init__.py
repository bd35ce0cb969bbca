"""Output: the report in every format, the HTML evidence report, and plans and runs, for people and machines."""

from __future__ import annotations

from collections.abc import Iterator
from typing import IO

from reaper.analysis.model import Classified, Snapshot
from reaper.output.html import render_html
from reaper.output.records import CLIENT_FIELDS, Filters
from reaper.output.report import render_report

FORMATS = ("table", "json", "csv", "markdown", "html")


def render(
    fmt: str,
    stream: Iterator[Classified],
    snap: Snapshot,
    out: IO[str],
    filters: Filters,
    top_k: int = 10,
    max_rows: int = 50,
    show_ips: bool = False,
    wide: bool = False,
) -> None:
    """Write the report in one format; client rows stream for json and csv (`wide`: full IDs on a terminal)."""
    if fmt == "html":
        render_html(stream, snap, out, filters, top_k, max_rows)
    else:
        render_report(fmt, stream, snap, out, filters, top_k, max_rows, show_ips, wide)


__all__ = ["CLIENT_FIELDS", "FORMATS", "Filters", "render"]
