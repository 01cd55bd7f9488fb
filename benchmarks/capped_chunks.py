"""What a chunk of capped records costs the writer: the R10 caps path of ingest.

``python -m benchmarks.capped_chunks [PEOPLE]`` (default 2,000) ingests, into a fresh SQLite
store (removed afterwards), three chunks of 2,000 sole-authored papers (R3: 10 h each, capped
at 20 h a person-year) spread over ``PEOPLE`` people, then one chunk correcting the first
2,000 to co-authored (5 h), which re-issues the records whose share moved.  It prints each
chunk's wall seconds.  With 2,000 people every paper locks and allocates its own cap group;
with few, each group holds many papers.
"""

from __future__ import annotations

import random
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.procs import sqlite_file
from gateway.pipeline.ingest import ingest
from gateway.pipeline.items import PartnerRef
from gateway.store.db import make_engine, upgrade
from mock_partners.generators import GenPerson, make_person

NOW = datetime(2026, 6, 1, 8, 0, tzinfo=UTC)
CHUNK = 2000


def paper(sid: str, person: GenPerson, n: int, authorship: str = "sole",
          title: str | None = None) -> dict[str, Any]:
    """A paper (R3: 10 h sole, 5 h co-authored), one activity per ``title`` and ``n``."""
    return {"source_record_id": sid,
            "person": {"id_type": "resident_id", "id_number": person.id_number,
                       "name": person.name, "region_code": person.region},
            "year": 2026, "category": "professional", "activity_type": "paper",
            "activity": {"title": title or f"高寒草甸退化机理研究（第{n}篇）",
                         "completed_on": f"2026-{1 + n % 11:02d}-{1 + n % 27:02d}"},
            "claimed": {"quantity": "1", "unit": "papers", "details": {"authorship": authorship}}}


def main(people: int) -> None:
    persons = [make_person(random.Random(i)) for i in range(people)]

    def chunk(tag: str, first: int, authorship: str = "sole") -> list[dict[str, Any]]:
        return [paper(f"{tag}{i}", persons[i % people], first + i // people, authorship)
                for i in range(CHUNK)]

    work = Path("var/bench/capped_chunks")
    work.mkdir(parents=True, exist_ok=True)
    with sqlite_file(work / "store.sqlite3") as url:
        upgrade(url)
        engine = make_engine(url)
        partner = PartnerRef("bench-caps", "canonical")
        runs = [(f"new papers {k + 1}", chunk(f"r{k}-", k * 50)) for k in range(3)]
        runs.append(("corrections of 1", chunk("r0-", 0, "co")))
        print(f"{'chunk':>18} {'rows':>6} {'wall s':>7}")
        for name, subs in runs:
            started = time.perf_counter()
            ingest(engine, partner, subs, now=NOW)
            print(f"{name:>18} {len(subs):>6} {time.perf_counter() - started:>7.2f}")
        engine.dispose()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
