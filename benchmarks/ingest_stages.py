"""What a canonical record costs, stage by stage: thread CPU µs per record, low overhead.

``python -m benchmarks.ingest_stages [sqlite|postgres] [RECORDS] [--gc-on]`` runs the
request path of ``POST /v1/records`` in this process, one 1,000-record body at a time: the
JSON parse, the real :func:`gateway.pipeline.ingest.ingest` and the answers' JSON.  Timers
wrap the pipeline's own functions (exclusive time: a stage's inner stages are not counted in
it), so the code measured is the code that runs.  ``--gc-on`` keeps the cyclic GC running
through ingest, to show what pausing it saves.  Signature check, HTTP parsing and the thread
pool are not here: ``benchmarks.profile_gateway`` profiles a whole gateway process.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import orjson

from benchmarks import api_ingest, procs

WORK = procs.ROOT / "var" / "bench" / "stages"


class Clock:
    """Exclusive thread-CPU time per stage: entering a stage pauses the enclosing one."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = {}
        self._stack: list[list[Any]] = []  # [stage, started]

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        now = time.thread_time()
        if self._stack:
            outer = self._stack[-1]
            self.spent[outer[0]] = self.spent.get(outer[0], 0.0) + now - outer[1]
        self._stack.append([name, now])
        try:
            yield
        finally:
            now = time.thread_time()
            _, started = self._stack.pop()
            self.spent[name] = self.spent.get(name, 0.0) + now - started
            if self._stack:
                self._stack[-1][1] = now

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.stage(name):
                return fn(*args, **kwargs)

        return timed


def _instrument(clock: Clock, gc_on: bool) -> None:
    """Wrap the pipeline's stages where the pipeline looks them up (module globals)."""
    from sqlalchemy.engine.base import Connection

    from gateway import audit
    from gateway.pipeline import chunk_writes, ingest, items

    chunk = ingest.Chunk
    targets: list[tuple[Any, str, str]] = [
        (items, "validate_submission", "validate: pydantic + identity"),
        (ingest, "prepare", "judge: rules, serialise, hash"),
        (chunk, "_load", "chunk: read what the chunk needs"),
        (chunk, "_decide", "chunk: decide (dedup, ids, rows, events)"),
        (chunk, "_apply_caps", "chunk: caps (R10)"),
        (chunk, "_flag_integrity", "chunk: integrity (R14)"),
        (chunk, "_build", "chunk: build each record's JSON"),
        (chunk, "_store_version", "chunk: version + outbox rows, events"),
        (chunk, "_write", "chunk: write (updates, keys check)"),
        (chunk_writes, "bulk_insert", "store: bulk inserts"),
        (audit, "bulk_insert", "audit: insert events"),
        (audit, "append", "audit: mask, serialise, hash chain"),
        (Connection, "_commit_impl", "commit"),
    ]
    for owner, name, label in targets:
        setattr(owner, name, clock.wrap(label, getattr(owner, name)))
    if gc_on:
        ingest.paused_gc = contextlib.nullcontext  # type: ignore[assignment]


def main() -> int:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    gc_on = "--gc-on" in sys.argv
    backend = args[0] if args else "sqlite"
    count = int(args[1]) if len(args) > 1 else 10_000
    from contracts import SubmissionResult  # noqa: F401 - imported before timing starts
    from gateway.api.routes.partner import records_result
    from gateway.config import Settings
    from gateway.pipeline.ingest import ingest
    from gateway.pipeline.items import PartnerRef
    from gateway.state import AppState
    from gateway.store.db import upgrade

    WORK.mkdir(parents=True, exist_ok=True)
    bodies = api_ingest.make_bodies(api_ingest.make_records(count + 1000, "STG", seed=5), 1000)
    clock = Clock()
    with procs.store(backend, WORK, "stages") as url:
        upgrade(url)
        state = AppState.build(Settings(database_url=url, secret_key=procs.SECRET_KEY,
                                        year_close_extensions=api_ingest.year_extension()))
        partner = PartnerRef("bench-stages", "canonical")
        _instrument(clock, gc_on)
        started = 0.0
        for i, body in enumerate(bodies):
            if i == 1:  # the first body warms caches up; it is not counted
                clock.spent.clear()
                started = time.thread_time()
            with clock.stage("request: parse JSON, rules context"):
                records = orjson.loads(body)["records"]
                rules = state.rules()
            with clock.stage("ingest: the rest (items, transaction, metrics)"):
                answers = ingest(state.engine, partner, records, rules=rules)
            with clock.stage("response: answers → JSON"):
                records_result(answers).model_dump_json()
        total = time.thread_time() - started
        state.engine.dispose()
    print(f"{backend}, {count:,} records, GC {'on' if gc_on else 'paused in ingest()'}: "
          f"{total / count * 1e6:.0f} µs of thread CPU a record")
    for name, spent in sorted(clock.spent.items(), key=lambda kv: -kv[1]):
        print(f"  {name:44s} {spent / count * 1e6:6.1f} µs  {spent / total:5.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
