"""The CE year the suite's fixtures are dated in, kept open whatever day the suite runs.

The golden files and most tests are dated in CE year 2026.  After 30 December 2026 the rules
(R11) would answer YEAR_CLOSED to all of them, so the suite runs as if the department had
extended 2026 (a real setting, YEAR_CLOSE_EXTENSIONS).  ``tests/conftest.py`` puts
:data:`FIXTURE_YEAR_OPEN` in the environment for Settings and every child process; a test that
builds its own :class:`RulesConfig` takes :func:`fixture_rules_config`.  Tests of the year close
pass their own config.
"""

from __future__ import annotations

from datetime import date
from typing import Any

from gateway.pipeline.rules_tables import RulesConfig
from tests.support.keys import KEYS

FIXTURE_YEAR_EXTENSIONS = {2026: date(2099, 12, 30)}
# CE_GATEWAY_YEAR_CLOSE_EXTENSIONS: "2026=2099-12-30"
FIXTURE_YEAR_OPEN = ",".join(f"{year}={day.isoformat()}"
                             for year, day in FIXTURE_YEAR_EXTENSIONS.items())


def fixture_rules_config(**overrides: Any) -> RulesConfig:
    """The notice's rules, with the suite's extension keeping the fixtures' year open.

    And the suite's stores' person keys (:data:`tests.support.keys.KEYS`).
    """
    return RulesConfig(**{"year_close_extensions": FIXTURE_YEAR_EXTENSIONS, "person_keys": KEYS,
                          **overrides})
