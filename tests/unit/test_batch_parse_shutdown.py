"""A parse worker killed while writing its answer must not hang the batch processor.

The executor's manager thread reads answers from one pipe.  A worker SIGKILLed mid-write leaves
half a message there, and the thread then waits for the rest forever; ``RowParser.__exit__``
joined it (``shutdown(wait=True)``) and the batch processor hung with it (seen in ``make test``
after ``test_a_killed_parse_worker_does_not_fail_the_batch_for_good`` killed a worker).

The half message is written by hand here (the kill's timing cannot be), in a child process:
the tests assert it ends, within a deadline, rather than hanging the suite.  The same half
message also stalled the wait for the dead worker's chunk (RowParser._answer).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHILD = """
import os, struct
from gateway.batch_parse import RowParser

parser = RowParser(None, 1, None)
try:
    with parser:
        pool = parser._pool
        assert pool.submit(int, 1).result(timeout=60) == 1  # the worker and manager run
        # Half an answer: a 1,000-byte message of which 10 bytes arrived.
        os.write(pool._result_queue._writer.fileno(), struct.pack("!i", 1000) + b"x" * 10)
        raise RuntimeError("the chunk failed")  # as a killed worker's BrokenProcessPool does
except RuntimeError:
    print("exited")
"""


# The worker dies with half its answer written while the parser waits for a chunk: the wait
# ends (BrokenProcessPool, put back and resumed by the batch processor) instead of lasting
# until the stall timeout (an hour here).
WAITING = """
import os, struct, time
from concurrent.futures.process import BrokenProcessPool
from gateway.batch_parse import RowParser

parser = RowParser(None, 1, None, timeout=3600)
try:
    with parser:
        pool = parser._pool
        assert pool.submit(int, 1).result(timeout=60) == 1
        pending = pool.submit(time.sleep, 3600)
        os.write(pool._result_queue._writer.fileno(), struct.pack("!i", 1000) + b"x" * 10)
        [worker] = pool._processes.values()
        worker.kill()
        started = time.monotonic()
        try:
            parser._answer(pending)
        except BrokenProcessPool:
            print(f"broken after {time.monotonic() - started:.0f} s")
            raise
except BrokenProcessPool:
    print("exited")
"""


def test_a_half_written_answer_does_not_hang_the_parser_on_exit() -> None:
    done = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, capture_output=True,
                          text=True, timeout=90)
    assert done.returncode == 0 and done.stdout.strip() == "exited", (done.stdout, done.stderr)


def test_a_wait_for_a_chunk_ends_when_its_worker_died_mid_answer() -> None:
    done = subprocess.run([sys.executable, "-c", WAITING], cwd=ROOT, capture_output=True,
                          text=True, timeout=90)
    lines = done.stdout.split()
    assert done.returncode == 0 and lines[-1] == "exited", (done.stdout, done.stderr)
    assert done.stdout.startswith("broken after ") and int(lines[2]) <= 5, done.stdout
