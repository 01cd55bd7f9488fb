"""Where a gateway process spends its CPU on canonical ingest: cProfile on every thread.

``python -m benchmarks.profile_gateway [sqlite|postgres] [RECORDS]`` starts a gateway (the
same app as ``serve --no-worker``) in a child process whose every thread — the event loop and
the thread pool that runs ingest — is profiled with ``cProfile`` on *thread CPU time*, sends it
the bench's signed 1,000-record batches at concurrency 8, then prints CPU µs per record: by
stage, and the top functions by own time.  Profiling slows the server down (≈ 2×); the split,
not the total, is what to read.
"""

from __future__ import annotations

import asyncio
import cProfile
import json
import marshal
import pstats
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks import api_ingest, procs
from gateway.demo import free_port

WORK = procs.ROOT / "var" / "bench" / "profile"
# Stages by a marker function (file fragment, function name); its cumulative CPU is shown.
# They nest: "ingest()" holds validate … commit; audit holds some of the bulk inserts.
STAGES: list[tuple[str, str, str]] = [
    ("signature + nonce (event loop)", "gateway/api/deps.py", "signed_partner"),
    ("ingest() in the thread pool", "gateway/pipeline/ingest.py", "ingest"),
    ("  validate: pydantic + identity", "gateway/pipeline/validate.py", "validate_submission"),
    ("  judge: rules, serialise, hash", "gateway/pipeline/items.py", "prepare"),
    ("  chunk: load, decide, build, write", "gateway/pipeline/ingest.py", "run"),
    ("    audit: events, hash chain, insert", "gateway/audit.py", "append"),
    ("    store: bulk inserts (audit's too)", "gateway/store/bulk.py", "bulk_insert"),
    ("  commit (fsync)", "sqlalchemy/engine/base.py", "_commit_impl"),
    ("response: answers → JSON", "fastapi/routing.py", "serialize_response"),
]


def _server_class() -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn re-raises SIGTERM after shutdown (the process dies); here it only stops."""

        @contextmanager
        def capture_signals(self) -> Iterator[None]:
            previous = signal.signal(signal.SIGTERM, self.handle_exit)
            try:
                yield
            finally:
                signal.signal(signal.SIGTERM, previous)

    return Server


def serve(port: int, db_url: str, out: Path) -> None:
    """Child: the gateway app under uvicorn, every thread profiled; stats dumped on exit."""
    from gateway.api.app import create_app
    from gateway.config import Settings

    profiles: list[cProfile.Profile] = []
    lock = threading.Lock()

    def start_thread(*_: Any) -> None:
        profile = cProfile.Profile(time.thread_time)
        with lock:
            profiles.append(profile)
        profile.enable()

    settings = Settings(database_url=db_url, secret_key=procs.SECRET_KEY,
                        pull_interval_seconds=0, reference_sync_interval_seconds=0,
                        year_close_extensions=api_ingest.year_extension())
    app = create_app(settings, run_worker=False)
    threading.setprofile(start_thread)  # threads started from now on profile themselves
    main = cProfile.Profile(time.thread_time)
    profiles.append(main)
    main.enable()
    import uvicorn

    _server_class()(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")).run()
    main.disable()
    merged: dict[Any, Any] = {}
    split = {"event loop": 0.0, "thread pool": 0.0}
    for profile in profiles:
        profile.create_stats()
        own = sum(v[2] for v in profile.stats.values())
        split["event loop" if profile is main else "thread pool"] += own
        for key, (cc, nc, tt, ct, callers) in profile.stats.items():
            if key in merged:
                pcc, pnc, ptt, pct, pcallers = merged[key]
                for caller, value in callers.items():
                    if caller in pcallers:
                        pcallers[caller] = tuple(a + b for a, b in zip(pcallers[caller], value,
                                                                        strict=True))
                    else:
                        pcallers[caller] = value
                merged[key] = (pcc + cc, pnc + nc, ptt + tt, pct + ct, pcallers)
            else:
                merged[key] = (cc, nc, tt, ct, dict(callers))
    out.write_bytes(marshal.dumps(merged))
    out.with_suffix(".split").write_text(json.dumps(split))


def _stage_times(stats: pstats.Stats) -> dict[str, float]:
    """Cumulative CPU of each stage's marker function (inner stages are not subtracted)."""
    found: dict[str, float] = {}
    for (filename, _, name), (_, _, _, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
        for label, fragment, function in STAGES:
            if fragment in filename and name == function:
                found[label] = found.get(label, 0.0) + cumulative
    return found


def main() -> int:
    backend = sys.argv[1] if len(sys.argv) > 1 else "sqlite"
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 10_000
    WORK.mkdir(parents=True, exist_ok=True)
    out = WORK / f"gateway-{backend}.prof"
    out.unlink(missing_ok=True)
    records = api_ingest.make_records(count, "PROF", seed=11)
    bodies = api_ingest.make_bodies(records, 1000)
    warmup = api_ingest.make_bodies(api_ingest.make_records(1000, "WARM", seed=7), 1000)
    with procs.store(backend, WORK, "profile") as url:
        from gateway.accounts import add_partner
        from gateway.secrets_box import SecretBox
        from gateway.store.db import make_engine, upgrade

        upgrade(url)
        engine = make_engine(url)
        partner = add_partner(engine, SecretBox(procs.SECRET_KEY), "bench-profile", "canonical")
        engine.dispose()
        port = free_port()
        server = procs.Server("gateway-profiled", [sys.executable, "-m", "benchmarks.profile_gateway",
                                                   "serve", str(port), url, str(out)],
                              {}, WORK, port, "/readyz")
        with procs.running(server):
            asyncio.run(api_ingest._drive(server.url, partner.app_key, partner.secret, warmup, 8))
            cpu = server.cpu_seconds()
            seconds, _, responses = asyncio.run(api_ingest._drive(
                server.url, partner.app_key, partner.secret, bodies, 8))
            cpu = server.cpu_seconds() - cpu
            assert all(r.status_code == 200 for r in responses), responses[0].text[:300]
        procs.poll(out.exists, 30, "the profile to be written")
    stats = pstats.Stats(str(out))
    total = stats.total_tt  # type: ignore[attr-defined]
    per = count + 1000
    print(f"{backend}: {count:,} records in {seconds:.1f} s under the profiler; process CPU "
          f"{cpu / count * 1e6:.0f} µs/record; profiled CPU {total / (count + 1000) * 1e6:.0f} "
          "µs/record (warm-up included)")
    split = json.loads(out.with_suffix(".split").read_text())
    for label, value in split.items():
        print(f"  {label + ' thread(s)':38s} {value / per * 1e6:7.1f} µs/record  {value / total:5.1%}")
    found = _stage_times(stats)
    for label, _, _ in STAGES:
        value = found.get(label, 0.0)
        print(f"  {label:38s} {value / per * 1e6:7.1f} µs/record  {value / total:5.1%}")
    stats.sort_stats("tottime").print_stats(25)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve(int(sys.argv[2]), sys.argv[3], Path(sys.argv[4]))
    else:
        raise SystemExit(main())
