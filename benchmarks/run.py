"""``make bench``: figures beside a baseline measured in the same run; RESULTS.md updated.

Issue 3 — ingest of a 1,000,000-row health annual CSV on SQLite: rows/s, wall time and peak RSS
of the gateway's batch path against the same file parsed and bulk-inserted with nothing else.
Targets (2-core machine): at most 3× the baseline's time, ≥ 20,000 rows/s, peak RSS < 300 MB.

``BENCH_ROWS`` (default 1,000,000) sizes the file; the file is generated once (seeded) and
kept under ``var/bench/``.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

from mock_partners import files

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "var" / "bench"
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
TARGET_RATIO, TARGET_RATE, TARGET_RSS = 3.0, 20_000, 300


def _machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}"


def _measure(mode: str, path: Path) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-m", "benchmarks.batch_ingest", mode, str(path), str(WORK)],
                         check=True, capture_output=True, text=True, cwd=ROOT)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> int:
    console = Console()
    rows = int(os.environ.get("BENCH_ROWS", "1000000"))
    WORK.mkdir(parents=True, exist_ok=True)
    path = WORK / f"health_annual_{rows}.csv"
    if not path.exists():
        with console.status(f"generating {rows:,} health rows (seeded) → {path}"):
            files.write_csv(path.with_suffix(".part"), files.health_rows(2026, rows, 2026),
                            files.HEALTH_HEADERS, encoding="utf-8")
            path.with_suffix(".part").rename(path)
    with console.status("baseline: csv parse + SQLite bulk insert"):
        base = _measure("baseline", path)
    with console.status("gateway: batch ingest end to end"):
        gw = _measure("gateway", path)
    ratio = gw["seconds"] / base["seconds"]
    checks = {
        f"time ≤ {TARGET_RATIO:g}× baseline": ratio <= TARGET_RATIO,
        f"≥ {TARGET_RATE:,} rows/s": gw["rows_per_s"] >= TARGET_RATE,
        f"peak RSS < {TARGET_RSS} MB": gw["peak_rss_mb"] < TARGET_RSS,
    }
    table = Table(title=f"Batch ingest, {rows:,}-row health annual CSV, SQLite")
    for column in ("run", "rows", "wall s", "rows/s", "peak RSS MB"):
        table.add_column(column, justify="right")
    for name, r in (("baseline (parse + insert)", base), ("gateway (end to end)", gw)):
        table.add_row(name, f"{int(r['rows']):,}", f"{r['seconds']:.1f}", f"{r['rows_per_s']:,.0f}",
                      f"{r['peak_rss_mb']:.0f}")
    console.print(table)
    console.print(f"ratio gateway/baseline time: {ratio:.2f}×")
    for label, ok in checks.items():
        console.print(f"  {'[green]met' if ok else '[red]MISSED'}[/] {label}")
    _record(rows, base, gw, ratio, checks)
    return 0


def _record(rows: int, base: dict[str, float], gw: dict[str, float], ratio: float,
            checks: dict[str, bool]) -> None:
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"### Batch ingest — {stamp}",
        "",
        f"Command: `make bench` (BENCH_ROWS={rows}); machine: {_machine()}.",
        "",
        "| run | rows | wall s | rows/s | peak RSS MB |",
        "|---|---:|---:|---:|---:|",
        f"| baseline: csv parse + SQLite bulk insert | {int(base['rows']):,} | {base['seconds']:.1f} | "
        f"{base['rows_per_s']:,.0f} | {base['peak_rss_mb']:.0f} |",
        f"| gateway: batch ingest end to end | {int(gw['rows']):,} | {gw['seconds']:.1f} | "
        f"{gw['rows_per_s']:,.0f} | {gw['peak_rss_mb']:.0f} |",
        "",
        f"Ratio (gateway / baseline time): **{ratio:.2f}×**. "
        + "; ".join(f"{label}: {'met' if ok else 'MISSED'}" for label, ok in checks.items()) + ".",
        "",
    ]
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\nNewest first.\n\n"
    head, _, rest = text.partition("\n\n### ")
    body = "\n".join(lines) + "\n"
    RESULTS.write_text(head + "\n\n" + body + ("\n### " + rest if rest else ""))


if __name__ == "__main__":
    started = time.perf_counter()
    code = main()
    print(f"bench finished in {time.perf_counter() - started:.0f} s")
    raise SystemExit(code)
