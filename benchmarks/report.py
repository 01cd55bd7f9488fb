"""Where the figures go: the machine, its load, and dated sections at the top of RESULTS.md."""

from __future__ import annotations

import os
import platform
from datetime import UTC, datetime
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}"


def load() -> str:
    """The 1/5/15-minute load averages (``uptime``): how quiet the machine was."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "load average unknown"
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f}"


def stamp() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def record(sections: list[list[str]]) -> None:
    """Insert ``sections`` (lists of lines) after RESULTS.md's hand-kept head, newest first."""
    if not sections:
        return
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\nNewest first.\n\n"
    head, _, rest = text.partition("\n\n### ")
    body = "\n".join("\n".join(lines) + "\n" for lines in sections)
    RESULTS.write_text(head + "\n\n" + body + ("\n### " + rest if rest else ""))
