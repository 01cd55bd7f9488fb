# CE Gateway — every target does its own set-up (make install is idempotent).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench lint clean browser soak fuzz walks

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: install
	$(BIN)/ce-gateway demo

# Four test processes by default (every test has its own SQLite file or PostgreSQL schema and
# its own ports; many wait on servers, processes or the database, so more processes than the two
# cores keep both busy: 403 s against 443 s with three, PostgreSQL included, 2026-11-27), and an
# idle one steals queued tests from a busy one (--dist worksteal: the slow fault tests no longer
# leave three waiting on the fourth at the end; 349 s against 381 s, one run each, same tree).
# TEST_WORKERS=0 runs them in this one process.
# Bytecode is written (into the git-ignored __pycache__ directories) even where the environment
# sets PYTHONDONTWRITEBYTECODE, as this machine's does: the suite starts ~170 `ce-gateway`
# processes and its servers and workers, and each compiled every module of ours from source
# again (0.15 s of CPU a start), as each xdist worker re-compiled pytest's rewritten tests.
TEST_WORKERS ?= 4

test: install browser
	PYTHONDONTWRITEBYTECODE= $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal

# The console's browser tests drive Debian's chromium through Playwright (never a downloaded
# browser).  This never fails the build: without root or apt the browser tests skip, saying why.
browser:
	@if [ -x /usr/bin/chromium ]; then \
	  echo "browser: /usr/bin/chromium is installed"; \
	elif [ "$$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium; } \
	    || echo "browser: apt-get could not install chromium; the browser tests will skip"; \
	else \
	  echo "browser: /usr/bin/chromium is missing and installing it needs root and apt-get; the browser tests will skip"; \
	fi

# Figures beside baselines measured in the same run, appended to benchmarks/RESULTS.md.  Parts:
# BENCH_ONLY=a,b,c,batch (default all); PostgreSQL runs (and part c) need BENCH_POSTGRES_URL or
# CE_GATEWAY_TEST_POSTGRES_URL; sizes and the rest in benchmarks/run.py's docstring.
bench: install
	$(BIN)/python -m benchmarks.run

# Full-size fault runs on PostgreSQL (issue 6): 20,000 records through 2 replicas + 2 workers
# with a worker SIGKILLed, a 10 s outage, a SIGKILL mid 100,000-row batch.  Needs
# CE_GATEWAY_TEST_POSTGRES_URL; `make test` runs the same tests scaled down.
soak: install
	CE_GATEWAY_SOAK=1 $(BIN)/python -m pytest -q -s -m soak --timeout=1800 tests/e2e/test_scale_faults.py

# The store's random walks (ingest, corrections, withdrawals, moves, reprocessing, deliveries
# checked against a model after every step) with more seeds than `make test` walks (3 to 8 a file
# there, to keep it near five minutes).  Seeds are fixed, so a failure names a replayable seed.
WALK_SEEDS ?= 24
walks: install
	CE_GATEWAY_WALK_SEEDS=$(WALK_SEEDS) $(BIN)/python -m pytest -q -n $(TEST_WORKERS) \
	  tests/integration/test_succession_review.py tests/integration/test_succession_review2.py \
	  tests/integration/test_downstream_model_review.py tests/integration/test_walk_moves_review.py \
	  tests/integration/test_locks_review.py

# Hostile HTTP input (issue 6): schemathesis against the real gateway's /openapi.json, every
# partner request signed; at least 1,000 examples in all (the test fails with fewer), no 5xx.
# Prints the number of examples sent.  `make test` runs the same test with 4 per operation.
fuzz: install
	FUZZ_EXAMPLES=40 FUZZ_MIN_TOTAL=1000 $(BIN)/python -m pytest -q -p no:cacheprovider tests/e2e/test_schemathesis.py

lint: install
	$(BIN)/ruff check contracts gateway adapters mock_partners tests
	$(BIN)/mypy

clean:
	rm -rf $(VENV) var .pytest_cache
