"""How a test reacts when a real component it needs is missing.

In CI (``FLEETSCOPE_REQUIRE_REAL=1``) a missing component is a failure; on a developer's
machine that lacks it the test is skipped, saying why.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

REQUIRE_REAL_ENV = "FLEETSCOPE_REQUIRE_REAL"


def real_required() -> bool:
    """Whether missing real components must fail the run (``FLEETSCOPE_REQUIRE_REAL=1``)."""
    return os.environ.get(REQUIRE_REAL_ENV) == "1"


def require_real(reason: str) -> NoReturn:
    """Fail (``FLEETSCOPE_REQUIRE_REAL=1``) or skip the current test with ``reason``."""
    if real_required():
        pytest.fail(f"{reason} ({REQUIRE_REAL_ENV}=1)", pytrace=False)
    pytest.skip(reason)
